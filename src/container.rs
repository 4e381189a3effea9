//! A container handle: start, signal, destroy, monitor, and its TCP ports.
//!
//! Lifecycle calls on one container are serialized by an async mutex, like an actor's
//! mailbox; calls on different containers never wait for each other. The current state is
//! published on a watch channel, so `running()` and `monitor()` never take that mutex and
//! any number of callers can wait for an exit at once.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime};

use oci_spec::runtime::{Mount, MountBuilder};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Mutex, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::bundle::Bundle;
use crate::cgroup::{Cgroup, Limits};
use crate::firewall::{self, Egress, EgressRule};
pub use crate::monitor::{ExitStatus, Outcome};
use crate::network::{self, Link};
use crate::port::TcpPort;
use crate::runtime::Shared;
use crate::spawn::{self, Output, Plan, Process, Report};
use crate::state::{self, Phase, Proc, Record};
use crate::{Error, Result, fault, logs, monitor};

/// Where the container's standard output and error go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Stdio {
    /// To its log file in the state directory, capped in size.
    #[default]
    Log,
    /// To the caller's own stdout and stderr (for `silo run`).
    Inherit,
}

/// A size of container, in the spirit of hosted container platforms' instance types.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Instance {
    pub vcpu: f64,
    pub memory_bytes: i64,
}

impl std::str::FromStr for Instance {
    type Err = Error;

    /// `lite`, `basic`, `standard-1` to `standard-4`, or `cpu=0.5,memory=512M`.
    fn from_str(s: &str) -> Result<Instance> {
        const MIB: i64 = 1 << 20;
        const GIB: i64 = 1 << 30;
        let named = match s {
            "lite" => Some((1.0 / 16.0, 256 * MIB)),
            "basic" => Some((0.25, GIB)),
            "standard-1" => Some((0.5, 4 * GIB)),
            "standard-2" => Some((1.0, 6 * GIB)),
            "standard-3" => Some((2.0, 8 * GIB)),
            "standard-4" => Some((4.0, 12 * GIB)),
            _ => None,
        };
        if let Some((vcpu, memory_bytes)) = named {
            return Ok(Instance { vcpu, memory_bytes });
        }
        let bad = || Error::InvalidInstance(s.to_string());
        let (mut vcpu, mut memory) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cpu", v)) => vcpu = Some(v.parse::<f64>().map_err(|_| bad())?),
                Some(("memory", v)) => memory = Some(parse_size(v).ok_or_else(bad)?),
                _ => return Err(bad()),
            }
        }
        match (vcpu, memory) {
            // "inf" and "NaN" parse as f64: an infinite share of the CPU is no limit at all.
            (Some(vcpu), Some(memory_bytes))
                if vcpu.is_finite() && vcpu > 0.0 && memory_bytes > 0 =>
            {
                Ok(Instance { vcpu, memory_bytes })
            }
            _ => Err(bad()),
        }
    }
}

/// `512M`, `1G`, `1048576`: bytes with an optional binary suffix.
fn parse_size(s: &str) -> Option<i64> {
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<i64>().ok()?.checked_mul(mult)
}

/// What to start, and how.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The OCI bundle directory (holding config.json).
    pub bundle: PathBuf,
    /// Variables set over the bundle's `process.env`.
    pub env: BTreeMap<String, String>,
    /// Replaces the bundle's `process.args` when set.
    pub entrypoint: Option<Vec<String>>,
    /// Outbound internet access through the host's uplink; off by default.
    pub enable_internet: bool,
    /// With `enable_internet`, the only destinations the container may reach (its
    /// resolvers on port 53 are added); empty means anywhere.
    pub egress: Vec<EgressRule>,
    /// CPU and memory limits, over the bundle's own.
    pub instance: Option<Instance>,
    pub stdio: Stdio,
}

/// The state every observer sees, published on a watch channel.
#[derive(Debug, Clone)]
pub(crate) enum State {
    NeverStarted,
    Running {
        pid: u32,
        /// None when the container joined a network namespace silo does not manage.
        address: Option<IpAddr>,
        started_at: SystemTime,
    },
    /// The init has exited; what it left running is being killed and its log read to the
    /// end. (The teardown that follows the published exit is tracked by `Inner::settled`.)
    Stopping,
    Exited(Arc<Outcome>),
}

/// One run of the container, from start until its teardown is done.
struct Life {
    pidfd: Arc<AsyncFd<OwnedFd>>,
    link: Option<Link>,
    /// The first reason given to `destroy`.
    reason: Arc<StdMutex<Option<String>>>,
}

pub(crate) struct Inner {
    id: String,
    shared: Arc<Shared>,
    /// Held while this runtime owns the container's state directory.
    owner: StdMutex<Option<state::Owner>>,
    life: Mutex<Option<Life>>,
    state: watch::Sender<State>,
    /// False from a start until the run's teardown is done: its exit may be published
    /// (`state`) while its cgroup and network are still being removed.
    settled: watch::Sender<bool>,
}

/// A handle on one container. Clones share the container.
#[derive(Clone)]
pub struct Container {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Container({})", self.inner.id)
    }
}

