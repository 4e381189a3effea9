//! `testprog`: the program silo's tests run inside containers.
//!
//! It takes a chain of commands that run left to right, plus `--on SIG=ACTION` rules that
//! apply to the whole run. See `USAGE`.

mod net;
mod probe;
mod signals;
mod ws;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::exit;
use std::time::{SystemTime, UNIX_EPOCH};

const USAGE: &str = "\
usage: testprog [--on SIG=ACTION]... COMMAND...
Commands run left to right; --on rules may appear anywhere and apply to the whole run.
  env | cwd | hostname | id | status | fds
                      print the environment (K=V lines), working directory, hostname,
                      uid/gid, Cap*/NoNewPrivs/Seccomp lines of /proc/self/status,
                      open file descriptors
  args [ARG]...       print argv one per line (takes the rest of the line)
  exit N              exit with code N
  stamp               print start_ns=N, the CLOCK_REALTIME ns taken at start of main
  serve [ADDR:]PORT   HTTP/1.1 server: GET / /env /hostname, POST /echo
  echo [ADDR:]PORT    TCP echo server
  ws [ADDR:]PORT      WebSocket echo server (text, binary, ping, close)
  sleep               block until a signal ends the process
  segv                die by SIGSEGV (writes through a null pointer)
  alloc MIB           allocate and touch MIB mebibytes
  fork N              start N children that sleep forever
  orphans N           leave N orphaned grandchildren behind; nothing is ever reaped
  forkbomb            fork until fork fails, then print the count
  spew                write to stdout as fast as possible, forever
  probe [NAME]...     try calls a confined container must not make (all, or those
                      named; takes the rest of the line), with harmless arguments, and
                      print NAME=ok or NAME=ERRNO for each
SIG is a number or a name (TERM, SIGTERM, 15). ACTION is exit:N, exit (128+SIG),
ignore or log (print \"got signal N\" and carry on). Without rules, TERM and INT exit
with 128+SIG. After serve, echo, ws, alloc, fork, orphans or forkbomb, the process sleeps
once the chain ends instead of exiting.
";

enum Cmd {
    Env,
    Args,
    Cwd,
    Hostname,
    Id,
    Status,
    Fds,
    Exit(u8),
    Stamp,
    Serve(SocketAddr),
    Echo(SocketAddr),
    Ws(SocketAddr),
    Sleep,
    Segv,
    Alloc(usize),
    Fork(u32),
    Orphans(u32),
    Forkbomb,
    Spew,
    Probe,
}

struct Plan {
    rules: Vec<(libc::c_int, signals::Action)>,
    cmds: Vec<Cmd>,
}

fn main() {
    // Taken first so `stamp` measures as much of the startup path as possible.
    let start = SystemTime::now();
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let words = argv.get(1..).unwrap_or_default();
    if matches!(words, [w] if w == "-h" || w == "--help" || w == "help") {
        print!("{USAGE}");
        return;
    }
    let plan = match parse(words) {
        Ok(plan) => plan,
        Err(e) => usage_error(&e),
    };
    if let Err(e) = signals::install(&plan.rules) {
        usage_error(&e);
    }
    let mut keep_running = false;
    for cmd in plan.cmds {
        keep_running |= matches!(
            cmd,
            Cmd::Serve(_)
                | Cmd::Echo(_)
                | Cmd::Ws(_)
                | Cmd::Alloc(_)
                | Cmd::Fork(_)
                | Cmd::Orphans(_)
                | Cmd::Forkbomb
        );
        if let Err(e) = run(cmd, &argv, start) {
            eprintln!("testprog: {e}");
            exit(1);
        }
    }
    if keep_running {
        sleep_forever();
    }
}

fn usage_error(msg: &str) -> ! {
    eprint!("testprog: {msg}\n{USAGE}");
    exit(2);
}

fn parse(words: &[String]) -> Result<Plan, String> {
    let mut plan = Plan {
        rules: Vec::new(),
        cmds: Vec::new(),
    };
    let mut it = words.iter();
    while let Some(word) = it.next() {
        let mut operand = || it.next().ok_or_else(|| format!("{word} needs an argument"));
        let cmd = match word.as_str() {
            "--on" => {
                plan.rules.push(signals::parse_rule(operand()?)?);
                continue;
            }
            "env" => Cmd::Env,
            "args" => {
                plan.cmds.push(Cmd::Args);
                break;
            }
            "cwd" => Cmd::Cwd,
            "hostname" => Cmd::Hostname,
            "id" => Cmd::Id,
            "status" => Cmd::Status,
            "fds" => Cmd::Fds,
            "exit" => Cmd::Exit(number(word, operand()?)?),
            "stamp" => Cmd::Stamp,
            "serve" => Cmd::Serve(net::parse_addr(operand()?)?),
            "echo" => Cmd::Echo(net::parse_addr(operand()?)?),
            "ws" => Cmd::Ws(net::parse_addr(operand()?)?),
            "sleep" => Cmd::Sleep,
            "segv" => Cmd::Segv,
            "alloc" => Cmd::Alloc(number(word, operand()?)?),
            "fork" => Cmd::Fork(number(word, operand()?)?),
            "orphans" => Cmd::Orphans(number(word, operand()?)?),
            "forkbomb" => Cmd::Forkbomb,
            "spew" => Cmd::Spew,
            "probe" => {
                plan.cmds.push(Cmd::Probe);
                break;
            }
            _ => return Err(format!("unknown command {word:?}")),
        };
        plan.cmds.push(cmd);
    }
    if plan.cmds.is_empty() {
        return Err("no command given".into());
    }
    Ok(plan)
}

fn number<T: std::str::FromStr>(word: &str, s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("{word}: bad number {s:?}"))
}

