//! One control group per container, always below the runtime's own parent (default `/silo`).
//!
//! Hosts come in three layouts: cgroup v1, hybrid (v1 controllers plus an empty cgroup2
//! mount) and unified v2. Hybrid behaves like v1 for everything silo does, because the
//! controllers that limit memory, cpu and pids live on the v1 hierarchies there. The layout
//! is detected once per process, at run time.
//!
//! silo never writes to a cgroup it did not create: on v2 it does not enable controllers in
//! the root (systemd or the administrator has done so), it only enables them in its own
//! parent, and it refuses to reuse a cgroup directory that already exists.

use std::fs;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cgroups_rs::CgroupPid;
use cgroups_rs::fs::hierarchies::{self, V1, V2};
use cgroups_rs::fs::{Cgroup as Group, Hierarchy, MaxValue, Resources};
use tracing::debug;

const V2_ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers a container's cgroup is made in. `freezer` lets [`Cgroup::kill_all`]
/// stop a fork race when the container shares the host's pid namespace.
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "freezer"];

/// The v2 controllers silo enables below its parent.
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];

/// Errors from creating, filling or removing a container's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cgroup {0} already exists; silo only uses cgroups it creates")]
    Exists(String),
    #[error("cgroup {path} would be inside {ancestor}, which holds processes")]
    Occupied { path: String, ancestor: String },
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("cannot limit cgroup {path}: the {controller} controller is not available here")]
    MissingController {
        controller: &'static str,
        path: String,
    },
    #[error("failed to {what} cgroup {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to {what} cgroup {path}: {source}")]
    Cgroups {
        what: &'static str,
        path: String,
        #[source]
        source: cgroups_rs::fs::error::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which cgroup layout the host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Controllers on v1 hierarchies (including hybrid hosts).
    V1,
    /// One unified v2 hierarchy at /sys/fs/cgroup.
    V2,
}

impl Layout {
    pub fn detect() -> Layout {
        if hierarchies::is_cgroup2_unified_mode() {
            Layout::V2
        } else {
            Layout::V1
        }
    }
}

/// Resource limits for one container; `None` leaves the kernel default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<i64>,
    pub memory_reservation_bytes: Option<i64>,
    pub memory_swap_bytes: Option<i64>,
    /// CPU time allowed per period, in microseconds.
    pub cpu_quota_us: Option<i64>,
    pub cpu_period_us: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub pids: Option<i64>,
    /// The pids limit is silo's own default rather than asked for: on a host that does not
    /// delegate the pids controller it is skipped instead of failing the start.
    pub pids_is_default: bool,
}

/// A container's cgroup.
pub struct Cgroup {
    /// Path below the hierarchy root, without a leading slash: `silo/web-1`.
    path: String,
    /// The owned parent (`silo`): directories between it and `path` were made for this
    /// cgroup and go with it when empty.
    parent: String,
    layout: Layout,
    group: Group,
}

impl std::fmt::Debug for Cgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cgroup(/{} {:?})", self.path, self.layout)
    }
}

/// Checks a cgroup path given by a caller and returns it without its leading slash.
pub fn normalize(path: &str) -> Result<String> {
    let trimmed = path.trim_matches('/');
    let invalid = |reason| Error::InvalidPath {
        path: path.to_string(),
        reason,
    };
    if trimmed.is_empty() {
        return Err(invalid("it names the root"));
    }
    for part in trimmed.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(invalid("it has an empty, '.' or '..' component"));
        }
    }
    Ok(trimmed.to_string())
}