/// What a half-finished start has made, so that a failure can take it all back.
#[derive(Default)]
struct Made {
    cgroup: Option<Arc<Cgroup>>,
    link: Option<Link>,
    init: Option<Init>,
    state_dir: Option<PathBuf>,
    /// This start took ownership of the state directory.
    owned: bool,
}

/// The init's pidfd and its keeper's, both watched for exit.
#[derive(Clone)]
struct Init {
    pidfd: Arc<AsyncFd<OwnedFd>>,
    /// `None` when an adopted container's keeper was already gone.
    keeper: Option<Arc<AsyncFd<OwnedFd>>>,
    /// The stack of a keeper this runtime cloned, unmapped after the last clone of this
    /// is dropped, which is after `exited`.
    _stack: Option<Arc<spawn::KeeperStack>>,
}

impl Init {
    fn new(
        id: &str,
        pidfd: OwnedFd,
        keeper: Option<OwnedFd>,
        stack: Option<spawn::KeeperStack>,
    ) -> Result<Init> {
        let watch = |fd: OwnedFd| {
            // SAFETY: the AsyncFd owns the descriptor; nothing else closes or replaces it.
            unsafe { AsyncFd::register(fd) }
                .map(Arc::new)
                .map_err(|source| Error::Io {
                    id: id.to_string(),
                    what: "watch a pidfd".into(),
                    source: source.into(),
                })
        };
        Ok(Init {
            pidfd: watch(pidfd)?,
            keeper: keeper.map(watch).transpose()?,
            _stack: stack.map(Arc::new),
        })
    }

    /// Waits for the init to exit and its keeper after it, and reaps the keeper if it is
    /// our child (it is not when adopted from an earlier runtime).
    async fn exited(&self) {
        for fd in std::iter::once(&self.pidfd).chain(&self.keeper) {
            if let Err(e) = monitor::exited(fd).await {
                warn!(error = %e, "failed to wait for a pidfd");
            }
        }
        if let Some(keeper) = &self.keeper
            && let Err(e) = monitor::try_reap(keeper.get_ref())
            && e.raw_os_error() != Some(libc::ECHILD)
        {
            warn!(error = %e, "failed to reap the keeper");
        }
    }
}

impl Made {
    async fn undo(self, container: &Container) {
        // The veth goes first, while the still-living init holds its name (see Run::netns).
        if let Some(link) = &self.link {
            if let Err(e) = network::detach(link).await {
                warn!(error = %e, "failed to remove the veth of a failed start");
            }
            unconfine().await;
        }
        if let Some(init) = &self.init {
            let _ = monitor::send_signal(init.pidfd.get_ref(), libc::SIGKILL);
            init.exited().await;
        }
        if let Some(cgroup) = self.cgroup {
            let removed = tokio::task::spawn_blocking(move || {
                cgroup.kill_all()?;
                cgroup.remove()
            })
            .await;
            if let Ok(Err(e)) = removed {
                warn!(error = %e, "failed to remove the cgroup of a failed start");
            }
        }
        if let Some(dir) = self.state_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if self.owned {
            *container.owner() = None;
        }
    }
}

