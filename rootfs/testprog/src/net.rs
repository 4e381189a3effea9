//! The HTTP/1.1 and TCP echo servers, one thread per connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

/// Longest request line or header line we accept, and most header lines per request.
const MAX_LINE: u64 = 8 * 1024;
const MAX_HEADERS: usize = 100;
/// Largest request body; `POST /echo` keeps the whole body in memory.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Parses `PORT` (all addresses) or `ADDR:PORT`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    s.parse()
        .map_err(|_| format!("bad listen address {s:?}: expected PORT or ADDR:PORT"))
}

/// Binds now (so errors are reported in order) and serves HTTP on a background thread.
pub fn serve_http(addr: SocketAddr) -> Result<(), String> {
    spawn_listener("http", addr, handle_http)
}

/// Binds now and echoes every connection's bytes back on a background thread.
pub fn serve_echo(addr: SocketAddr) -> Result<(), String> {
    spawn_listener("echo", addr, handle_echo)
}

pub fn spawn_listener(kind: &str, addr: SocketAddr, handle: fn(TcpStream)) -> Result<(), String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("cannot bind {kind} {addr}: {e}"))?;
    // Goes to stderr so that it never mixes with output tests compare.
    eprintln!("testprog: {kind} listening on {addr}");
    thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    thread::spawn(move || handle(stream));
                }
                Err(e) => {
                    eprintln!("testprog: accept on {addr}: {e}");
                    // Out of fds or memory: back off instead of spinning.
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
    Ok(())
}

fn handle_echo(stream: TcpStream) {
    let Ok(mut reader) = stream.try_clone() else {
        return;
    };
    let mut writer = stream;
    let _ = io::copy(&mut reader, &mut writer);
    let _ = writer.shutdown(Shutdown::Write);
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    keep_alive: bool,
}

fn handle_http(stream: TcpStream) {
    // Responses go out in one write; this only matters for tiny keep-alive exchanges.
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let (status, body, keep_alive) = match read_request(&mut reader) {
            Ok(None) => return,
            Ok(Some(req)) => {
                let (status, body) = route(&req);
                (status, body, req.keep_alive)
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                ("400 Bad Request", format!("{e}\n").into_bytes(), false)
            }
            Err(_) => return,
        };
        if write_response(&mut writer, status, &body, keep_alive).is_err() || !keep_alive {
            return;
        }
    }
}

fn route(req: &Request) -> (&'static str, Vec<u8>) {
    let path = req.path.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("GET", "/") => ("200 OK", b"hello from silo\n".to_vec()),
        ("GET", "/env") => ("200 OK", crate::env_text().into_bytes()),
        ("GET", "/hostname") => ("200 OK", format!("{}\n", crate::hostname()).into_bytes()),
        ("POST", "/echo") => ("200 OK", req.body.clone()),
        _ => ("404 Not Found", b"not found\n".to_vec()),
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one CRLF- or LF-terminated line, or `None` at a clean end of stream.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = String::new();
    let n = reader.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(bad("line too long or truncated".into()));
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_owned()))
}

fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    // Clients may send empty lines between requests; skip them.
    let start = loop {
        match read_line(reader)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let mut parts = start.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!("bad request line {start:?}")));
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(bad(format!("unsupported version {version:?}"))),
    };
    let mut content_length = 0usize;
    for _ in 0..MAX_HEADERS {
        let line = read_line(reader)?.ok_or_else(|| bad("end of stream in headers".into()))?;
        if line.is_empty() {
            let mut body = vec![0; content_length];
            reader.read_exact(&mut body)?;
            let (method, path) = (method.to_owned(), path.to_owned());
            return Ok(Some(Request {
                method,
                path,
                body,
                keep_alive,
            }));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length = value
                    .parse()
                    .ok()
                    .filter(|&n| n <= MAX_BODY)
                    .ok_or_else(|| bad(format!("bad content-length {value:?}")))?;
            }
            "connection" if value.eq_ignore_ascii_case("close") => keep_alive = false,
            "connection" if value.eq_ignore_ascii_case("keep-alive") => keep_alive = true,
            "transfer-encoding" => return Err(bad("transfer-encoding is not supported".into())),
            _ => {}
        }
    }
    Err(bad("too many header lines".into()))
}

fn write_response(
    w: &mut impl Write,
    status: &str,
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> io::Result<Option<Request>> {
        read_request(&mut BufReader::new(raw.as_bytes()))
    }

    #[test]
    fn parses_requests() {
        let req = parse("POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/echo"));
        assert_eq!(req.body, b"abc");
        assert!(req.keep_alive);
        let req = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!req.keep_alive);
        let req = parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!req.keep_alive);
        assert!(parse("").unwrap().is_none());
        assert!(parse("GARBAGE\r\n\r\n").is_err());
        assert!(parse("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(parse_addr("8080").unwrap().to_string(), "0.0.0.0:8080");
        assert_eq!(
            parse_addr("127.0.0.1:9").unwrap().to_string(),
            "127.0.0.1:9"
        );
        assert!(parse_addr("x").is_err());
    }
}
