//! Signal dispositions chosen with `--on SIG=ACTION`.
//!
//! The handler only loads an atomic and calls `_exit` or `write`, all of which are
//! async-signal-safe, so it may interrupt any code, including the allocator.

use std::sync::atomic::{AtomicI32, Ordering};

use libc::c_int;

/// What to do when a signal arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Exit(u8),
    Ignore,
    Log,
}

/// Highest signal number Linux delivers (SIGRTMAX on x86_64).
const MAX_SIG: c_int = 64;
/// Marker in `ACTIONS` for "print and continue"; exit codes are stored as 0..=255.
const LOG: i32 = -1;

static ACTIONS: [AtomicI32; MAX_SIG as usize + 1] =
    [const { AtomicI32::new(LOG) }; MAX_SIG as usize + 1];

const NAMES: &[(&str, c_int)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// Parses a signal given as a number (`15`) or a name (`TERM`, `SIGTERM`, `term`).
pub fn parse_signal(s: &str) -> Result<c_int, String> {
    if let Ok(n) = s.parse::<c_int>() {
        return if (1..=MAX_SIG).contains(&n) {
            Ok(n)
        } else {
            Err(format!("signal number {n} out of range 1..={MAX_SIG}"))
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, sig)| sig)
        .ok_or_else(|| format!("unknown signal {s:?}"))
}

/// Parses the argument of `--on`: `SIG=exit:N`, `SIG=exit` (128+SIG), `SIG=ignore`, `SIG=log`.
pub fn parse_rule(s: &str) -> Result<(c_int, Action), String> {
    let (sig, action) = s
        .split_once('=')
        .ok_or_else(|| format!("--on {s:?}: expected SIG=ACTION"))?;
    let sig = parse_signal(sig)?;
    if sig == libc::SIGKILL || sig == libc::SIGSTOP {
        return Err(format!(
            "--on {s:?}: SIGKILL and SIGSTOP cannot be caught or ignored"
        ));
    }
    let action = match action {
        "ignore" => Action::Ignore,
        "log" => Action::Log,
        "exit" => Action::Exit((128 + sig) as u8),
        _ => match action.strip_prefix("exit:").map(str::parse::<u8>) {
            Some(Ok(code)) => Action::Exit(code),
            _ => {
                return Err(format!(
                    "--on {s:?}: action must be exit:N (0-255), ignore or log"
                ));
            }
        },
    };
    Ok((sig, action))
}

/// Installs the default rules (TERM and INT exit with 128+n) overridden by `rules`.
///
/// The defaults matter as PID 1 of a pid namespace: the kernel drops signals that have no
/// handler there, so without them the process could only be stopped with SIGKILL.
pub fn install(rules: &[(c_int, Action)]) -> Result<(), String> {
    let defaults = [libc::SIGTERM, libc::SIGINT].map(|s| (s, Action::Exit((128 + s) as u8)));
    for &(sig, action) in defaults.iter().chain(rules) {
        set(sig, action)?;
    }
    Ok(())
}

/// Restores the kernel's default action, so a fault really kills the process.
pub fn reset(sig: c_int) {
    // SAFETY: SIG_DFL is a valid disposition for any catchable signal; failures (for an
    // uncatchable signal) leave the disposition unchanged, which is what we want anyway.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

fn set(sig: c_int, action: Action) -> Result<(), String> {
    let handler = match action {
        Action::Ignore => libc::SIG_IGN,
        Action::Exit(code) => {
            ACTIONS[sig as usize].store(i32::from(code), Ordering::SeqCst);
            on_signal as *const () as libc::sighandler_t
        }
        Action::Log => {
            ACTIONS[sig as usize].store(LOG, Ordering::SeqCst);
            on_signal as *const () as libc::sighandler_t
        }
    };
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) that we then
    // fill in; `on_signal` is async-signal-safe and matches the plain handler signature.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        // Restart interrupted syscalls so servers and readers carry on after a `log`.
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(format!("cannot set action for signal {sig}: {err}"));
    }
    Ok(())
}

extern "C" fn on_signal(sig: c_int) {
    let action = ACTIONS[sig as usize].load(Ordering::SeqCst);
    if action >= 0 {
        // SAFETY: _exit is async-signal-safe and ends the whole process.
        unsafe { libc::_exit(action) }
    }
    const PREFIX: &[u8] = b"got signal ";
    let mut buf = [0u8; 32];
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut len = PREFIX.len() + write_decimal(&mut buf[PREFIX.len()..], sig as u32);
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write and errno access are async-signal-safe; errno is restored so the
    // interrupted code does not see the value our write may leave behind.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(1, buf.as_ptr().cast(), len);
        *libc::__errno_location() = errno;
    }
}

/// Writes `n` in decimal at the start of `out` without allocating; returns the digit count.
pub fn write_decimal(out: &mut [u8], mut n: u32) -> usize {
    let mut tmp = [0u8; 10];
    let mut len = 0;
    loop {
        tmp[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (o, d) in out.iter_mut().zip(tmp[..len].iter().rev()) {
        *o = *d;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signals_and_rules() {
        assert_eq!(parse_signal("TERM"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("sigusr1"), Ok(libc::SIGUSR1));
        assert_eq!(parse_signal("34"), Ok(34));
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("NOPE").is_err());
        assert_eq!(
            parse_rule("HUP=exit:7"),
            Ok((libc::SIGHUP, Action::Exit(7)))
        );
        assert_eq!(
            parse_rule("INT=exit"),
            Ok((libc::SIGINT, Action::Exit(130)))
        );
        assert_eq!(parse_rule("10=log"), Ok((10, Action::Log)));
        assert!(parse_rule("TERM=exit:300").is_err());
        assert!(parse_rule("TERM").is_err());
        assert!(parse_rule("KILL=ignore").is_err());
    }

    #[test]
    fn formats_decimals() {
        let mut buf = [0u8; 10];
        let n = write_decimal(&mut buf, 64);
        assert_eq!(&buf[..n], b"64");
        let n = write_decimal(&mut buf, 0);
        assert_eq!(&buf[..n], b"0");
    }
}
