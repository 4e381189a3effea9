//! The daemon's containers by id, and what it knows of each run beyond the library's state:
//! when it started and ended, its outcome, whether its ports are ready, whether it is being
//! stopped, and when traffic last went through it.
//!
//! Starts and destroys of one id are serialized by the entry's `lifecycle` lock, so that an
//! entry is never removed while a start is putting a container into it. Everything else
//! (status, signals, traffic, monitor) runs beside them.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::json;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::api::ApiError;
use crate::image::Store;
use crate::{Container, Error, Runtime, StartOptions};

/// How long a stop waits after its signal before SIGKILL, unless told otherwise.
pub(crate) const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause between two readiness probes of a port.
const MAX_PROBE_DELAY: Duration = Duration::from_millis(50);

pub(crate) struct Registry {
    runtime: Runtime,
    /// Images to run; each container's unpacked bundle is `bundles/<id>` in it.
    images: Store,
    /// What the daemon must remember of a container across its own restarts (its idle
    /// timeout), one file per id.
    notes: PathBuf,
    entries: StdMutex<HashMap<String, Arc<Entry>>>,
    /// Set when the daemon shuts down: no container may start after the last destroy.
    closing: AtomicBool,
}

/// One container id, from its first start until it is destroyed.
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) container: Container,
    /// Held by starts and destroys, and for the moment a stop takes to send its signals.
    lifecycle: Mutex<()>,
    state: StdMutex<EntryState>,
    activity: watch::Sender<Activity>,
}

#[derive(Default)]
struct EntryState {
    /// Set when a destroy took the entry out of the registry; a start that waited for the
    /// lifecycle lock meanwhile must then use a fresh entry.
    removed: bool,
    run: Option<Arc<Run>>,
}

/// Traffic through the daemon into a container: what is open now, and when the last of it
/// ended.
#[derive(Debug, Clone, Copy)]
struct Activity {
    open: usize,
    last: Instant,
}

/// One run of a container, from a successful start until its exit is recorded.
pub(crate) struct Run {
    started_at: SystemTime,
    address: Option<IpAddr>,
    healthy: AtomicBool,
    stopping: AtomicBool,
    exit: watch::Sender<Option<Arc<ExitInfo>>>,
}

/// How a run ended, as the library reported it.
#[derive(Debug)]
pub(crate) struct ExitInfo {
    pub(crate) code: i32,
    /// The library's monitor error, when the run did not end well.
    pub(crate) error: Option<String>,
    pub(crate) oom_killed: bool,
    pub(crate) destroyed: bool,
    pub(crate) exited_at: SystemTime,
}

/// `GET /v1/containers/{id}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Info {
    id: String,
    running: bool,
    status: &'static str,
    pid: Option<u32>,
    exit_code: Option<i32>,
    oom_killed: bool,
    address: Option<String>,
    started_at: String,
    exited_at: Option<String>,
}

/// `GET /v1/containers/{id}/monitor`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MonitorReply {
    exit_code: i32,
    error: Option<String>,
    oom_killed: bool,
}

/// What a start asks for beyond the library's options.
pub(crate) struct StartPlan {
    /// An image of the store to run, in place of `opts.bundle`.
    pub(crate) image: Option<String>,
    pub(crate) opts: StartOptions,
    /// `None`: the image's exposed ports (none for a bundle).
    pub(crate) wait_for_ports: Option<Vec<u16>>,
    pub(crate) timeout: Duration,
    pub(crate) sleep_after: Option<Duration>,
}

impl Registry {
    /// A registry of the runtime's containers: those an earlier daemon left running (the
    /// runtime adopted them) or that exited while no daemon ran are listed from the start.
    pub(crate) async fn new(runtime: Runtime, images: Store, notes: PathBuf) -> Registry {
        if let Err(e) = std::fs::create_dir_all(&notes) {
            warn!(dir = %notes.display(), error = %e, "cannot keep notes across restarts");
        }
        let registry = Registry {
            runtime,
            images,
            notes,
            entries: StdMutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
        };
        // Unpacked images of containers the runtime does not know (a start cut short by a
        // crash) are the daemon's to remove.
        if let Ok(dirs) = std::fs::read_dir(registry.bundles_dir()) {
            let known: BTreeSet<String> = registry
                .runtime
                .containers()
                .iter()
                .map(|c| c.id().to_string())
                .collect();
            for dir in dirs.flatten() {
                if !dir
                    .file_name()
                    .to_str()
                    .is_some_and(|id| known.contains(id))
                {
                    remove_dir(&dir.path());
                }
            }
        }
        for container in registry.runtime.containers() {
            let Ok(entry) = registry.get_or_insert(container.id()) else {
                continue;
            };
            let run = entry.begin_run().await;
            if let Some(after) = registry.sleep_after(&entry.id)
                && container.running()
            {
                entry.watch_idle(run, after);
            }
        }
        registry
    }

