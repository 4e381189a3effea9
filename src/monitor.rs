//! Waiting for a container's init to exit, and what its exit means.
//!
//! The wait is driven by pidfds, which the kernel makes readable when their process exits,
//! whoever its parent is. The init's parent is its keeper (see [`crate::spawn`]), which
//! reaps it and writes an [`ExitRecord`] into the state directory before exiting itself, so
//! the runtime waits for the init's pidfd, then the keeper's, then reads the record. Nothing
//! polls, and a pid reused by an unrelated process can never be confused with the
//! container's.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// How the init process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitStatus {
    /// It called exit with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// Nobody could tell: its keeper was killed before it, so the status went to whoever
    /// adopted the orphan.
    Unknown,
}

impl ExitStatus {
    /// The shell's convention: the exit code, or 128 + n after signal n; 255 when unknown
    /// (as containerd reports a lost exit).
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
            ExitStatus::Unknown => UNKNOWN_CODE,
        }
    }
}

/// The exit code reported when the real one is lost.
pub const UNKNOWN_CODE: i32 = 255;

/// How the init ended, as its keeper writes it into the state directory: fixed-size, so
/// that the runtime can write a pending one at start and the keeper's write needs no new
/// space on a full disk.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitRecord {
    magic: u32,
    /// `si_code` of the keeper's waitid: CLD_EXITED, CLD_KILLED or CLD_DUMPED.
    code: i32,
    status: i32,
}

impl ExitRecord {
    pub(crate) const SIZE: usize = std::mem::size_of::<ExitRecord>();
    const DONE: u32 = u32::from_be_bytes(*b"silo");
    pub(crate) const PENDING: ExitRecord = ExitRecord {
        magic: 0,
        code: 0,
        status: 0,
    };

    pub(crate) const fn new(code: i32, status: i32) -> ExitRecord {
        ExitRecord {
            magic: Self::DONE,
            code,
            status,
        }
    }

    pub(crate) fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..4].copy_from_slice(&self.magic.to_ne_bytes());
        out[4..8].copy_from_slice(&self.code.to_ne_bytes());
        out[8..].copy_from_slice(&self.status.to_ne_bytes());
        out
    }

    /// The status the record holds; `Unknown` for a pending or unreadable one.
    pub(crate) fn status_from(bytes: &[u8]) -> ExitStatus {
        let word = |i: usize| bytes.get(i..i + 4).map(|b| [b[0], b[1], b[2], b[3]]);
        let (Some(magic), Some(code), Some(status)) = (word(0), word(4), word(8)) else {
            return ExitStatus::Unknown;
        };
        if u32::from_ne_bytes(magic) != Self::DONE {
            return ExitStatus::Unknown;
        }
        let status = i32::from_ne_bytes(status);
        match i32::from_ne_bytes(code) {
            libc::CLD_EXITED => ExitStatus::Code(status),
            _ => ExitStatus::Signal(status),
        }
    }
}

/// Everything known about one finished run of a container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub status: ExitStatus,
    /// The kernel's OOM killer killed a process of the container.
    pub oom_killed: bool,
    /// The container was destroyed rather than exiting by itself.
    pub destroyed: bool,
    /// The reason given to `destroy`, if any.
    pub reason: Option<String>,
    /// What went wrong between spawn and exec, if anything did (say, a missing
    /// entrypoint).
    pub boot_error: Option<String>,
    pub started_at: std::time::SystemTime,
    pub exited_at: std::time::SystemTime,
}

impl Outcome {
    /// Ok when it exited with 0 or was destroyed without a reason; otherwise the error that
    /// `monitor` reports.
    pub fn result(&self, id: &str) -> Result<(), Exit> {
        let clean = self.boot_error.is_none()
            && self.reason.is_none()
            && (self.destroyed || self.status == ExitStatus::Code(0));
        if clean {
            return Ok(());
        }
        Err(Exit {
            id: id.to_string(),
            code: self.status.code(),
            signal: match self.status {
                ExitStatus::Signal(s) => Some(s),
                ExitStatus::Code(_) | ExitStatus::Unknown => None,
            },
            known: self.status != ExitStatus::Unknown,
            oom_killed: self.oom_killed,
            reason: self.reason.clone(),
            boot_error: self.boot_error.clone(),
        })
    }
}

