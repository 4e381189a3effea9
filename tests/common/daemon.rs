//! A `silo serve` process of a test's own, on a unix socket and state directory of its own,
//! driven with a real HTTP client (hyper over a UnixStream), and the checks that nothing of
//! its containers is left once it is stopped.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Method, Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpStream, UnixStream};

/// Where a daemon listens.
#[derive(Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

/// One `silo serve` process of a test's own.
pub struct Daemon {
    child: Mutex<Option<Child>>,
    pub dir: tempfile::TempDir,
    pub endpoint: Endpoint,
    token: Option<String>,
    prefix: String,
    /// Container ids and pids seen in answers, for the leak check.
    seen: Mutex<BTreeSet<(String, Option<u32>)>>,
}

impl Daemon {
    /// Starts a daemon on a unix socket in a fresh temporary directory.
    pub async fn start(name: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("make a temporary directory");
        let socket = dir.path().join("run/silo.sock");
        let listen = format!("unix:{}", socket.display());
        Daemon::spawn(name, dir, &listen, Endpoint::Unix(socket), None).await
    }

    pub async fn spawn(
        name: &str,
        dir: tempfile::TempDir,
        listen: &str,
        endpoint: Endpoint,
        token: Option<String>,
    ) -> Daemon {
        super::bundle();
        let mut cmd = silo_serve(&dir, listen);
        if let Some(token) = &token {
            let file = dir.path().join("token");
            std::fs::write(&file, format!("{token}\n")).unwrap();
            cmd.arg("--token-file").arg(file);
        }
        let child = cmd.spawn().expect("spawn silo serve");
        let d = Daemon {
            child: Mutex::new(Some(child)),
            dir,
            endpoint,
            token,
            prefix: format!("d{}-{name}", std::process::id()),
            seen: Mutex::new(BTreeSet::new()),
        };
        d.wait_until_listening().await;
        d
    }

