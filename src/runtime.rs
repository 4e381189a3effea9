//! The runtime: configuration shared by all containers, and the registry of them by id.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

use crate::network::AddressPool;
use crate::{Container, Error, Result, state};

/// How a [`Runtime`] is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Per-container state and logs live below it (mode 0700).
    pub state_dir: PathBuf,
    /// The cgroup below which every container's cgroup is made. silo creates it when
    /// missing and never creates, writes or removes cgroups outside it.
    pub cgroup_parent: String,
    /// Where containers' veth addresses come from.
    pub address_pool: AddressPool,
    /// The size at which a container's log file is rotated (at most twice this is kept).
    pub log_limit: u64,
    /// The interface containers with internet go out of, masqueraded behind its address.
    /// `None`: the interface of the IPv4 default route when such a container starts.
    pub uplink: Option<String>,
    /// The nameservers in the /etc/resolv.conf of containers with internet. `None`: the
    /// host's own, less those a container cannot reach (loopback, link-local), or public
    /// ones when none is left.
    pub resolvers: Option<Vec<Ipv4Addr>>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            state_dir: PathBuf::from("/run/silo"),
            cgroup_parent: "/silo".into(),
            address_pool: AddressPool::default(),
            log_limit: 8 << 20,
            uplink: None,
            resolvers: None,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) config: RuntimeConfig,
}

/// Hands out [`Container`] handles by id; the same id always gives the same container.
pub struct Runtime {
    shared: Arc<Shared>,
    containers: Mutex<HashMap<String, Container>>,
}

impl Runtime {
    /// Sets up the runtime, picking up what an earlier runtime on the same state directory
    /// left when it died: its running containers are adopted, those that exited meanwhile
    /// are torn down and keep their outcome, and half-made starts are removed (see
    /// `Container::recover`). Containers of another live runtime there are left alone.
    /// Adopting needs a tokio runtime: call this inside one.
    pub fn new(config: RuntimeConfig) -> Result<Runtime> {
        crate::cgroup::normalize(&config.cgroup_parent)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .map_err(|source| Error::Io {
                id: String::new(),
                what: format!("create state directory {}", config.state_dir.display()),
                source,
            })?;
        let shared = Arc::new(Shared { config });
        let containers = recover(&shared)?;
        Ok(Runtime {
            shared,
            containers: Mutex::new(containers),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.shared.config
    }

    /// The container with this id, made on first use.
    pub fn container(&self, id: &str) -> Result<Container> {
        if !valid_id(id) {
            return Err(Error::InvalidId(id.to_string()));
        }
        if id == crate::image::STORE_DIR {
            return Err(Error::ReservedId(id.to_string()));
        }
        let mut map = self
            .containers
            .lock()
            .expect("registry lock is never poisoned");
        Ok(map
            .entry(id.to_string())
            .or_insert_with(|| Container::new(id.to_string(), self.shared.clone()))
            .clone())
    }

    /// Every container handed out so far.
    pub fn containers(&self) -> Vec<Container> {
        let map = self
            .containers
            .lock()
            .expect("registry lock is never poisoned");
        map.values().cloned().collect()
    }
}

/// The containers an earlier runtime left in the state directory: those running are
/// adopted, and those that exited meanwhile are torn down and keep their outcome. Then the
/// firewall state of every host end that is gone is collected.
fn recover(shared: &Arc<Shared>) -> Result<HashMap<String, Container>> {
    let dir = &shared.config.state_dir;
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        id: String::new(),
        what: format!("read state directory {}", dir.display()),
        source,
    })?;
    let mut containers = HashMap::new();
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !valid_id(&id) || !entry.path().is_dir() {
            continue;
        }
        let dir = entry.path();
        let owner = match state::Owner::take(&dir) {
            Ok(Some(owner)) => owner,
            Ok(None) => {
                debug!(container = %id, "owned by another live runtime; leaving it alone");
                continue;
            }
            Err(e) => {
                warn!(container = %id, error = %e, "cannot lock the state directory");
                continue;
            }
        };
        let record = match state::Record::load(&dir) {
            Ok(record) => record,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if state::unrecorded(&dir) {
                    // A start that died before writing its record made nothing yet.
                    debug!(container = %id, "removing an unrecorded start");
                    let _ = std::fs::remove_dir_all(&dir);
                } else {
                    debug!(dir = %dir.display(), "not a container's state directory");
                }
                continue;
            }
            Err(e) => {
                match state::Record::quarantine(&shared.config.state_dir, &id) {
                    Ok(to) => warn!(container = %id, error = %e, moved_to = %to.display(),
                                    "unreadable container record: its container is not managed"),
                    Err(e2) => warn!(container = %id, error = %e, move_error = %e2,
                                     "unreadable container record"),
                }
                continue;
            }
        };
        // One container that cannot be recovered must not keep the runtime from starting:
        // it is left as it is, for an operator to look at.
        match Container::recover(id.clone(), shared.clone(), record, owner) {
            Ok(Some(c)) => {
                containers.insert(id, c);
            }
            Ok(None) => {}
            Err(e @ Error::Unsupported(_)) => return Err(e),
            Err(e) => warn!(container = %id, error = %e, "cannot recover the container"),
        }
    }
    match crate::firewall::collect_garbage() {
        // Without nft there can be no table to clean.
        Ok(()) | Err(crate::firewall::Error::NftMissing) => {}
        Err(e) => warn!(error = %e, "failed to collect stale firewall state"),
    }
    Ok(containers)
}

/// Ids become file and cgroup names: 1 to 64 of `[A-Za-z0-9_.-]`, starting alphanumeric.
pub(crate) fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("web-1"));
        assert!(valid_id("a.b_c"));
        assert!(!valid_id(""));
        assert!(!valid_id("-x"));
        assert!(!valid_id("../x"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"x".repeat(65)));
    }
}
