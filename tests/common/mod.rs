//! Shared setup for the integration tests: they run as root against the real kernel, with
//! the bundle from rootfs/build.sh, and check after every test that nothing of silo's is
//! left behind.

#![allow(dead_code)]

pub mod daemon;
pub mod oci;
pub mod soak;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use silo::{Container, Runtime, RuntimeConfig, StartOptions};

/// The demo bundle, built on first use.
pub fn bundle() -> PathBuf {
    static BUILD: Once = Once::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    BUILD.call_once(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "silo's integration tests need root (namespaces, cgroups, veths)"
        );
        let status = std::process::Command::new("bash")
            .arg(root.join("rootfs/build.sh"))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run rootfs/build.sh");
        assert!(status.success(), "rootfs/build.sh failed");
    });
    root.join("rootfs/build/bundle")
}

/// A runtime of the test's own (its own state directory), and the containers it made.
pub struct Harness {
    pub runtime: Runtime,
    _state: tempfile::TempDir,
    prefix: String,
    made: Mutex<Vec<Container>>,
    /// What each container held while it ran, to check it is gone afterwards.
    seen: Mutex<Vec<Seen>>,
    /// The veths of runs already checked by `check_destroyed`.
    checked_host_ifs: Mutex<BTreeSet<String>>,
}

#[derive(Debug, Clone)]
struct Seen {
    id: String,
    pid: u32,
    host_if: Option<String>,
    /// `net:[inode]` of the container's network namespace.
    netns: Option<String>,
}

impl Harness {
    fn new(name: &str, log_limit: u64) -> Harness {
        let state = tempfile::tempdir().expect("make a state directory");
        let config = RuntimeConfig {
            state_dir: state.path().join("state"),
            log_limit,
            ..RuntimeConfig::default()
        };
        Harness {
            runtime: Runtime::new(config).expect("runtime"),
            _state: state,
            prefix: format!("{name}-{}", std::process::id()),
            made: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            checked_host_ifs: Mutex::new(BTreeSet::new()),
        }
    }

    /// A container with an id unique to this test and process.
    pub fn container(&self, suffix: &str) -> Container {
        let c = self
            .runtime
            .container(&format!("{}-{suffix}", self.prefix))
            .expect("valid id");
        self.made.lock().unwrap().push(c.clone());
        c
    }

    /// Options that run `args` in the demo bundle.
    pub fn opts(&self, args: &[&str]) -> StartOptions {
        StartOptions {
            bundle: bundle(),
            entrypoint: Some(args.iter().map(|s| s.to_string()).collect()),
            env: BTreeMap::new(),
            ..StartOptions::default()
        }
    }

    /// Starts `args` in a new container and records what it holds.
    pub async fn start(&self, suffix: &str, args: &[&str]) -> Container {
        let c = self.container(suffix);
        c.start(self.opts(args)).await.expect("start");
        self.record(&c).await;
        c
    }

    /// What this harness's container ids start with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The host ends of the veth pairs of every container recorded so far.
    pub fn host_ifs(&self) -> BTreeSet<String> {
        let mut ifs = self.checked_host_ifs.lock().unwrap().clone();
        let seen = self.seen.lock().unwrap();
        ifs.extend(seen.iter().filter_map(|s| s.host_if.clone()));
        ifs
    }

    /// Checks now, rather than at the end of the test, that the runs recorded for the
    /// destroyed `c` left nothing behind, and drops their records: a long test's would
    /// otherwise pile up (and show in its memory use).
    pub fn check_destroyed(&self, c: &Container) {
        let done: Vec<Seen> = {
            let mut seen = self.seen.lock().unwrap();
            let (done, rest) = seen.drain(..).partition(|s| s.id == c.id());
            *seen = rest;
            done
        };
        let mut ifs = self.checked_host_ifs.lock().unwrap();
        ifs.extend(done.iter().filter_map(|s| s.host_if.clone()));
        drop(ifs);
        for s in &done {
            assert_no_leak(s);
        }
    }