/// A container run that did not end well: the error `monitor` reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Exit {
    pub id: String,
    /// Exit code, 128 + n after signal n.
    pub code: i32,
    pub signal: Option<i32>,
    /// False when the real exit status was lost (see [`ExitStatus::Unknown`]).
    pub known: bool,
    pub oom_killed: bool,
    /// The reason given to `destroy`.
    pub reason: Option<String>,
    /// Why the entrypoint never ran.
    pub boot_error: Option<String>,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = &self.id;
        if let Some(reason) = &self.reason {
            return write!(f, "container {id} was destroyed: {reason}");
        }
        if let Some(err) = &self.boot_error {
            return write!(f, "container {id} failed to start: {err}");
        }
        if self.oom_killed {
            return write!(
                f,
                "container {id} ran out of memory and was killed (exit code {})",
                self.code
            );
        }
        if !self.known {
            return write!(
                f,
                "container {id} exited, but its exit status was lost with its keeper process \
                 (exit code {})",
                self.code
            );
        }
        match self.signal {
            Some(s) => write!(
                f,
                "container {id} was killed by signal {s} (exit code {})",
                self.code
            ),
            None => write!(f, "container {id} exited with code {}", self.code),
        }
    }
}

/// Waits until the process behind `pidfd` has exited. It need not be our child.
pub async fn exited(pidfd: &AsyncFd<OwnedFd>) -> io::Result<()> {
    pidfd.readable().await.map(|_| ())
}

/// Waits, blocking the thread, until the process behind `pidfd`, a child of ours, exits,
/// and reaps it.
pub fn wait_blocking(pidfd: BorrowedFd<'_>) -> io::Result<ExitStatus> {
    // SAFETY: siginfo_t is plain data; zero is a valid value and waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waitid on a pidfd the caller holds, into a live siginfo_t.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        if r == 0 {
            // SAFETY: waitid succeeded, so si_status is set.
            let status = unsafe { info.si_status() };
            return Ok(match info.si_code {
                libc::CLD_EXITED => ExitStatus::Code(status),
                _ => ExitStatus::Signal(status),
            });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Reaps the process, a child of ours, if it has exited.
pub fn try_reap(pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; zero is a valid value and waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on a pidfd we own, writing into `info`.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` for a child-state change (or left it zeroed).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ExitStatus::Code(status),
        _ => ExitStatus::Signal(status),
    }))
}

/// Sends signal `sig` to the process behind `pidfd`, with kill(2) semantics.
pub fn send_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: ExitStatus) -> Outcome {
        Outcome {
            status,
            oom_killed: false,
            destroyed: false,
            reason: None,
            boot_error: None,
            started_at: std::time::UNIX_EPOCH,
            exited_at: std::time::UNIX_EPOCH,
        }
    }

    #[test]
    fn exit_codes_map_like_a_shell() {
        assert_eq!(ExitStatus::Code(3).code(), 3);
        assert_eq!(ExitStatus::Signal(15).code(), 143);
        assert_eq!(ExitStatus::Signal(9).code(), 137);
    }

    #[test]
    fn destroy_without_reason_is_success() {
        let mut o = outcome(ExitStatus::Signal(9));
        o.destroyed = true;
        assert!(o.result("a").is_ok());
        o.reason = Some("maintenance".into());
        let err = o.result("a").unwrap_err();
        assert_eq!(err.to_string(), "container a was destroyed: maintenance");
        assert_eq!(err.code, 137);
    }

    #[test]
    fn nonzero_exit_is_an_error() {
        assert!(outcome(ExitStatus::Code(0)).result("a").is_ok());
        let err = outcome(ExitStatus::Code(3)).result("a").unwrap_err();
        assert_eq!(err.to_string(), "container a exited with code 3");
    }
}