impl Cgroup {
    /// Creates the cgroup `rel` below the owned `parent` (both relative to the hierarchy
    /// root, e.g. `silo` and `web-1`) with `limits`. Fails if it already exists. On any
    /// failure, nothing is left behind.
    pub fn create(parent: &str, rel: &str, limits: &Limits) -> Result<Cgroup> {
        let layout = Layout::detect();
        let parent = normalize(parent)?;
        let path = normalize(&format!("{parent}/{}", rel.trim_start_matches('/')))?;
        // Below another container's cgroup the new one would share its limits and keep it
        // from being removed: only empty directories may stand between.
        let mut ancestor = Path::new(&path).parent();
        while let Some(dir) = ancestor.filter(|d| *d != Path::new(&parent)) {
            let dir_str = dir.to_string_lossy();
            let busy = dirs(layout, &dir_str).iter().any(|d| {
                fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
            });
            if busy {
                return Err(Error::Occupied {
                    path: format!("/{path}"),
                    ancestor: format!("/{dir_str}"),
                });
            }
            ancestor = dir.parent();
        }
        let mut cgroup = match layout {
            Layout::V2 => create_v2(&path)?,
            Layout::V1 => create_v1(&path)?,
        };
        cgroup.parent = parent;
        if let Err(e) = cgroup.apply(limits) {
            let _ = cgroup.remove();
            return Err(e);
        }
        debug!(cgroup = %cgroup.path, ?layout, "cgroup created");
        Ok(cgroup)
    }

    /// A handle on an existing cgroup that silo created earlier below `parent`, for
    /// instance before a restart.
    pub fn open(parent: &str, rel: &str) -> Result<Cgroup> {
        let layout = Layout::detect();
        let parent = normalize(parent)?;
        let path = normalize(&format!("{parent}/{}", rel.trim_start_matches('/')))?;
        Ok(Cgroup {
            group: load(layout, &path),
            path,
            parent,
            layout,
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The path below the hierarchy root, with a leading slash, as /proc/PID/cgroup shows it.
    pub fn path(&self) -> String {
        format!("/{}", self.path)
    }

    /// On v2, a directory fd for `clone3(CLONE_INTO_CGROUP)`, which places the child in the
    /// cgroup atomically, before it runs a single instruction.
    pub fn dir_fd(&self) -> Result<Option<OwnedFd>> {
        if self.layout != Layout::V2 {
            return Ok(None);
        }
        let dir = Path::new(V2_ROOT).join(&self.path);
        let file = fs::File::open(&dir).map_err(|source| self.io("open", source))?;
        Ok(Some(file.into()))
    }

    /// Moves process `pid` into this cgroup, in every controller.
    pub fn add(&self, pid: u32) -> Result<()> {
        self.group
            .add_task_by_tgid(CgroupPid::from(u64::from(pid)))
            .map_err(|source| self.cgroups("add a process to", source))
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        // cgroups-rs skips limits whose controller the cgroup lacks; silo refuses instead,
        // so that a container never runs without a limit it was given.
        let has = |name: &str| {
            self.group
                .subsystems()
                .iter()
                .any(|s| s.controller_name() == name)
        };
        let wanted = [
            (
                "memory",
                limits.memory_bytes.is_some() || limits.memory_swap_bytes.is_some(),
            ),
            (
                "cpu",
                limits.cpu_quota_us.is_some() || limits.cpu_shares.is_some(),
            ),
            ("pids", limits.pids.is_some() && !limits.pids_is_default),
        ];
        if let Some((controller, _)) = wanted.iter().find(|(c, want)| *want && !has(c)) {
            return Err(Error::MissingController {
                controller,
                path: self.path(),
            });
        }
        let mut res = Resources::default();
        res.memory.memory_hard_limit = limits.memory_bytes;
        res.memory.memory_soft_limit = limits.memory_reservation_bytes;
        res.memory.memory_swap_limit = limits.memory_swap_bytes;
        res.cpu.quota = limits.cpu_quota_us;
        res.cpu.period = limits.cpu_period_us;
        res.cpu.shares = limits.cpu_shares;
        res.pid.maximum_number_of_processes = limits.pids.map(MaxValue::Value);
        self.group
            .apply(&res)
            .map_err(|source| self.cgroups("apply limits to", source))
    }

    /// The processes in the cgroup.
    pub fn procs(&self) -> Vec<u32> {
        self.group
            .procs()
            .into_iter()
            .map(|p| p.pid as u32)
            .collect()
    }

    /// Whether the kernel's OOM killer has killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let file = match self.layout {
            Layout::V2 => Path::new(V2_ROOT).join(&self.path).join("memory.events"),
            Layout::V1 => match v1_mounts(&["memory"]).first() {
                Some(mount) => mount.join(&self.path).join("memory.oom_control"),
                None => return false,
            },
        };
        let Ok(text) = fs::read_to_string(&file) else {
            return false;
        };
        text.lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
    }

    /// Kills every process in the cgroup and waits (briefly) until it is empty.
    ///
    /// A container in its own pid namespace dies as a whole with its init, so this matters
    /// for containers that share a pid namespace, and as a guard against processes that
    /// something else put into the cgroup.
    pub fn kill_all(&self) -> Result<()> {
        if self.layout == Layout::V2 && self.group.kill().is_ok() {
            return self.wait_empty();
        }
        // An empty cgroup stays empty: nothing in it is left to fork. This is the common case
        // once an init with a pid namespace of its own has exited, and it spares a freeze.
        if self.procs().is_empty() {
            return Ok(());
        }
        // v1 has no cgroup.kill: freeze first so nothing forks between reading the list
        // and killing it, kill everything, then thaw so the kill can be delivered.
        let freezer = self
            .group
            .controller_of::<cgroups_rs::fs::freezer::FreezerController>();
        if let Some(f) = freezer {
            let _ = f.freeze();
        }
        for pid in self.procs() {
            // SAFETY: kill(2) with a pid read from our own cgroup; the only harm of a stale
            // pid is hitting a process that took it over, which cannot happen while the
            // cgroup is frozen and the pid is still listed.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        if let Some(f) = freezer {
            let _ = f.thaw();
        }
        self.wait_empty()
    }

    /// Freezes (or thaws) every process of the cgroup: runc's `pause` and `resume`.
    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        let what = if frozen { "freeze" } else { "thaw" };
        if self.layout == Layout::V2 {
            let file = Path::new(V2_ROOT).join(&self.path).join("cgroup.freeze");
            return fs::write(file, if frozen { "1" } else { "0" })
                .map_err(|source| self.io(what, source));
        }
        let freezer = self
            .group
            .controller_of::<cgroups_rs::fs::freezer::FreezerController>()
            .ok_or_else(|| Error::MissingController {
                controller: "freezer",
                path: self.path(),
            })?;
        let done = if frozen {
            freezer.freeze()
        } else {
            freezer.thaw()
        };
        done.map_err(|source| self.cgroups(what, source))
    }