fn run(cmd: Cmd, argv: &[String], start: SystemTime) -> Result<(), String> {
    let mut out = io::stdout().lock();
    let text = match cmd {
        Cmd::Env => env_text(),
        Cmd::Args => argv.iter().map(|a| format!("{a}\n")).collect(),
        Cmd::Cwd => {
            let cwd = std::env::current_dir().map_err(|e| format!("getcwd: {e}"))?;
            format!("{}\n", cwd.display())
        }
        Cmd::Hostname => format!("{}\n", hostname()),
        // SAFETY: getuid and getgid have no preconditions and cannot fail.
        Cmd::Id => unsafe { format!("uid={} gid={}\n", libc::getuid(), libc::getgid()) },
        Cmd::Status => status_text()?,
        Cmd::Fds => fds_text()?,
        Cmd::Probe => probe::run(argv),
        Cmd::Exit(code) => {
            let _ = out.flush();
            exit(code.into());
        }
        Cmd::Stamp => {
            let ns = start
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            format!("start_ns={ns}\n")
        }
        Cmd::Serve(addr) => return net::serve_http(addr),
        Cmd::Echo(addr) => return net::serve_echo(addr),
        Cmd::Ws(addr) => return ws::serve_ws(addr),
        Cmd::Sleep => sleep_forever(),
        Cmd::Segv => segv(),
        Cmd::Alloc(mib) => alloc(mib)?,
        Cmd::Fork(n) => fork_sleepers(n)?,
        Cmd::Orphans(n) => orphans(n)?,
        Cmd::Forkbomb => forkbomb(),
        Cmd::Spew => return spew(out),
    };
    out.write_all(text.as_bytes())
        .map_err(|e| format!("writing to stdout: {e}"))
}