    fn note_path(&self, id: &str) -> PathBuf {
        self.notes.join(format!("{id}.json"))
    }

    /// Remembers (or forgets) the idle timeout of `id` for the next daemon.
    fn remember_sleep_after(&self, id: &str, after: Option<Duration>) {
        let path = self.note_path(id);
        let written = match after {
            Some(after) => std::fs::write(
                &path,
                json!({ "sleepAfterMs": after.as_millis() }).to_string(),
            ),
            None => std::fs::remove_file(&path).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }),
        };
        if let Err(e) = written {
            warn!(path = %path.display(), error = %e, "cannot keep the idle timeout");
        }
    }

    fn sleep_after(&self, id: &str) -> Option<Duration> {
        let text = std::fs::read(self.note_path(id)).ok()?;
        let note: serde_json::Value = serde_json::from_slice(&text).ok()?;
        note["sleepAfterMs"].as_u64().map(Duration::from_millis)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.entries
            .lock()
            .expect("registry lock is never poisoned")
    }

    /// The container with this id, once it has been started.
    pub(crate) fn get(&self, id: &str) -> Result<Arc<Entry>, ApiError> {
        match self.map().get(id) {
            Some(entry) if entry.current_run().is_some() => Ok(entry.clone()),
            _ if !valid_id(id) => Err(Error::InvalidId(id.to_string()).into()),
            _ => Err(ApiError::NoSuchContainer(id.to_string())),
        }
    }

    /// Every container that has been started, by id.
    pub(crate) fn list(&self) -> Vec<Arc<Entry>> {
        let mut entries: Vec<_> = self
            .map()
            .values()
            .filter(|e| e.current_run().is_some())
            .cloned()
            .collect();
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        entries
    }

    fn get_or_insert(&self, id: &str) -> Result<Arc<Entry>, ApiError> {
        if let Some(entry) = self.map().get(id) {
            return Ok(entry.clone());
        }
        let container = self.runtime.container(id)?;
        let mut map = self.map();
        let entry = map.entry(id.to_string()).or_insert_with(|| {
            Arc::new(Entry {
                id: id.to_string(),
                container,
                lifecycle: Mutex::new(()),
                state: StdMutex::new(EntryState::default()),
                activity: watch::Sender::new(Activity {
                    open: 0,
                    last: Instant::now(),
                }),
            })
        });
        Ok(entry.clone())
    }

    /// Takes `entry` out of the registry; the caller holds its lifecycle lock.
    fn remove(&self, entry: &Arc<Entry>) {
        entry.state().removed = true;
        let mut map = self.map();
        if map.get(&entry.id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            map.remove(&entry.id);
        }
    }

    /// Starts the container, then waits for its ports when asked to.
    pub(crate) async fn start(
        &self,
        id: &str,
        plan: StartPlan,
    ) -> Result<(Arc<Entry>, Arc<Run>), ApiError> {
        let mut wait_for_ports = plan.wait_for_ports.clone().unwrap_or_default();
        let (entry, run) = loop {
            let entry = self.get_or_insert(id)?;
            let lifecycle = entry.lifecycle.lock().await;
            if entry.state().removed {
                continue;
            }
            // Checked under the lifecycle lock, after the entry is in the map: either the
            // shutdown's destroy sees this entry and waits for the start, or this sees the flag.
            if self.closing.load(Ordering::SeqCst) {
                if entry.current_run().is_none() {
                    self.remove(&entry);
                }
                return Err(ApiError::ShuttingDown);
            }
            if entry.container.running() {
                return Err(Error::AlreadyRunning(id.to_string()).into());
            }
            // The last run's exit must be on record before a new run can replace it.
            if let Some(last) = entry.current_run() {
                last.exited().await;
            }
            let mut opts = plan.opts.clone();
            let started = async {
                if let Some(image) = &plan.image {
                    let (bundle, ports) = self.unpack(id, image).await?;
                    opts.bundle = bundle;
                    if plan.wait_for_ports.is_none() {
                        wait_for_ports = ports;
                    }
                }
                entry.container.start(opts).await
            };
            if let Err(e) = started.await {
                self.remove_bundle(id).await;
                if entry.current_run().is_none() {
                    // A failed first start leaves nothing behind.
                    self.remove(&entry);
                }
                return Err(e.into());
            }
            let run = entry.begin_run().await;
            drop(lifecycle);
            break (entry, run);
        };
        self.remember_sleep_after(id, plan.sleep_after);
        if let Some(after) = plan.sleep_after {
            entry.watch_idle(run.clone(), after);
        }
        if !wait_for_ports.is_empty() {
            entry
                .wait_for_ports(&run, &wait_for_ports, plan.timeout)
                .await?;
        }
        Ok((entry, run))
    }

    /// Destroys the container and forgets it. Unknown ids are fine: destroy is idempotent.
    pub(crate) async fn destroy(&self, id: &str, reason: Option<String>) -> Result<(), ApiError> {
        let known = self.map().get(id).cloned();
        let entry = match known {
            Some(entry) => entry,
            None if !valid_id(id) => return Err(Error::InvalidId(id.to_string()).into()),
            // Unknown here, but another runtime's on the same state directory: refused.
            None if self.runtime.config().state_dir.join(id).exists() => {
                self.runtime.container(id)?.destroy(reason).await?;
                return Ok(());
            }
            None => return Ok(()),
        };
        let _lifecycle = entry.lifecycle.lock().await;
        if entry.state().removed {
            return Ok(());
        }
        let run = entry.current_run();
        if let Some(run) = &run {
            run.stopping.store(true, Ordering::Relaxed);
        }
        entry.container.destroy(reason).await?;
        if let Some(run) = run {
            run.exited().await;
        }
        self.remove_bundle(id).await;
        self.remove(&entry);
        self.remember_sleep_after(id, None);
        info!(container = %id, "container destroyed");
        Ok(())
    }

    /// Unpacks `image` afresh into container `id`'s bundle directory (the last run's is
    /// gone first: the caller holds the lifecycle lock and that run has exited), and
    /// returns it with the image's exposed TCP ports.
    async fn unpack(&self, id: &str, image: &str) -> Result<(PathBuf, Vec<u16>), Error> {
        let store = self.images.clone();
        let dir = self.bundle_dir(id);
        let image = image.to_string();
        let unpacked = dir.clone();
        let spec = tokio::task::spawn_blocking(move || {
            let r = store.get(&image).map_err(crate::image::Error::from)?;
            remove_dir(&unpacked);
            std::fs::create_dir_all(unpacked.parent().expect("has a parent")).map_err(
                |source| crate::image::Error::Io {
                    what: "create",
                    path: unpacked.clone(),
                    source,
                },
            )?;
            crate::image::unpack(store.blobs(), &r.manifest, &unpacked)
        })
        .await
        .expect("the unpack task does not panic")?;
        Ok((dir, crate::image::config::ports(&spec)))
    }

    /// Where the daemon's containers' unpacked images are, one directory per id.
    fn bundles_dir(&self) -> PathBuf {
        crate::image::bundle_dir(&self.images, "serve", "")
    }

    fn bundle_dir(&self, id: &str) -> PathBuf {
        self.bundles_dir().join(id)
    }

    /// Removes container `id`'s unpacked image, if it has one.
    async fn remove_bundle(&self, id: &str) {
        let dir = self.bundle_dir(id);
        let _ = tokio::task::spawn_blocking(move || remove_dir(&dir)).await;
    }

    /// Refuses further starts, then destroys every container, all at once.
    pub(crate) async fn destroy_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let ids: Vec<String> = self.map().keys().cloned().collect();
        let all = ids.iter().map(|id| async move {
            if let Err(e) = self.destroy(id, None).await {
                tracing::warn!(container = %id, error = %e, "failed to destroy");
            }
        });
        futures_util::future::join_all(all).await;
    }
}