    /// Whether the cgroup is frozen.
    pub fn frozen(&self) -> bool {
        if self.layout == Layout::V2 {
            let file = Path::new(V2_ROOT).join(&self.path).join("cgroup.events");
            return fs::read_to_string(file).is_ok_and(|t| t.lines().any(|l| l == "frozen 1"));
        }
        self.group
            .controller_of::<cgroups_rs::fs::freezer::FreezerController>()
            .and_then(|f| f.state().ok())
            .is_some_and(|s| matches!(s, cgroups_rs::FreezerState::Frozen))
    }

    fn wait_empty(&self) -> Result<()> {
        for _ in 0..200 {
            if self.procs().is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(self.io(
            "empty",
            std::io::Error::new(ErrorKind::TimedOut, "processes survived SIGKILL for 1s"),
        ))
    }

    /// Removes the cgroup. A cgroup that is already gone counts as removed. The kernel may
    /// answer EBUSY for a moment after the last process was reaped, so this retries briefly.
    pub fn remove(&self) -> Result<()> {
        let mut last = None;
        for attempt in 0..50 {
            match self.remove_dirs() {
                Ok(()) => {
                    debug!(cgroup = %self.path, "cgroup removed");
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::ResourceBusy => last = Some(e),
                Err(e) => return Err(self.io("remove", e)),
            }
            std::thread::sleep(Duration::from_millis(1 + attempt));
        }
        Err(self.io("remove", last.expect("the loop ran at least once")))
    }

    fn remove_dirs(&self) -> std::io::Result<()> {
        for dir in dirs(self.layout, &self.path) {
            match fs::remove_dir(&dir) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        // Intermediate directories (from a bundle's nested cgroupsPath) go too once empty;
        // one still in use by a sibling container answers EBUSY or ENOTEMPTY and stays.
        let mut path = Path::new(&self.path).parent();
        while let Some(p) =
            path.filter(|p| p.starts_with(&self.parent) && *p != Path::new(&self.parent))
        {
            for dir in dirs(self.layout, &p.to_string_lossy()) {
                let _ = fs::remove_dir(dir);
            }
            path = p.parent();
        }
        Ok(())
    }

    fn io(&self, what: &'static str, source: std::io::Error) -> Error {
        Error::Io {
            what,
            path: self.path(),
            source,
        }
    }

    fn cgroups(&self, what: &'static str, source: cgroups_rs::fs::error::Error) -> Error {
        Error::Cgroups {
            what,
            path: self.path(),
            source,
        }
    }
}

/// Every directory that makes up cgroup `path` on this layout.
fn dirs(layout: Layout, path: &str) -> Vec<PathBuf> {
    match layout {
        Layout::V2 => vec![Path::new(V2_ROOT).join(path)],
        Layout::V1 => v1_mounts(V1_CONTROLLERS)
            .into_iter()
            .map(|mount| mount.join(path))
            .collect(),
    }
}

/// Mount points of the v1 hierarchies that carry any of `controllers`, each once (cpu and
/// cpuacct often share one).
fn v1_mounts(controllers: &[&str]) -> Vec<PathBuf> {
    hierarchies::mountinfo_self()
        .into_iter()
        .filter(|m| m.fs_type.0 == "cgroup")
        .filter(|m| {
            controllers
                .iter()
                .any(|c| m.super_opts.iter().any(|o| o == c))
        })
        .map(|m| m.mount_point)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn load(layout: Layout, path: &str) -> Group {
    let controllers: Vec<String> = match layout {
        Layout::V1 => V1_CONTROLLERS.iter().map(|c| c.to_string()).collect(),
        Layout::V2 => V2_CONTROLLERS.iter().map(|c| c.to_string()).collect(),
    };
    let hier: Box<dyn Hierarchy> = match layout {
        Layout::V1 => Box::new(V1::new()),
        Layout::V2 => Box::new(V2::new()),
    };
    Group::load_with_specified_controllers(hier, path, controllers)
}

fn create_v1(path: &str) -> Result<Cgroup> {
    let existing = dirs(Layout::V1, path).into_iter().find(|d| d.exists());
    if existing.is_some() {
        return Err(Error::Exists(format!("/{path}")));
    }
    let cgroup = Cgroup {
        group: load(Layout::V1, path),
        path: path.to_string(),
        parent: path.to_string(),
        layout: Layout::V1,
    };
    for dir in dirs(Layout::V1, path) {
        if let Err(source) = fs::create_dir_all(&dir) {
            let _ = cgroup.remove();
            return Err(cgroup.io("create", source));
        }
    }
    Ok(cgroup)
}

/// Creates every missing directory of `path` below the v2 root, enabling silo's controllers
/// in the directories on the way (which silo owns) but never in the root itself.
fn create_v2(path: &str) -> Result<Cgroup> {
    let root = Path::new(V2_ROOT);
    let leaf = root.join(path);
    if leaf.exists() {
        return Err(Error::Exists(format!("/{path}")));
    }
    let available = fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
    let wanted: Vec<&str> = V2_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    let enable: String = wanted.iter().map(|c| format!("+{c} ")).collect();

    let mut dir = root.to_path_buf();
    let parts: Vec<&str> = path.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        dir.push(part);
        let io = |what, source| Error::Io {
            what,
            path: format!("/{path}"),
            source,
        };
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists && i + 1 < parts.len() => {}
            Err(e) => return Err(io("create", e)),
        }
        if i + 1 < parts.len() && !enable.is_empty() {
            fs::write(dir.join("cgroup.subtree_control"), enable.trim_end())
                .map_err(|e| io("enable controllers for", e))?;
        }
    }
    Ok(Cgroup {
        group: load(Layout::V2, path),
        path: path.to_string(),
        parent: path.to_string(),
        layout: Layout::V2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_refuses_escapes() {
        assert_eq!(normalize("/silo/a").unwrap(), "silo/a");
        assert!(normalize("/").is_err());
        assert!(normalize("/silo/../etc").is_err());
        assert!(normalize("silo//a").is_err());
    }
}