impl Container {
    pub(crate) fn new(id: String, shared: Arc<Shared>) -> Container {
        Container {
            inner: Arc::new(Inner {
                id,
                shared,
                owner: StdMutex::new(None),
                life: Mutex::new(None),
                state: watch::Sender::new(State::NeverStarted),
                settled: watch::Sender::new(true),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// True from `start` until the init process has exited.
    pub fn running(&self) -> bool {
        matches!(*self.inner.state.borrow(), State::Running { .. })
    }

    /// The init's pid (in the caller's pid namespace) while it runs.
    pub fn pid(&self) -> Option<u32> {
        match *self.inner.state.borrow() {
            State::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// When the current run started, while it runs (see [`Outcome`] for a finished run).
    pub fn started_at(&self) -> Option<SystemTime> {
        match *self.inner.state.borrow() {
            State::Running { started_at, .. } => Some(started_at),
            _ => None,
        }
    }

    /// The container's log file (standard output and error), when it logs to one.
    pub fn log_path(&self) -> PathBuf {
        self.state_dir().join(logs::FILE)
    }

    fn state_dir(&self) -> PathBuf {
        self.inner.shared.config.state_dir.join(&self.inner.id)
    }

    /// Picks up what an earlier runtime left of this container in the state directory: a
    /// running container is adopted, one whose init is gone is torn down and keeps its
    /// outcome, and a start that never finished is removed (`None`). Blocking.
    pub(crate) fn recover(
        id: String,
        shared: Arc<Shared>,
        mut record: Record,
        owner: state::Owner,
    ) -> Result<Option<Container>> {
        let container = Container::new(id, shared);
        *container.owner() = Some(owner);
        let dir = container.state_dir();
        match record.phase.clone() {
            Phase::Exited { outcome } => {
                container.publish_exit(outcome);
                return Ok(Some(container));
            }
            Phase::Starting => {
                // The init, if any, died with the runtime before it was released. The
                // cgroup may still be another runtime's, if this one crashed before making
                // it: removing only an empty one never harms that.
                if let Some(rel) = &record.cgroup {
                    let cgroup = Cgroup::open(&record.cgroup_parent, rel)?;
                    if let Err(e) = cgroup.remove() {
                        warn!(container = %container.inner.id, error = %e,
                              "left the cgroup of an unfinished start");
                    }
                }
                info!(container = %container.inner.id, "removed an unfinished start");
                let _ = std::fs::remove_dir_all(&dir);
                return Ok(None);
            }
            Phase::Running => {}
        }
        let keeper = record.keeper.and_then(|k| k.open());
        if let Some(pidfd) = record.init.and_then(|p| p.open())
            && container.adopt(record.clone(), pidfd, keeper.as_ref())?
        {
            return Ok(Some(container));
        }

        // The init is gone. Its keeper, if still there, is about to write the exit record.
        if let Some(keeper) = &keeper {
            wait_blocking(keeper, Duration::from_secs(2));
        }
        let (status, exited_at) = state::read_exit_record(&dir);
        // Teardown goes on past errors, removing what it can.
        let mut oom_killed = false;
        if let Some(rel) = &record.cgroup {
            let cgroup = Cgroup::open(&record.cgroup_parent, rel)?;
            oom_killed = cgroup.oom_killed();
            if let Err(e) = cgroup.kill_all().and_then(|()| cgroup.remove()) {
                warn!(container = %container.inner.id, error = %e, "failed to remove cgroup");
            }
        }
        if let Some((link, ifindex)) = &record.link
            && firewall::interface_index(&link.host_if) == Some(*ifindex)
        {
            // The runtime collects the firewall state of host ends that are gone once every
            // container is recovered.
            if let Err(e) = firewall::delete_veth(link) {
                warn!(container = %container.inner.id, error = %e, "failed to remove network");
            }
        }
        let outcome = Outcome {
            status,
            oom_killed,
            destroyed: false,
            reason: None,
            boot_error: None,
            started_at: record.started_at,
            exited_at,
        };
        info!(container = %container.inner.id, code = status.code(),
              "a container exited while no runtime ran");
        record.exited(outcome.clone());
        if let Err(e) = record.save(&dir) {
            // A full disk, say: the next runtime then finds the same again and cleans up
            // what is already gone, which is harmless.
            warn!(container = %container.inner.id, error = %e, "failed to record the exit");
        }
        container.publish_exit(outcome);
        Ok(Some(container))
    }

    /// Takes over a running container from its record: watches its init and keeper, takes
    /// the log pipe from the keeper and supervises it as if this runtime had started it.
    /// False when the init turns out to have died meanwhile.
    fn adopt(&self, record: Record, pidfd: OwnedFd, keeper: Option<&OwnedFd>) -> Result<bool> {
        let id = &self.inner.id;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Unsupported(
                "adopting running containers outside a tokio runtime",
            ));
        }
        let io = |what: String| {
            let id = id.clone();
            move |source| Error::Io { id, what, source }
        };
        let pid = record.init.expect("a running record names its init").pid;
        let log = match (record.log_fd, keeper) {
            (Some(fd), Some(keeper)) => match take_fd(keeper, fd) {
                Ok(log) => Some(log),
                // Its output is then lost, the container is not.
                Err(e) => {
                    warn!(container = %id, error = %e, "cannot take the log pipe from the keeper");
                    None
                }
            },
            _ => None,
        };
        let keeper = match keeper.map(|k| k.try_clone()).transpose() {
            Ok(keeper) => keeper,
            Err(e) => return Err(io("duplicate the keeper's pidfd".into())(e)),
        };
        let init = Init::new(id, pidfd, keeper, None)?;
        let netns = match &record.link {
            Some(_) => std::fs::File::open(format!("/proc/{pid}/ns/net")).ok(),
            None => None,
        };
        // The namespace opened by pid is the init's only if the init still lives now; if it
        // has died meanwhile, the caller tears it down as a container that exited.
        if monitor::send_signal(init.pidfd.get_ref(), 0).is_err()
            || (record.link.is_some() && netns.is_none())
        {
            return Ok(false);
        }
        let cgroup = Cgroup::open(
            &record.cgroup_parent,
            record.cgroup.as_deref().unwrap_or(id),
        )?;
        let log_task = log.map(|r| {
            tokio::spawn(logs::drain(
                r,
                self.log_path(),
                self.inner.shared.config.log_limit,
            ))
        });
        let link = record.link.as_ref().map(|(link, _)| link.clone());
        let life = Life {
            pidfd: init.pidfd.clone(),
            link: link.clone(),
            reason: Arc::new(StdMutex::new(None)),
        };
        let (address, started_at) = (record.address, record.started_at);
        let run = Run {
            container: self.clone(),
            init,
            boot: None,
            cgroup: Arc::new(cgroup),
            link,
            netns,
            reason: life.reason.clone(),
            log_task,
            record,
        };
        *self
            .inner
            .life
            .try_lock()
            .expect("nothing else has this new container yet") = Some(life);
        self.inner.settled.send_replace(false);
        self.inner.state.send_replace(State::Running {
            pid,
            address,
            started_at,
        });
        info!(container = %id, pid, ?address, "adopted a running container");
        tokio::spawn(
            run.supervise()
                .instrument(info_span!(parent: None, "monitor", container = %id)),
        );
        Ok(true)
    }

    fn owner(&self) -> std::sync::MutexGuard<'_, Option<state::Owner>> {
        self.inner
            .owner
            .lock()
            .expect("owner lock is never poisoned")
    }

    /// Makes sure this runtime owns the state directory, refusing one that another live
    /// runtime owns: both would tear down the same container. True when newly taken.
    fn take_ownership(&self, dir: &Path) -> Result<bool> {
        let mut owner = self.owner();
        if owner.is_some() {
            return Ok(false);
        }
        let io = |source| Error::Io {
            id: self.inner.id.clone(),
            what: format!("lock state directory {}", dir.display()),
            source,
        };
        *owner = Some(
            state::Owner::take(dir)
                .map_err(io)?
                .ok_or_else(|| Error::OwnedElsewhere(self.inner.id.clone()))?,
        );
        Ok(true)
    }

    fn publish_exit(&self, outcome: Outcome) {
        self.inner
            .state
            .send_replace(State::Exited(Arc::new(outcome)));
    }

    /// Boots the container. Returns once its init process is spawned and released, without
    /// waiting for it to be ready. Failures after that point (a missing entrypoint, say)
    /// are reported by [`Container::monitor`].
    pub async fn start(&self, opts: StartOptions) -> Result<()> {
        let span = info_span!("start", container = %self.inner.id);
        async {
            let mut life = self.inner.life.lock().await;
            if self.running() {
                return Err(Error::AlreadyRunning(self.inner.id.clone()));
            }
            // A previous run may still be tearing down; its names must be free first.
            self.wait_settled().await;

            let mut made = Made::default();
            match self.try_start(&opts, &mut made).await {
                Ok(new_life) => {
                    *life = Some(new_life);
                    Ok(())
                }
                Err(e) => {
                    debug!(error = %e, "start failed");
                    made.undo(self).await;
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn try_start(&self, opts: &StartOptions, made: &mut Made) -> Result<Life> {
        let id = &self.inner.id;
        let shared = &self.inner.shared;
        if !opts.enable_internet && !opts.egress.is_empty() {
            return Err(firewall::Error::EgressWithoutInternet.into());
        }
        let bundle = Bundle::load(&opts.bundle)?;
        let process = process(&bundle, opts)?;
        let (egress, mounts) = self.egress(opts, made)?;
        let plan = Plan::with_mounts(&bundle, &process, &mounts)?;
        let limits = limits(&bundle, opts.instance)?;

        // A bundle's cgroupsPath is always taken below silo's parent, never from the root:
        // silo manages only cgroups below the parent it owns.
        let cgroup_rel = match bundle
            .spec()
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
        {
            Some(p) => p.to_string_lossy().into_owned(),
            None => id.clone(),
        };
        let state_dir = self.state_dir();
        let io = |what: String| {
            let id = id.clone();
            move |source| Error::Io { id, what, source }
        };
        std::fs::create_dir_all(&state_dir).map_err(io(format!(
            "create state directory {}",
            state_dir.display()
        )))?;
        made.owned = self.take_ownership(&state_dir)?;
        made.state_dir = Some(state_dir.clone());
        // Recorded before the cgroup is made, so that a runtime started after a crash from
        // here on finds it and removes it.
        let mut record = Record::starting(&shared.config.cgroup_parent, &cgroup_rel);
        record
            .save(&state_dir)
            .map_err(io(format!("write the record in {}", state_dir.display())))?;
        let exit_record = state::create_exit_record(&state_dir).map_err(io(format!(
            "write the exit record in {}",
            state_dir.display()
        )))?;
        fault::point("start:record");

        let cgroup = {
            let limits = limits.clone();
            let parent = shared.config.cgroup_parent.clone();
            tokio::task::spawn_blocking(move || Cgroup::create(&parent, &cgroup_rel, &limits))
                .await
                .expect("cgroup creation does not panic")?
        };
        let cgroup_dir = cgroup.dir_fd()?;
        made.cgroup = Some(Arc::new(cgroup));
        fault::point("start:cgroup");

        let (output, log_reader) = match opts.stdio {
            Stdio::Inherit => (Output::Inherit, None),
            Stdio::Log => {
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| io("create the log pipe".into())(e.into()))?;
                (Output::Fd(w), Some(r))
            }
        };

        let dir_fd = std::fs::File::open(&state_dir)
            .map_err(io(format!("open state directory {}", state_dir.display())))?;
        let keep = spawn::Keep {
            exit_record: exit_record.as_fd(),
            log: log_reader.as_ref().map(|r| r.as_fd()),
            state_dir: dir_fd.as_fd(),
        };
        let mut child = spawn::spawn(
            &plan,
            &output,
            cgroup_dir.as_ref().map(|d| d.as_fd()),
            &keep,
        )?;
        drop((output, exit_record, dir_fd));
        let pid = child.pid;
        let init = Init::new(
            id,
            child
                .pidfd
                .try_clone()
                .map_err(io("duplicate the pidfd".into()))?,
            Some(
                child
                    .keeper
                    .try_clone()
                    .map_err(io("duplicate the keeper's pidfd".into()))?,
            ),
            child.take_keeper_stack(),
        )?;
        made.init = Some(init.clone());
        debug!(pid, keeper = child.keeper_pid, "init cloned");
        fault::point("start:spawn");

        // Without CLONE_INTO_CGROUP (cgroup v1) the init is moved into its cgroup now. The
        // first write to a v1 cgroup.procs waits for an RCU grace period (the cgroup
        // threadgroup semaphore): tens of milliseconds, spent off the executor and while the
        // network is wired, since the init waits to be released for both.
        let moved = {
            let cgroup = made.cgroup.clone().expect("set above");
            let in_place = cgroup_dir.is_some();
            async move {
                if in_place {
                    return Ok(());
                }
                tokio::task::spawn_blocking(move || cgroup.add(pid))
                    .await
                    .expect("moving a process into a cgroup does not panic")
            }
        };
        let mut netns = None;
        let wired = self.wire(&plan, pid, egress, made, &mut netns, &mut record);
        let (moved, wired) = tokio::join!(moved, wired);
        let address = wired?;
        moved?;

        // Both wait (the init on `go`, the keeper on the init), so both are there to read.
        let live = |pid: u32| {
            Proc::of(pid).ok_or_else(|| {
                io(format!("read the start time of process {pid}"))(
                    std::io::Error::from_raw_os_error(libc::ESRCH),
                )
            })
        };
        record.phase = Phase::Running;
        record.init = Some(live(pid)?);
        record.keeper = Some(live(child.keeper_pid)?);
        record.log_fd = log_reader.as_ref().map(|r| r.as_raw_fd());
        record.address = address;
        record
            .save(&state_dir)
            .map_err(io(format!("write the record in {}", state_dir.display())))?;
        let started_at = record.started_at;

        let log_task = log_reader.map(|r| {
            tokio::spawn(logs::drain(
                r,
                state_dir.join(logs::FILE),
                shared.config.log_limit,
            ))
        });
        let released = child.release()?;
        drop(released.pidfd);
        drop(released.keeper);

        let life = Life {
            pidfd: init.pidfd.clone(),
            link: made.link.clone(),
            reason: Arc::new(StdMutex::new(None)),
        };
        let run = Run {
            container: self.clone(),
            init,
            boot: Some((released.errors, plan)),
            cgroup: made.cgroup.take().expect("set above"),
            link: made.link.take(),
            netns,
            reason: life.reason.clone(),
            log_task,
            record,
        };
        *made = Made::default();
        self.inner.settled.send_replace(false);
        self.inner.state.send_replace(State::Running {
            pid,
            address,
            started_at,
        });
        info!(pid, ?address, "container started");
        tokio::spawn(
            run.supervise()
                .instrument(info_span!(parent: None, "monitor", container = %id)),
        );
        Ok(life)
    }

    /// Gives the init's network namespace its veth and firewall policy, when it has one of
    /// its own, and returns the address the container's ports answer on.
    async fn wire(
        &self,
        plan: &Plan,
        pid: u32,
        egress: Egress,
        made: &mut Made,
        netns: &mut Option<std::fs::File>,
        record: &mut Record,
    ) -> Result<Option<IpAddr>> {
        let io = |what: String| {
            let id = self.inner.id.clone();
            move |source| Error::Io { id, what, source }
        };
        if !plan.new_network() {
            return Ok(if plan.joins_network() {
                None
            } else {
                // No network namespace at all: the container shares the host's network, and
                // its ports are the host's.
                Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
            });
        }
        let netns_file = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(io("open the network namespace".into()))?;
        let link =
            network::attach(&self.inner.shared.config.address_pool, netns_file.as_fd()).await?;
        let addr = IpAddr::V4(link.container_addr);
        made.link = Some(link.clone());
        fault::point("start:veth");
        if let Egress::Internet { .. } = egress {
            network::add_default_route(netns_file.as_fd(), &link).await?;
        }
        // Confined before the init is released: it never sends a packet unconfined.
        let confined = link.clone();
        tokio::task::spawn_blocking(move || firewall::apply(&confined, &egress))
            .await
            .expect("applying the firewall does not panic")?;
        fault::point("start:firewall");
        let ifindex = firewall::interface_index(&link.host_if).ok_or_else(|| {
            io(format!("find interface {}", link.host_if))(std::io::ErrorKind::NotFound.into())
        })?;
        record.link = Some((link, ifindex));
        *netns = Some(netns_file);
        Ok(Some(addr))
    }

    /// What the container may reach, and the mounts that go with it: with internet, an
    /// /etc/resolv.conf naming resolvers it can reach, kept in its state directory.
    fn egress(&self, opts: &StartOptions, made: &mut Made) -> Result<(Egress, Vec<Mount>)> {
        if !opts.enable_internet {
            return Ok((Egress::None, Vec::new()));
        }
        let config = &self.inner.shared.config;
        let uplink = match &config.uplink {
            Some(uplink) => uplink.clone(),
            None => firewall::default_uplink()?,
        };
        let resolvers = match &config.resolvers {
            Some(resolvers) => resolvers.clone(),
            None => {
                let found = firewall::host_resolvers();
                if found.is_empty() {
                    warn!(
                        fallback = ?firewall::FALLBACK_RESOLVERS,
                        "the host has no nameserver a container can reach; using public ones"
                    );
                    firewall::FALLBACK_RESOLVERS.to_vec()
                } else {
                    found
                }
            }
        };
        let mut allow = opts.egress.clone();
        if !allow.is_empty() {
            for r in &resolvers {
                allow.push(EgressRule::new(*r, 32, Some((53, 53)))?);
            }
        }

        let id = &self.inner.id;
        let dir = self.state_dir();
        let io = |what: String| {
            let id = id.clone();
            move |source| Error::Io { id, what, source }
        };
        std::fs::create_dir_all(&dir)
            .map_err(io(format!("create state directory {}", dir.display())))?;
        made.state_dir = Some(dir.clone());
        let path = dir.join("resolv.conf");
        std::fs::write(&path, firewall::resolv_conf(&resolvers))
            .map_err(io(format!("write {}", path.display())))?;
        let mount = MountBuilder::default()
            .destination("/etc/resolv.conf")
            .typ("bind")
            .source(path)
            .options(
                ["bind", "ro", "nosuid", "nodev", "noexec"]
                    .map(String::from)
                    .to_vec(),
            )
            .build()
            .expect("every field of the mount is set");
        Ok((Egress::Internet { uplink, allow }, vec![mount]))
    }

    /// Delivers signal `sig` (1 to 64) to the init process, with kill(2) semantics.
    pub async fn signal(&self, sig: i32) -> Result<()> {
        if !(1..=64).contains(&sig) {
            return Err(Error::InvalidSignal(sig));
        }
        let life = self.inner.life.lock().await;
        let live = life.as_ref().filter(|_| self.running());
        let Some(live) = live else {
            return Err(Error::NotRunning(self.inner.id.clone()));
        };
        monitor::send_signal(live.pidfd.get_ref(), sig).map_err(|source| {
            match source.raw_os_error() {
                Some(libc::ESRCH) => Error::NotRunning(self.inner.id.clone()),
                _ => Error::Io {
                    id: self.inner.id.clone(),
                    what: format!("send signal {sig}"),
                    source,
                },
            }
        })?;
        debug!(container = %self.inner.id, sig, "signal sent");
        Ok(())
    }

    /// Kills every process of the container, tears down its cgroup and network, and returns
    /// once all of it is gone. Safe to call any number of times; the first reason given
    /// becomes the error that [`Container::monitor`] reports.
    pub async fn destroy(&self, reason: Option<String>) -> Result<()> {
        let span = info_span!("destroy", container = %self.inner.id);
        async {
            let mut life = self.inner.life.lock().await;
            if let Some(live) = life.as_ref()
                && !matches!(*self.inner.state.borrow(), State::Exited(_))
            {
                {
                    let mut r = live.reason.lock().expect("reason lock is never poisoned");
                    if r.is_none() {
                        *r = reason.or(Some(String::new()));
                    }
                }
                fault::point("destroy:signal");
                if let Err(e) = monitor::send_signal(live.pidfd.get_ref(), libc::SIGKILL)
                    && e.raw_os_error() != Some(libc::ESRCH)
                {
                    warn!(error = %e, "failed to kill init");
                }
            }
            // Also when the init had exited by itself: its teardown may still be going on.
            self.wait_settled().await;
            // The run is over: let its pidfd go now rather than when its monitor task gets
            // to it, so that the descriptor is closed once destroy returns.
            if matches!(*self.inner.state.borrow(), State::Exited(_)) {
                *life = None;
            }
            drop(life);
            let dir = self.state_dir();
            if dir.exists() {
                self.take_ownership(&dir)?;
            }
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
                    id: self.inner.id.clone(),
                    what: "remove its state directory".into(),
                    source: e,
                }),
                _ => {
                    *self.owner() = None;
                    Ok(())
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Waits until the current (or last) run has exited and is torn down.
    async fn wait_settled(&self) {
        let mut rx = self.inner.settled.subscribe();
        let _ = rx.wait_for(|settled| *settled).await;
    }

    /// Waits for the current (or last) run to end: Ok on exit 0 or destroy without a
    /// reason, otherwise [`Error::Exit`] with the code, the destroy reason and whether it ran
    /// out of memory.
    pub async fn monitor(&self) -> Result<()> {
        let mut rx = self.inner.state.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, State::Running { .. } | State::Stopping))
            .await
            .expect("the sender lives as long as the container")
            .clone();
        match state {
            State::Exited(outcome) => Ok(outcome.result(&self.inner.id)?),
            _ => Err(Error::NeverStarted(self.inner.id.clone())),
        }
    }

    /// The outcome of the last run, once it has ended.
    pub fn outcome(&self) -> Option<Arc<Outcome>> {
        match &*self.inner.state.borrow() {
            State::Exited(o) => Some(o.clone()),
            _ => None,
        }
    }

    /// A handle on TCP port `port` inside the container.
    pub fn tcp_port(&self, port: u32) -> Result<TcpPort> {
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(Error::InvalidPort(port))?;
        Ok(TcpPort::new(self.clone(), port))
    }

    /// The veth pair of the current run, while it runs in a network namespace of its own.
    pub async fn network_link(&self) -> Option<Link> {
        let life = self.inner.life.lock().await;
        life.as_ref()
            .filter(|_| self.running())
            .and_then(|l| l.link.clone())
    }

    /// The address the container's ports answer on, while it runs. Read from the published
    /// state, so that it answers at once even while a lifecycle call (a long destroy, say)
    /// holds the container.
    pub fn address(&self) -> Result<IpAddr> {
        match *self.inner.state.borrow() {
            State::Running {
                address: Some(address),
                ..
            } => Ok(address),
            State::Running { address: None, .. } => {
                Err(Error::ForeignNetwork(self.inner.id.clone()))
            }
            _ => Err(Error::NotRunning(self.inner.id.clone())),
        }
    }
}

/// The run of one init process, owned by its monitor task.
struct Run {
    container: Container,
    init: Init,
    /// The error pipe and the plan that explains its reports; `None` when adopted.
    boot: Option<(OwnedFd, Plan)>,
    cgroup: Arc<Cgroup>,
    link: Option<Link>,
    /// Holds the network namespace, and with it the veth pair, until `link` is detached:
    /// otherwise the kernel could free the pair's name when the init exits, hand it to a
    /// new container, and our detach would then remove that container's pair.
    netns: Option<std::fs::File>,
    reason: Arc<StdMutex<Option<String>>>,
    log_task: Option<tokio::task::JoinHandle<()>>,
    record: Record,
}

impl Run {
    /// Waits for the init to exit, publishes the outcome, then tears the container down.
    ///
    /// The outcome is published as soon as it is known: the exit status, the OOM flag (read
    /// before the cgroup goes) and the whole log. The rest (firewall state, veth, cgroup)
    /// is the container's remains, which only a new start of the same id and `destroy` must
    /// wait for: they wait for `settled`, set once all of it is gone and recorded.
    async fn supervise(mut self) {
        let inner = &self.container.inner;
        let state_dir = self.container.state_dir();
        self.init.exited().await;
        let (status, exited_at) = state::read_exit_record(&state_dir);
        fault::point("exit:teardown");
        // The init is reaped: its pidfds are of no more use. The Life keeps a copy until it
        // is cleared below or by destroy; the Weak only tells that copy apart from another
        // run's.
        let pidfd = Arc::downgrade(&self.init.pidfd);
        drop(self.init);
        inner.state.send_replace(State::Stopping);
        // Read, then closed before the exit is published (the plan holds the descriptors of
        // joined namespaces): once destroy returns, the run holds no descriptor.
        let boot_error = self
            .boot
            .take()
            .and_then(|(errors, plan)| Report::read(errors.as_fd()).map(|r| plan.describe(&r)));
        let oom_killed = self.cgroup.oom_killed();

        // What the init left running (without a pid namespace of its own it may leave
        // processes behind) still holds the log pipe: the log is whole only once they are
        // gone.
        let cgroup = self.cgroup;
        let killed = {
            let cgroup = cgroup.clone();
            tokio::task::spawn_blocking(move || cgroup.kill_all())
                .await
                .expect("killing a cgroup does not panic")
        };
        if let Err(e) = &killed {
            warn!(error = %e, "failed to kill what is left in the cgroup");
        }
        if let Some(task) = self.log_task {
            // Every writer is dead now, so the drain ends at the pipe's end of file.
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                warn!("log drain did not finish");
            }
        }

        // A destroy that came after the init had already exited by itself did not end
        // it: the exit is what happened. Only the SIGKILL a destroy sends makes it one.
        let reason = self
            .reason
            .lock()
            .expect("reason lock is never poisoned")
            .take()
            .filter(|_| {
                matches!(
                    status,
                    ExitStatus::Signal(libc::SIGKILL) | ExitStatus::Unknown
                )
            });
        let outcome = Outcome {
            status,
            oom_killed,
            destroyed: reason.is_some(),
            reason: reason.filter(|r| !r.is_empty()),
            boot_error,
            started_at: self.record.started_at,
            exited_at,
        };
        info!(
            code = status.code(),
            oom_killed,
            destroyed = outcome.destroyed,
            boot_error = outcome.boot_error.as_deref(),
            "container exited"
        );
        inner
            .state
            .send_replace(State::Exited(Arc::new(outcome.clone())));

        if let Some(link) = &self.link
            && let Err(e) = network::detach(link).await
        {
            warn!(error = %e, "failed to remove veth");
        }
        drop(self.netns);
        if self.link.is_some() {
            unconfine().await;
        }
        if killed.is_ok() {
            let removed = tokio::task::spawn_blocking(move || cgroup.remove())
                .await
                .expect("cgroup removal does not panic");
            if let Err(e) = removed {
                warn!(error = %e, "failed to remove cgroup");
            }
        }

        // Only now may the record say that nothing is left to remove.
        self.record.exited(outcome);
        if let Err(e) = self.record.save(&state_dir) {
            // A later runtime then cleans up again what is already gone: harmless.
            warn!(error = %e, "failed to record the exit");
        }
        inner.settled.send_replace(true);
        debug!("container torn down");

        // Without this, a container that ran once would hold a descriptor for as long as
        // its handle lives (the runtime keeps every handle). A start since then has put a
        // Life of its own there, which stays.
        let mut life = inner.life.lock().await;
        if life
            .as_ref()
            .is_some_and(|l| std::ptr::eq(Arc::as_ptr(&l.pidfd), pidfd.as_ptr()))
        {
            *life = None;
        }
    }
}

/// Drops the firewall state of host ends that are gone, once a container's veth is deleted.
///
/// Only state of interfaces that no longer exist is touched: the veth's name is free from
/// the moment it is deleted, and a new container may already hold it with a policy of its
/// own. The veth must go first for another reason: the table goes with the last host end, and
/// a teardown that still saw another one, about to be deleted, would leave it. A failure is
/// only logged: missing state means less access, and the next firewall change or runtime
/// start collects what is left.
async fn unconfine() {
    let removed = tokio::task::spawn_blocking(firewall::collect_garbage).await;
    if let Ok(Err(e)) = removed {
        warn!(error = %e, "failed to remove the container's firewall state");
    }
}

/// A duplicate of descriptor `fd` of the process behind `pidfd`.
fn take_fd(pidfd: &OwnedFd, fd: i32) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_getfd takes a pidfd we own, a descriptor number and flags, and returns
    // a new descriptor or -1.
    let new = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new as i32) })
}