impl Entry {
    fn state(&self) -> std::sync::MutexGuard<'_, EntryState> {
        self.state.lock().expect("entry lock is never poisoned")
    }

    /// The current run, or the last one once it has ended.
    pub(crate) fn current_run(&self) -> Option<Arc<Run>> {
        self.state().run.clone()
    }

    /// Records a run that has just started, and watches for its end. The caller holds the
    /// lifecycle lock, so no other run can start (and end) before the watcher sees this one
    /// end: the library publishes only the latest state.
    async fn begin_run(self: &Arc<Entry>) -> Arc<Run> {
        let address = match self.container.tcp_port(1) {
            Ok(port) => port.socket_addr().await.ok().map(|a| a.ip()),
            Err(_) => None,
        };
        let started_at = self
            .container
            .started_at()
            .or_else(|| self.container.outcome().map(|o| o.started_at))
            .unwrap_or_else(SystemTime::now);
        let run = Arc::new(Run {
            started_at,
            address,
            healthy: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            exit: watch::Sender::new(None),
        });
        self.state().run = Some(run.clone());
        // The idle clock starts with the run.
        self.activity.send_modify(|a| a.last = Instant::now());
        let container = self.container.clone();
        let watched = run.clone();
        let record = async move {
            let result = container.monitor().await;
            let outcome = container.outcome();
            let info = ExitInfo {
                code: match (&result, &outcome) {
                    (Err(Error::Exit(e)), _) => e.code,
                    (_, Some(o)) => o.status.code(),
                    _ => -1,
                },
                error: result.err().map(|e| e.to_string()),
                oom_killed: outcome.as_ref().is_some_and(|o| o.oom_killed),
                destroyed: outcome.as_ref().is_some_and(|o| o.destroyed),
                exited_at: outcome.map_or_else(SystemTime::now, |o| o.exited_at),
            };
            debug!(container = %container.id(), code = info.code, "run ended");
            watched.exit.send_replace(Some(Arc::new(info)));
        };
        if self.container.outcome().is_some() && !self.container.running() {
            // A run that ended before this daemon started: on record before anyone asks.
            record.await;
        } else {
            tokio::spawn(record);
        }
        run
    }

    pub(crate) fn info(&self) -> Option<Info> {
        let run = self.current_run()?;
        let exit = run.exit.borrow().clone();
        let running = self.container.running();
        let status = if running && run.stopping.load(Ordering::Relaxed) {
            "stopping"
        } else if running && run.healthy.load(Ordering::Relaxed) {
            "healthy"
        } else if running {
            "running"
        } else if exit.is_none() {
            // Exited, and being torn down.
            "stopping"
        } else {
            "stopped"
        };
        Some(Info {
            id: self.id.clone(),
            running,
            status,
            pid: self.container.pid(),
            exit_code: exit.as_ref().filter(|_| !running).map(|e| e.code),
            oom_killed: exit.as_ref().is_some_and(|e| e.oom_killed && !running),
            address: run.address.filter(|_| running).map(|a| a.to_string()),
            started_at: rfc3339(run.started_at),
            exited_at: exit
                .as_ref()
                .filter(|_| !running)
                .map(|e| rfc3339(e.exited_at)),
        })
    }

    /// Stops the run gracefully: `signal`, then SIGKILL after `timeout`. Returns once it has
    /// exited. Both signals go only to this run, never to a later one.
    pub(crate) async fn stop(
        &self,
        run: &Arc<Run>,
        signal: i32,
        timeout: Duration,
    ) -> Result<Arc<ExitInfo>, ApiError> {
        if !(1..=64).contains(&signal) {
            return Err(Error::InvalidSignal(signal).into());
        }
        if run.exit.borrow().is_some() || !self.container.running() {
            return Err(Error::NotRunning(self.id.clone()).into());
        }
        run.stopping.store(true, Ordering::Relaxed);
        self.signal_run(run, signal).await?;
        if let Ok(exit) = tokio::time::timeout(timeout, run.exited()).await {
            return Ok(exit);
        }
        info!(container = %self.id, ?timeout, "still running after the stop signal: SIGKILL");
        self.signal_run(run, libc::SIGKILL).await?;
        Ok(run.exited().await)
    }

    async fn signal_run(&self, run: &Arc<Run>, signal: i32) -> Result<(), ApiError> {
        let _lifecycle = self.lifecycle.lock().await;
        let current = self.current_run().is_some_and(|r| Arc::ptr_eq(&r, run));
        if !current || run.exit.borrow().is_some() {
            return Ok(());
        }
        match self.container.signal(signal).await {
            Ok(()) | Err(Error::NotRunning(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until every port accepts a connection, the run ends, or `timeout` passes.
    ///
    /// The kernel has no event for "a socket started listening" in another namespace, so
    /// this probes with connects; a refused connect costs one round trip over the veth, so
    /// probes start 1 ms apart and back off to `MAX_PROBE_DELAY`. The run's end, unlike
    /// readiness, comes from the init's pidfd through the monitor and stops the wait at once.
    async fn wait_for_ports(
        &self,
        run: &Arc<Run>,
        ports: &[u16],
        timeout: Duration,
    ) -> Result<(), ApiError> {
        let ready = StdMutex::new(BTreeSet::new());
        let probes = ports.iter().map(|&port| {
            let ready = &ready;
            async move {
                probe(&self.container, port).await?;
                ready.lock().expect("never poisoned").insert(port);
                Ok::<_, ApiError>(())
            }
        });
        let all = futures_util::future::try_join_all(probes);
        tokio::select! {
            result = tokio::time::timeout(timeout, all) => match result {
                Ok(Ok(_)) => {
                    run.healthy.store(true, Ordering::Relaxed);
                    debug!(container = %self.id, ?ports, "ports ready");
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    let ready = ready.lock().expect("never poisoned");
                    let waiting: Vec<u16> =
                        ports.iter().filter(|p| !ready.contains(p)).copied().collect();
                    Err(ApiError::NotReady {
                        id: self.id.clone(),
                        ports: waiting,
                        ms: timeout.as_millis(),
                    })
                }
            },
            exit = run.exited() => Err(ApiError::ExitedBeforeReady {
                ports: ports.to_vec(),
                how: match &exit.error {
                    Some(error) => error.clone(),
                    None if exit.destroyed => format!("container {} was destroyed", self.id),
                    None => format!("container {} exited with code 0", self.id),
                },
            }),
        }
    }

    fn watch_idle(self: &Arc<Entry>, run: Arc<Run>, after: Duration) {
        let span = info_span!(parent: None, "idle", container = %self.id);
        tokio::spawn(self.clone().stop_when_idle(run, after).instrument(span));
    }

    /// Stops the run once no traffic has gone through the daemon into it for `after`.
    async fn stop_when_idle(self: Arc<Entry>, run: Arc<Run>, after: Duration) {
        let mut activity = self.activity.subscribe();
        loop {
            let now = *activity.borrow_and_update();
            let deadline = (now.open == 0).then(|| now.last + after);
            tokio::select! {
                changed = activity.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = run.exited() => return,
                _ = sleep_until(deadline) => break,
            }
        }
        info!(?after, "idle: stopping the container");
        if let Err(e) = self.stop(&run, libc::SIGTERM, DEFAULT_STOP_TIMEOUT).await {
            debug!(error = %e, "idle stop found nothing to stop");
        }
    }

    /// Marks traffic into the container as open until the guard is dropped.
    pub(crate) fn activity(self: &Arc<Entry>) -> ActivityGuard {
        self.activity.send_modify(|a| a.open += 1);
        ActivityGuard {
            entry: self.clone(),
        }
    }
}

/// Removes a directory tree; a missing one is fine, other failures are logged.
fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(dir = %dir.display(), error = %e, "failed to remove an unpacked image");
        }
        _ => {}
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Retries a connect until the port accepts one. Pends forever once the container is gone:
/// the caller learns of that from the run's exit, with its real cause.
async fn probe(container: &Container, port: u16) -> Result<(), ApiError> {
    let port = container.tcp_port(port.into())?;
    let mut delay = Duration::from_millis(1);
    loop {
        match port.connect().await {
            Ok(_) => return Ok(()),
            Err(Error::NotListening { .. }) => {}
            Err(Error::NotRunning(_)) => std::future::pending::<()>().await,
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_PROBE_DELAY);
    }
}

/// Open traffic through the daemon into a container; see [`Entry::activity`].
pub(crate) struct ActivityGuard {
    entry: Arc<Entry>,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.entry.activity.send_modify(|a| {
            a.open -= 1;
            a.last = Instant::now();
        });
    }
}

impl Run {
    /// Waits until this run's exit is on record.
    pub(crate) async fn exited(&self) -> Arc<ExitInfo> {
        let mut rx = self.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .expect("the run owns its sender");
        exit.clone().expect("waited for it")
    }

    pub(crate) async fn monitor(&self) -> MonitorReply {
        let exit = self.exited().await;
        MonitorReply {
            exit_code: exit.code,
            error: exit.error.clone(),
            oom_killed: exit.oom_killed,
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The runtime's rule for ids, checked here too so that looking up an unknown id never
/// registers it with the runtime.
pub(crate) fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}
