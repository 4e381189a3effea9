//! What runc mode keeps of a container between commands: `state.json` in the container's
//! directory below `--root`, replaced atomically, and the exec FIFO whose presence says
//! that the container is created but not yet started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::cgroup::Cgroup;
use crate::state::Proc;

const STATE_FILE: &str = "state.json";
/// Written before `create` makes the cgroup, so that a create killed half-way leaves
/// enough for `delete --force` to remove it.
const CREATING_FILE: &str = "creating.json";
pub(super) const FIFO: &str = "exec.fifo";

/// The OCI status of a container, as `state` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let word = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        };
        f.write_str(word)
    }
}

/// One container's saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// The init, told apart from a later process with its pid by its start time.
    pub init: Proc,
    /// The container's cgroup, below `cgroup_parent`.
    pub cgroup: String,
    pub cgroup_parent: String,
    pub created: SystemTime,
    pub annotations: BTreeMap<String, String>,
    /// The bundle's hooks, for `start` and `delete`, which do not read the bundle again.
    pub hooks: Option<oci_spec::runtime::Hooks>,
}

/// The cgroup of a create under way.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Creating {
    pub cgroup: String,
    pub cgroup_parent: String,
}

/// What `state` prints and hooks read on stdin: the OCI state, plus runc's extra fields
/// (`rootfs`, `created`, `owner`) that the shims read.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report<'a> {
    pub oci_version: &'static str,
    pub id: &'a str,
    pub pid: u32,
    pub status: Status,
    pub bundle: &'a Path,
    pub rootfs: &'a Path,
    pub created: String,
    pub owner: &'static str,
    pub annotations: &'a BTreeMap<String, String>,
}

/// The OCI runtime specification version silo implements.
pub const OCI_VERSION: &str = "1.2.0";

/// A container directory below the root.
pub struct Dir {
    pub path: PathBuf,
    pub id: String,
}

impl Dir {
    pub fn new(root: &Path, id: &str) -> Result<Dir> {
        if !crate::runtime::valid_id(id) {
            return Err(Error::InvalidId(id.to_string()));
        }
        Ok(Dir {
            path: root.join(id),
            id: id.to_string(),
        })
    }

    /// Takes the container for a command that changes it, waiting for one that has it:
    /// `create`, `start`, `delete`, `pause` and `resume` take turns. The kernel lets go
    /// when the command exits. `None` when the container has no directory.
    pub fn lock(&self) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
        let dir = match std::fs::File::open(&self.path) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("open its state directory", e)),
        };
        nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
            .map(Some)
            .map_err(|(_, e)| self.io("lock its state directory", e.into()))
    }

    pub fn fifo(&self) -> PathBuf {
        self.path.join(FIFO)
    }

    pub fn load(&self) -> Result<Saved> {
        let text = match std::fs::read(self.path.join(STATE_FILE)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotExist(self.id.clone()));
            }
            Err(e) => return Err(self.io("read the state", e)),
        };
        serde_json::from_slice(&text).map_err(|e| self.io("parse the state", e.into()))
    }

    /// Records the cgroup a create is about to make.
    pub fn creating(&self, cgroup: &Creating) -> Result<()> {
        let json = serde_json::to_vec(cgroup).expect("a cgroup path serializes");
        write_atomic(&self.path.join(CREATING_FILE), &json)
            .map_err(|e| self.io("record its cgroup", e))
    }

    /// What a create that never finished recorded, if anything.
    pub fn unfinished(&self) -> Option<Creating> {
        let json = std::fs::read(self.path.join(CREATING_FILE)).ok()?;
        serde_json::from_slice(&json).ok()
    }

    /// Replaces the state atomically: a crash leaves the old one or the new one.
    pub fn save(&self, saved: &Saved) -> Result<()> {
        let json = serde_json::to_vec(saved).expect("a state serializes");
        write_atomic(&self.path.join(STATE_FILE), &json).map_err(|e| self.io("save the state", e))
    }

    pub fn io(&self, what: &str, source: std::io::Error) -> Error {
        Error::Io {
            id: self.id.clone(),
            what: what.to_string(),
            source,
        }
    }
}

impl Saved {
    pub fn cgroup(&self) -> Result<Cgroup> {
        Ok(Cgroup::open(&self.cgroup_parent, &self.cgroup)?)
    }

    /// The status now: stopped once the init is gone, created while its exec FIFO is
    /// there, paused while its cgroup is frozen.
    pub fn status(&self, dir: &Dir) -> Status {
        if self.init.open().is_none() {
            Status::Stopped
        } else if dir.fifo().exists() {
            Status::Created
        } else if self.cgroup().is_ok_and(|c| c.frozen()) {
            Status::Paused
        } else {
            Status::Running
        }
    }

    pub fn report(&self, status: Status) -> Report<'_> {
        Report {
            oci_version: OCI_VERSION,
            id: &self.id,
            pid: if status == Status::Stopped {
                0
            } else {
                self.init.pid
            },
            status,
            bundle: &self.bundle,
            rootfs: &self.rootfs,
            created: humantime::format_rfc3339_nanos(self.created).to_string(),
            owner: "",
            annotations: &self.annotations,
        }
    }
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