pub fn env_text() -> String {
    std::env::vars_os()
        .map(|(k, v)| format!("{}={}\n", k.to_string_lossy(), v.to_string_lossy()))
        .collect()
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for buf.len() bytes; one byte is kept back so the result
    // is NUL-terminated even if the name was truncated.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return String::new();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

fn status_text() -> Result<String, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    Ok(status
        .lines()
        .filter(|l| {
            ["Cap", "NoNewPrivs", "Seccomp"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| format!("{l}\n"))
        .collect())
}

/// Lists /proc/self/fd as `N -> TARGET` lines, leaving out the descriptor of the listing.
fn fds_text() -> Result<String, String> {
    const DIR: &std::ffi::CStr = c"/proc/self/fd";
    // std's ReadDir hides its descriptor, so use opendir/dirfd to know which one to skip.
    // SAFETY: DIR is a valid C string; the handle is checked for NULL and closed below.
    let dir = unsafe { libc::opendir(DIR.as_ptr()) };
    if dir.is_null() {
        return Err(format!(
            "opening /proc/self/fd: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: dir is a valid, open directory stream.
    let own_fd = unsafe { libc::dirfd(dir) };
    let mut fds = Vec::new();
    loop {
        // SAFETY: dir is open; the entry is only read before the next readdir call.
        let entry = unsafe { libc::readdir(dir) };
        if entry.is_null() {
            break;
        }
        // SAFETY: readdir returns an entry whose d_name is a NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) };
        if let Ok(fd) = name.to_string_lossy().parse::<i32>()
            && fd != own_fd
        {
            fds.push(fd);
        }
    }
    // SAFETY: dir is open and is not used after this.
    unsafe { libc::closedir(dir) };
    fds.sort_unstable();
    Ok(fds
        .iter()
        .map(|fd| {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|t| t.display().to_string())
                .unwrap_or_else(|e| format!("? ({e})"));
            format!("{fd} -> {target}\n")
        })
        .collect())
}

fn sleep_forever() -> ! {
    loop {
        // Parking can wake spuriously; only a signal handler or a kill ends this.
        std::thread::park();
    }
}

fn segv() -> ! {
    // A `--on SEGV=log` handler would return to the faulting write forever.
    signals::reset(libc::SIGSEGV);
    // black_box keeps the compiler from proving the address null and dropping the write.
    let ptr = std::hint::black_box(std::ptr::null_mut::<u8>());
    // SAFETY: not safe at all, on purpose: the write faults and the kernel kills us.
    unsafe { std::ptr::write_volatile(ptr, 1) };
    unreachable!("write through a null pointer did not fault");
}

fn alloc(mib: usize) -> Result<String, String> {
    let len = mib
        .checked_mul(1 << 20)
        .ok_or_else(|| format!("alloc {mib}: too large"))?;
    let mut mem: Vec<u8> = Vec::new();
    mem.try_reserve_exact(len)
        .map_err(|e| format!("alloc {mib} MiB: {e}"))?;
    // Non-zero bytes so every page is really written, not mapped to the shared zero page.
    mem.resize(len, 0xa5);
    // Keep the memory resident for as long as the process lives.
    std::hint::black_box(mem.leak());
    Ok(format!("allocated {mib} MiB\n"))
}

/// Forks; the child only calls `pause` (async-signal-safe, as required after fork in a
/// process that may have server threads) and never returns.
fn fork_idle() -> io::Result<libc::pid_t> {
    // SAFETY: the child branch runs only async-signal-safe code.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => idle_child(),
        pid => Ok(pid),
    }
}

fn idle_child() -> ! {
    loop {
        // SAFETY: pause has no preconditions; signals end the child via their handlers.
        unsafe { libc::pause() };
    }
}

fn fork_sleepers(n: u32) -> Result<String, String> {
    let mut text = String::new();
    for _ in 0..n {
        let pid = fork_idle().map_err(|e| format!("fork: {e}"))?;
        text += &format!("forked {pid}\n");
    }
    Ok(text)
}

fn orphans(n: u32) -> Result<String, String> {
    for _ in 0..n {
        // SAFETY: the child branch runs only async-signal-safe code (fork, pause, _exit).
        match unsafe { libc::fork() } {
            -1 => return Err(format!("fork: {}", io::Error::last_os_error())),
            0 => {
                // The grandchild sleeps on; its parent exits at once and is never waited
                // for, leaving a zombie here and an orphan for the reaper of this process.
                let _ = fork_idle();
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(0) }
            }
            _ => {}
        }
    }
    Ok(format!("orphans {n}\n"))
}

fn forkbomb() -> String {
    let mut count = 0u64;
    let err = loop {
        match fork_idle() {
            Ok(_) => count += 1,
            Err(e) => break e,
        }
    };
    format!("forkbomb: forked {count} children, then fork failed: {err}\n")
}

fn spew(mut out: io::StdoutLock) -> Result<(), String> {
    let line = b"spew spew spew spew spew spew spew spew spew spew spew spew spew spew spew\n";
    let chunk: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() * 800)
        .collect();
    loop {
        out.write_all(&chunk)
            .map_err(|e| format!("spew: writing to stdout: {e}"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_chains() {
        let plan = parse(&words("--on TERM=exit:0 stamp serve 8080 sleep")).unwrap();
        assert_eq!(plan.rules.len(), 1);
        assert_eq!(plan.cmds.len(), 3);
        let plan = parse(&words("args exit 3 --on nonsense")).unwrap();
        assert!(plan.rules.is_empty() && plan.cmds.len() == 1);
        assert!(parse(&words("exit")).is_err());
        assert!(parse(&words("exit 256")).is_err());
        assert!(parse(&words("frobnicate")).is_err());
        assert!(parse(&words("--on TERM=log")).is_err());
    }
}
