//! What a container leaves in its state directory, so that a runtime started after the
//! last one died (a crash of the embedding program, a SIGKILL of the daemon) finds its
//! containers again: it adopts those still running and cleans up after the rest.
//!
//! Two files per container: `container.json`, the [`Record`] of what its start made and how
//! far it got, replaced atomically at each step; and `exit`, the fixed-size
//! [`ExitRecord`](crate::monitor::ExitRecord) its keeper writes when the init exits.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::monitor::{ExitRecord, ExitStatus, Outcome};
use crate::network::Link;

pub(crate) const RECORD_FILE: &str = "container.json";
pub(crate) const EXIT_FILE: &str = "exit";
const LOCK_FILE: &str = "lock";
/// What a start may write before its record, and nothing else does.
const BEFORE_RECORD: &[&str] = &["resolv.conf", LOCK_FILE];

/// Held by the runtime that owns a container, for as long as the container's state
/// directory exists. The kernel lets go of it when that runtime dies, which is how a
/// runtime started later tells a container it must adopt from one that another live
/// runtime (a concurrent `silo run`, say) still owns.
#[derive(Debug)]
pub(crate) struct Owner(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl Owner {
    /// Takes the container in `dir`, unless a live runtime holds it (`None`).
    pub(crate) fn take(dir: &Path) -> std::io::Result<Option<Owner>> {
        use nix::fcntl::{Flock, FlockArg};
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Owner(lock))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(errno.into()),
        }
    }
}

/// Whether `dir` holds only what a start writes before its record: what it leaves when it
/// dies before writing one.
pub(crate) fn unrecorded(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().all(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|name| BEFORE_RECORD.contains(&name))
        })
    })
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Proc {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: clock ticks after boot.
    pub start_time: u64,
}

impl Proc {
    /// The live (not zombie) process `pid`.
    pub(crate) fn of(pid: u32) -> Option<Proc> {
        Some(Proc {
            pid,
            start_time: process_start_time(pid)?,
        })
    }

    /// A pidfd of this very process, while it lives. The pidfd is opened before the start
    /// time is checked, so a pid reused in between cannot slip through.
    pub(crate) fn open(&self) -> Option<OwnedFd> {
        let pidfd = crate::spawn::pidfd_open(self.pid).ok()?;
        (process_start_time(self.pid) == Some(self.start_time)).then_some(pidfd)
    }
}

/// How far a container's run has got.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub(crate) enum Phase {
    /// A start is under way; only its cgroup may exist yet. Its init, if cloned, dies by
    /// itself when the runtime does, before it was released.
    Starting,
    Running,
    Exited {
        outcome: Outcome,
    },
}

/// The container's record in its state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Record {
    #[serde(flatten)]
    pub phase: Phase,
    pub started_at: SystemTime,
    /// The parent the cgroup was made below: a later runtime may be configured otherwise.
    pub cgroup_parent: String,
    /// The cgroup silo made, below `cgroup_parent`; `None` once it is removed.
    pub cgroup: Option<String>,
    pub init: Option<Proc>,
    pub keeper: Option<Proc>,
    /// The keeper's descriptor number for the log pipe's read end.
    pub log_fd: Option<i32>,
    pub address: Option<IpAddr>,
    /// The veth pair, with the host end's interface index: a later veth with the same name
    /// has another one and is not ours.
    pub link: Option<(Link, u32)>,
}

impl Record {
    pub(crate) fn starting(cgroup_parent: &str, cgroup: &str) -> Record {
        Record {
            phase: Phase::Starting,
            started_at: SystemTime::now(),
            cgroup_parent: cgroup_parent.to_string(),
            cgroup: Some(cgroup.to_string()),
            init: None,
            keeper: None,
            log_fd: None,
            address: None,
            link: None,
        }
    }

    /// The run has ended and its teardown is done: nothing is left to adopt or remove.
    pub(crate) fn exited(&mut self, outcome: Outcome) {
        self.phase = Phase::Exited { outcome };
        self.cgroup = None;
        self.init = None;
        self.keeper = None;
        self.log_fd = None;
        self.link = None;
    }

    /// Replaces the record in `dir` atomically: a crash leaves the old one or the new one.
    pub(crate) fn save(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).expect("a record serializes");
        let tmp = dir.join(".container.json.new");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, dir.join(RECORD_FILE))
    }

    /// Moves a state directory whose record cannot be read out of the way, below
    /// `.damaged/` in the state directory, for an operator to look at: nothing of it can be
    /// cleaned up without the record, and a new start must not take it for its own.
    pub(crate) fn quarantine(state_dir: &Path, id: &str) -> std::io::Result<std::path::PathBuf> {
        let damaged = state_dir.join(".damaged");
        std::fs::create_dir_all(&damaged)?;
        let stamp = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let to = damaged.join(format!("{id}-{stamp}"));
        std::fs::rename(state_dir.join(id), &to)?;
        Ok(to)
    }

    pub(crate) fn load(dir: &Path) -> std::io::Result<Record> {
        let json = std::fs::read(dir.join(RECORD_FILE))?;
        serde_json::from_slice(&json).map_err(std::io::Error::other)
    }
}

/// Writes a pending exit record, which the keeper later overwrites in place, and returns
/// the file open for writing.
pub(crate) fn create_exit_record(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    let mut file = std::fs::File::create(dir.join(EXIT_FILE))?;
    file.write_all(&ExitRecord::PENDING.to_bytes())?;
    Ok(file)
}

/// How the init ended, as its keeper recorded it, and when.
pub(crate) fn read_exit_record(dir: &Path) -> (ExitStatus, SystemTime) {
    let path = dir.join(EXIT_FILE);
    let status = std::fs::read(&path).map_or(ExitStatus::Unknown, |b| ExitRecord::status_from(&b));
    // The keeper's write is the last change to the file: its time is the exit's.
    let at = match status {
        ExitStatus::Unknown => None,
        _ => std::fs::metadata(&path).and_then(|m| m.modified()).ok(),
    };
    (status, at.unwrap_or_else(SystemTime::now))
}

/// Field 22 of /proc/PID/stat, while the process lives: a zombie counts as dead, having
/// let go of its namespaces already.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after it do not.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_tell_live_processes_apart() {
        let me = std::process::id();
        let start = process_start_time(me).expect("this process lives");
        assert_eq!(process_start_time(me), Some(start));
        // Above the kernel's pid limit: never a process.
        assert_eq!(process_start_time(1 << 23), None);
        let stale = Proc {
            pid: me,
            start_time: start + 1,
        };
        assert!(stale.open().is_none(), "a reused pid must not be opened");
        assert!(Proc::of(me).unwrap().open().is_some());
    }

    #[test]
    fn exit_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        create_exit_record(dir.path()).unwrap();
        assert_eq!(read_exit_record(dir.path()).0, ExitStatus::Unknown);
        let done = ExitRecord::new(libc::CLD_KILLED, libc::SIGTERM);
        std::fs::write(dir.path().join(EXIT_FILE), done.to_bytes()).unwrap();
        assert_eq!(
            read_exit_record(dir.path()).0,
            ExitStatus::Signal(libc::SIGTERM)
        );
    }
}
