//! A container's standard output and error, drained from a pipe into a capped log file.
//!
//! The runtime always reads the pipe, so a container writing as fast as it can never blocks
//! on it, whether or not anyone reads the log. When the file reaches its cap it becomes
//! `log.1` (replacing the previous one) and a new file starts, so at most twice the cap is
//! kept on disk.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tracing::warn;

/// The log's file name in the container's state directory.
pub const FILE: &str = "log";
/// [`FILE`], for raw syscalls.
pub(crate) const FILE_C: &std::ffi::CStr = c"log";

/// Copies everything from `reader` to the log file at `path` until every writer is gone.
pub async fn drain(reader: OwnedFd, path: PathBuf, cap: u64) {
    let mut rx = match pipe::Receiver::from_owned_fd(reader) {
        Ok(rx) => rx,
        Err(e) => {
            warn!(error = %e, "cannot read the container's output");
            return;
        }
    };
    let mut log = Log::open(&path, cap);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => log.write(&buf[..n]),
            Err(e) => {
                warn!(error = %e, "reading the container's output failed");
                break;
            }
        }
    }
}

/// The log file. Write errors (a full disk, say) are reported once and the output is then
/// dropped: losing log lines is better than stalling the container.
struct Log {
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
    cap: u64,
    failed: bool,
}

impl Log {
    fn open(path: &Path, cap: u64) -> Log {
        let mut log = Log {
            path: path.to_path_buf(),
            file: None,
            size: 0,
            cap: cap.max(1),
            failed: false,
        };
        log.reopen();
        log
    }

    fn reopen(&mut self) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path);
        match file {
            Ok(f) => {
                self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                self.file = Some(f);
            }
            Err(e) => self.fail(e),
        }
    }

    fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.size >= self.cap {
                let _ = std::fs::rename(&self.path, self.path.with_extension("1"));
                self.reopen();
            }
            let room = (self.cap - self.size.min(self.cap)).max(1) as usize;
            let (now, rest) = data.split_at(room.min(data.len()));
            let Some(file) = self.file.as_mut() else {
                return;
            };
            match file.write_all(now) {
                Ok(()) => self.size += now.len() as u64,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
            data = rest;
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        if !self.failed {
            warn!(path = %self.path.display(), error = %e, "cannot write the container log");
            self.failed = true;
        }
        self.file = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_name_is_the_name() {
        assert_eq!(FILE_C.to_str(), Ok(FILE));
    }

    #[test]
    fn log_rotates_at_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let mut log = Log::open(&path, 10);
        log.write(b"0123456789abcdef");
        log.write(b"XYZ");
        let read = |p: &Path| String::from_utf8(std::fs::read(p).unwrap()).unwrap();
        assert_eq!(read(&path.with_extension("1")), "0123456789");
        assert_eq!(read(&path), "abcdefXYZ");
        // The next rotation replaces the previous file: at most twice the cap is kept.
        log.write(b"0123");
        assert_eq!(read(&path.with_extension("1")), "abcdefXYZ0");
        assert_eq!(read(&path), "123");
    }
}