/// Waits up to `limit` for the process behind `pidfd` to exit, blocking the thread.
fn wait_blocking(pidfd: &OwnedFd, limit: Duration) {
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
}

/// The process to run: the bundle's, with the caller's entrypoint and environment over it.
pub(crate) fn process(bundle: &Bundle, opts: &StartOptions) -> Result<Process> {
    let spec_process = bundle
        .spec()
        .process()
        .as_ref()
        .expect("checked by Bundle::load");
    for (name, value) in &opts.env {
        let reason = if name.is_empty() {
            Some("the name is empty")
        } else if name.contains('=') {
            Some("the name contains '='")
        } else if name.contains('\0') {
            Some("the name contains a NUL byte")
        } else if value.contains('\0') {
            Some("the value contains a NUL byte")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::InvalidEnv {
                name: name.clone(),
                reason,
            });
        }
    }
    let mut env: Vec<String> = spec_process.env().clone().unwrap_or_default();
    for (name, value) in &opts.env {
        let prefix = format!("{name}=");
        match env.iter_mut().find(|kv| kv.starts_with(&prefix)) {
            Some(kv) => *kv = format!("{name}={value}"),
            None => env.push(format!("{name}={value}")),
        }
    }
    let args = match &opts.entrypoint {
        Some(args) if args.is_empty() || args[0].is_empty() => {
            return Err(Error::EmptyEntrypoint);
        }
        Some(args) => args.clone(),
        None => spec_process.args().clone().unwrap_or_default(),
    };
    Ok(Process { args, env })
}