    /// Notes the pid and veth of a running container, for the leak check.
    pub async fn record(&self, c: &Container) {
        let pid = c.pid().expect("running");
        let host_if = c.network_link().await.map(|l| l.host_if);
        let netns = std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .map(|l| l.to_string_lossy().into_owned());
        self.seen.lock().unwrap().push(Seen {
            id: c.id().to_string(),
            pid,
            host_if,
            netns,
        });
    }

    async fn teardown(&self) {
        let made: Vec<Container> = self.made.lock().unwrap().clone();
        for c in made {
            c.destroy(None).await.expect("destroy");
        }
        let seen = self.seen.lock().unwrap().clone();
        for s in seen {
            assert_no_leak(&s);
        }
    }
}

/// Runs a test body with a fresh harness, then destroys everything it made and checks that
/// nothing is left, even when the body failed.
pub async fn run<F, Fut>(name: &str, body: F)
where
    F: FnOnce(std::sync::Arc<Harness>) -> Fut,
    Fut: Future<Output = ()>,
{
    run_with_log_limit(name, RuntimeConfig::default().log_limit, body).await
}

/// [`run`], with a runtime whose container logs rotate at `log_limit` bytes.
pub async fn run_with_log_limit<F, Fut>(name: &str, log_limit: u64, body: F)
where
    F: FnOnce(std::sync::Arc<Harness>) -> Fut,
    Fut: Future<Output = ()>,
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter(silo::log_filter())
        .with_test_writer()
        .try_init();
    bundle();
    let h = std::sync::Arc::new(Harness::new(name, log_limit));
    let result = std::panic::AssertUnwindSafe(body(h.clone()))
        .catch_unwind()
        .await;
    h.teardown().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn assert_no_leak(s: &Seen) {
    // The init and everything it started is gone (a zombie would still show /proc/PID;
    // a reused pid would be in another cgroup, which the check below covers).
    if let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{}/cgroup", s.pid)) {
        assert!(
            !cgroup.contains(&format!("/silo/{}", s.id)),
            "process {} of container {} is still alive",
            s.pid,
            s.id
        );
    }
    for dir in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let leaf = dir.path().join("silo").join(&s.id);
        assert!(!leaf.exists(), "cgroup {} was left behind", leaf.display());
    }
    if let Some(name) = &s.host_if {
        assert!(
            !Path::new("/sys/class/net").join(name).exists(),
            "veth {name} of container {} was left behind",
            s.id
        );
    }
    if let Some(netns) = &s.netns {
        // No process of the container lives on in its network namespace. (The kernel reuses
        // namespace inode numbers, so a match counts only inside the container's cgroup.)
        for proc in std::fs::read_dir("/proc").unwrap().flatten() {
            let ns = std::fs::read_link(proc.path().join("ns/net"));
            if ns.is_ok_and(|l| l.to_string_lossy() == *netns) {
                let cgroup = std::fs::read_to_string(proc.path().join("cgroup"));
                assert!(
                    !cgroup.is_ok_and(|c| c.contains(&format!("/{}\n", s.id))),
                    "{} still lives in the netns of container {}",
                    proc.path().display(),
                    s.id
                );
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("rootfs/build/bundle"),
        "a mount of the bundle leaked into the host: {mounts}"
    );
}

/// Fetches `path` from `port`, retrying while the server inside is still starting.
pub async fn get(c: &Container, port: u32, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let req = http::Request::get(path)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        match c.tcp_port(port).unwrap().fetch(req).await {
            Ok(resp) => {
                use http_body_util::BodyExt;
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                return (status, String::from_utf8_lossy(&body).into_owned());
            }
            Err(silo::Error::NotListening { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
                let running = c.running();
                let outcome = c.outcome();
                panic!(
                    "fetch {path} from port {port}: {e}\n\
                     running: {running}, outcome: {outcome:?}\nlog:\n{log}"
                )
            }
        }
    }
}

/// The exit code `monitor` reports, or 0 for success.
pub async fn exit_code(c: &Container) -> i32 {
    match tokio::time::timeout(Duration::from_secs(20), c.monitor())
        .await
        .expect("the container exits within 20 s")
    {
        Ok(()) => 0,
        Err(silo::Error::Exit(e)) => e.code,
        Err(e) => panic!("monitor: {e}"),
    }
}
