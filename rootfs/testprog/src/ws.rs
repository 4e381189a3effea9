//! A WebSocket echo server (RFC 6455), just enough for tests: it answers the opening
//! handshake, echoes every data frame back as it came (text, binary, continuation), answers
//! pings and closes. SHA-1 and base64 are written out here because the handshake needs them
//! and this program takes no dependencies.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

/// The GUID every server appends to the client's key (RFC 6455 section 1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest frame payload accepted; echoing holds one frame in memory.
const MAX_PAYLOAD: u64 = 16 << 20;

/// Binds now and serves WebSocket echo on a background thread.
pub fn serve_ws(addr: SocketAddr) -> Result<(), String> {
    crate::net::spawn_listener("ws", addr, handle)
}

fn handle(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    match handshake(&mut reader) {
        Ok(key) => {
            let reply = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                accept_key(&key)
            );
            if writer.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
        Err(e) => {
            let body = format!("{e}\n");
            let reply = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = writer.write_all(reply.as_bytes());
            return;
        }
    }
    let _ = echo_frames(&mut reader, &mut writer);
}

/// Reads the upgrade request and returns its `Sec-WebSocket-Key`.
fn handshake(reader: &mut impl BufRead) -> io::Result<String> {
    let mut key = None;
    let mut upgrade = false;
    for _ in 0..100 {
        let mut line = String::new();
        if reader.by_ref().take(8192).read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "end of stream",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            return match (key, upgrade) {
                (Some(key), true) => Ok(key),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a websocket upgrade: need Upgrade: websocket and Sec-WebSocket-Key",
                )),
            };
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "sec-websocket-key" => key = Some(value.to_string()),
                "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
                _ => {}
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "too many header lines",
    ))
}

fn accept_key(key: &str) -> String {
    base64(&sha1(format!("{key}{GUID}").as_bytes()))
}

/// Echoes frames until the client closes or the connection fails.
fn echo_frames(reader: &mut impl Read, writer: &mut impl Write) -> io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        reader.read_exact(&mut head)?;
        let fin_and_opcode = head[0] & 0x8f;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                reader.read_exact(&mut b)?;
                u16::from_be_bytes(b).into()
            }
            127 => {
                let mut b = [0u8; 8];
                reader.read_exact(&mut b)?;
                u64::from_be_bytes(b)
            }
            n => n.into(),
        };
        if len > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame too large",
            ));
        }
        let mut mask = [0u8; 4];
        if masked {
            reader.read_exact(&mut mask)?;
        }
        let mut payload = vec![0u8; len as usize];
        reader.read_exact(&mut payload)?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        match opcode {
            // Continuation, text, binary: back as they came, fragments included.
            0x0..=0x2 => write_frame(writer, fin_and_opcode, &payload)?,
            0x8 => {
                // Echo the close (with its status code) and end the connection.
                write_frame(writer, 0x88, &payload)?;
                return Ok(());
            }
            0x9 => write_frame(writer, 0x8a, &payload)?,
            _ => {}
        }
    }
}

/// Writes one unmasked frame, as servers send them.
fn write_frame(w: &mut impl Write, first: u8, payload: &[u8]) -> io::Result<()> {
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    w.write_all(&out)
}

/// SHA-1 (FIPS 180-4). Only for the handshake's accept key, where the protocol demands it.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hi, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hi = hi.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, v) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn sha1_and_base64_known_values() {
        let hex: String = sha1(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn echoes_masked_frames_unmasked() {
        let mask = [1u8, 2, 3, 4];
        let text = b"hi!";
        let mut input = vec![0x81, 0x80 | text.len() as u8];
        input.extend_from_slice(&mask);
        input.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        input.extend_from_slice(&[0x88, 0x80, 0, 0, 0, 0]);
        let mut out = Vec::new();
        echo_frames(&mut input.as_slice(), &mut out).unwrap();
        assert_eq!(out, [0x81, 3, b'h', b'i', b'!', 0x88, 0]);
    }
}