/// The cgroup limits: the bundle's, with the instance type's cpu and memory over them.
pub(crate) fn limits(bundle: &Bundle, instance: Option<Instance>) -> Result<Limits> {
    const DEFAULT_PIDS: i64 = 4096;
    const PERIOD_US: u64 = 100_000;
    let res = bundle
        .spec()
        .linux()
        .as_ref()
        .and_then(|l| l.resources().clone())
        .unwrap_or_default();
    let mut limits = Limits {
        pids: Some(DEFAULT_PIDS),
        pids_is_default: true,
        ..Limits::default()
    };
    if let Some(mem) = res.memory() {
        limits.memory_bytes = mem.limit();
        limits.memory_reservation_bytes = mem.reservation();
        limits.memory_swap_bytes = mem.swap();
    }
    if let Some(cpu) = res.cpu() {
        limits.cpu_quota_us = cpu.quota();
        limits.cpu_period_us = cpu.period();
        limits.cpu_shares = cpu.shares();
    }
    if let Some(pids) = res.pids() {
        limits.pids = Some(pids.limit()).filter(|l| *l > 0);
        limits.pids_is_default = false;
    }
    if let Some(inst) = instance {
        limits.memory_bytes = Some(inst.memory_bytes);
        limits.cpu_period_us = Some(PERIOD_US);
        limits.cpu_quota_us = Some((inst.vcpu * PERIOD_US as f64).round() as i64);
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_types() {
        let lite: Instance = "lite".parse().unwrap();
        assert_eq!(lite.memory_bytes, 256 << 20);
        assert_eq!(lite.vcpu, 1.0 / 16.0);
        let custom: Instance = "cpu=0.5,memory=512M".parse().unwrap();
        assert_eq!(custom.memory_bytes, 512 << 20);
        assert!("huge".parse::<Instance>().is_err());
        assert!("cpu=0,memory=1G".parse::<Instance>().is_err());
        let e = "cpu=inf,memory=1G".parse::<Instance>().unwrap_err();
        assert!(e.to_string().contains("\"cpu=inf,memory=1G\""), "{e}");
        assert!("cpu=NaN,memory=1G".parse::<Instance>().is_err());
    }
}