    pub async fn wait_until_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = match &self.endpoint {
                Endpoint::Unix(path) => UnixStream::connect(path).await.is_ok(),
                Endpoint::Tcp(addr) => TcpStream::connect(addr).await.is_ok(),
            };
            if up {
                return;
            }
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
            {
                panic!("silo serve exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "silo serve did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The end of the daemon's log, to show with a failure.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A container id unique to this test and process.
    pub fn id(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    /// Sends one request on a connection of its own.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        let mut req = req;
        req.headers_mut()
            .insert(header::HOST, "silo".parse().unwrap());
        if let Some(token) = &self.token {
            req.headers_mut().insert(
                header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
        }
        let mut sender = match &self.endpoint {
            Endpoint::Unix(path) => handshake(UnixStream::connect(path).await.unwrap()).await,
            Endpoint::Tcp(addr) => handshake(TcpStream::connect(addr).await.unwrap()).await,
        };
        sender.send_request(req).await.expect("send a request")
    }

    /// A request with a raw body; the answer's status and body text.
    pub async fn raw(&self, method: Method, path: &str, body: impl Into<Bytes>) -> (u16, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(body.into()))
            .unwrap();
        let resp = self.send(req).await;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A JSON request; the answer's status and JSON body (null when empty).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, text) = self.raw(method, path, body).await;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: not JSON: {text:?}"))
        };
        self.note(&value);
        (status, value)
    }

    pub fn note(&self, value: &Value) {
        let items = match value {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        for item in items {
            if let Some(id) = item.get("id").and_then(Value::as_str) {
                let pid = item.get("pid").and_then(Value::as_u64).map(|p| p as u32);
                self.seen.lock().unwrap().insert((id.to_string(), pid));
            }
        }
    }

    /// Starts container `suffix` with `args` in the demo bundle, plus any `extra` fields.
    pub async fn put(&self, suffix: &str, args: &[&str], extra: Value) -> (u16, Value) {
        let mut body = json!({ "bundle": super::bundle(), "entrypoint": args });
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        let path = format!("/v1/containers/{}", self.id(suffix));
        self.call(Method::PUT, &path, Some(body)).await
    }

    pub async fn get(&self, suffix: &str) -> (u16, Value) {
        let path = format!("/v1/containers/{}", self.id(suffix));
        self.call(Method::GET, &path, None).await
    }

    /// GET through the proxy to `port` of container `suffix`.
    pub async fn fetch(&self, suffix: &str, port: u16, path: &str) -> (u16, String) {
        let path = format!("/v1/containers/{}/ports/{port}{path}", self.id(suffix));
        self.raw(Method::GET, &path, Bytes::new()).await
    }

    /// Polls until container `suffix` has `status`, for at most `within`.
    pub async fn wait_status(&self, suffix: &str, status: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (code, info) = self.get(suffix).await;
            if code == 200 && info["status"] == status {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "{suffix} did not become {status} within {within:?}: {code} {info}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Deletes every container, stops the daemon with SIGTERM and checks what is left.
    pub async fn teardown(&self) {
        if self.child.lock().unwrap().is_none() {
            return;
        }
        let (status, list) = self.call(Method::GET, "/v1/containers", None).await;
        assert_eq!(status, 200, "{list}");
        let deletes = list.as_array().unwrap().iter().map(|c| {
            let path = format!("/v1/containers/{}", c["id"].as_str().unwrap());
            async move { self.call(Method::DELETE, &path, None).await }
        });
        for (status, body) in futures_util::future::join_all(deletes).await {
            assert_eq!(status, 204, "{body}");
        }
        let exit = self.stop_process();
        assert!(exit.is_some_and(|s| s.success()), "silo serve: {exit:?}");
        if let Endpoint::Unix(path) = &self.endpoint {
            assert!(!path.exists(), "the daemon left its socket behind");
        }
        for (id, pid) in self.seen.lock().unwrap().iter() {
            assert_gone(id, *pid);
        }
    }

    /// Kills the daemon with SIGKILL, as a crash would, and reaps it.
    pub fn crash(&self) {
        let mut child = self.child.lock().unwrap().take().expect("the daemon runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts the daemon again on the same socket and state directory. With `crash_at`, it
    /// kills itself when it reaches that point (see silo::fault).
    pub async fn restart(&self, crash_at: Option<&str>) {
        assert!(
            self.child.lock().unwrap().is_none(),
            "the daemon still runs"
        );
        let Endpoint::Unix(socket) = &self.endpoint else {
            panic!("restarts are tested on unix sockets");
        };
        let mut cmd = silo_serve(&self.dir, &format!("unix:{}", socket.display()));
        if let Some(point) = crash_at {
            cmd.env("SILO_CRASH_AT", point);
        }
        *self.child.lock().unwrap() = Some(cmd.spawn().expect("spawn silo serve"));
        self.wait_until_listening().await;
    }

    /// Waits for a daemon started with a crash point to have died by its own SIGKILL.
    pub async fn crashed(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap();
            if let Some(status) = status {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", self.log());
                *self.child.lock().unwrap() = None;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not reach its crash point"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then SIGKILL if the daemon has not exited within 20 s.
    pub fn stop_process(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap().take()?;
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only reached with the daemon still running when the teardown itself failed.
        self.stop_process();
    }
}

pub fn silo_serve(dir: &tempfile::TempDir, listen: &str) -> Command {
    // Appended to, so that the log tells of every daemon a test started in this directory.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("daemon.log"))
        .unwrap();
    // option_env: examples/soak.rs shares these helpers, and is no integration test.
    #[allow(clippy::option_env_unwrap)]
    let silo = option_env!("CARGO_BIN_EXE_silo").expect("silo is built for the tests");
    let mut cmd = Command::new(silo);
    cmd.arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["serve", "--listen", listen])
        .env(
            "SILO_LOG",
            std::env::var("SILO_LOG").unwrap_or_else(|_| "info,silo::firewall=warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    cmd
}

pub async fn handshake<S>(stream: S) -> hyper::client::conn::http1::SendRequest<Full<Bytes>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake with the daemon");
    tokio::spawn(conn.with_upgrades());
    sender
}

/// The container's processes and cgroups are gone.
pub fn assert_gone(id: &str, pid: Option<u32>) {
    if let Some(pid) = pid
        && let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
    {
        assert!(
            !cgroup.contains(&format!("/silo/{id}\n")),
            "process {pid} of container {id} is still alive"
        );
    }
    for dir in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let leaf = dir.path().join("silo").join(id);
        assert!(!leaf.exists(), "cgroup {} was left behind", leaf.display());
    }
}

/// Runs a test body against a fresh daemon, then tears it down, even when the body failed.
pub async fn with_daemon<F, Fut>(name: &str, body: F)
where
    F: FnOnce(Arc<Daemon>) -> Fut,
    Fut: Future<Output = ()>,
{
    with(Arc::new(Daemon::start(name).await), body).await
}

/// Runs a test body against the daemon `d`, then tears it down, even when the body failed.
pub async fn with<F, Fut>(d: Arc<Daemon>, body: F)
where
    F: FnOnce(Arc<Daemon>) -> Fut,
    Fut: Future<Output = ()>,
{
    let result = std::panic::AssertUnwindSafe(body(d.clone()))
        .catch_unwind()
        .await;
    if result.is_err() {
        eprintln!("daemon log:\n{}", d.log());
    }
    d.teardown().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
