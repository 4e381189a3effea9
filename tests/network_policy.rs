//! Network policy, end to end: what containers reach with and without internet, with an
//! allow list, and what is left after destroy and after a crash.
//!
//! Nothing here touches the real machine's routes, forwarding or firewall. Each test builds
//! a small world of network namespaces of its own: a "host" namespace, where silo runs, with
//! a fake uplink `up0` to an "internet" namespace that holds web servers at 198.51.100.10
//! (ports 80 and 8080) and 198.51.100.11 (port 80) and a DNS server at 198.51.100.53. The
//! internet namespace has no route to the containers' addresses: only masquerading gets
//! their traffic back. The test's scenario then runs in a child process of this test
//! binary, entered into the host namespace with `nsenter --net` (only the network
//! namespace: the cgroup and /sys mounts stay as they are), which refuses to run unless it
//! is in that namespace. Around each test, the real namespace's routes, forwarding switches,
//! interfaces and nftables ruleset are compared before and after.
//!
//! The scenarios are `#[ignore]`d tests named `inner_*`; the outer tests run them.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use silo::firewall::{self, Egress};
use silo::{EgressRule, Error, Runtime, RuntimeConfig, StartOptions};

const UPLINK: &str = "up0";
const HOST_UPLINK_ADDR: &str = "203.0.113.2";
const WEB: &str = "198.51.100.10";
const WEB_OTHER: &str = "198.51.100.11";
const DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// Where the inner scenarios run a server on the host, on every address it has.
const HOST_PORT: u16 = 9000;

// Outer tests: one lab each, one scenario inside it.

#[test]
fn internet_off_fails_at_once_and_a_route_added_back_leads_nowhere() {
    in_lab("off", |lab| lab.run("inner_internet_off"));
}

#[test]
fn internet_on_reaches_the_fake_internet_by_address_and_by_name() {
    in_lab("on", |lab| lab.run("inner_internet_on"));
}

#[test]
fn containers_reach_neither_each_other_nor_the_host_but_the_host_reaches_both() {
    in_lab("iso", |lab| lab.run("inner_isolation"));
}

#[test]
fn the_allow_list_admits_what_it_names_and_the_table_is_idempotent() {
    in_lab("allow", |lab| lab.run("inner_allow_list"));
}

#[test]
fn a_table_removed_behind_silos_back_is_made_again_for_the_next_container() {
    in_lab("stale", |lab| lab.run("inner_table_removed_behind_silo"));
}

#[test]
fn a_runtime_started_after_a_crash_removes_what_dead_containers_left() {
    in_lab("crash", |lab| {
        // The first runtime starts two containers and then is killed, its containers with
        // it. One container's network namespace is kept alive by this test, as a stray
        // process or mount would, so its veth outlives it.
        let mut first = lab.spawn("inner_crash_start");
        let out = BufReader::new(first.stdout.take().expect("piped stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                println!("{line}");
                // The harness prints the test's name on the same line, before it.
                if let Some(at) = line.find("READY ") {
                    let _ = tx.send(line[at + "READY ".len()..].to_string());
                }
            }
        });
        let Ok(ready) = rx.recv_timeout(Duration::from_secs(120)) else {
            let _ = first.kill();
            let _ = first.wait();
            panic!("the crash scenario never got ready");
        };
        let words: Vec<&str> = ready.split_whitespace().collect();
        let (x_pid, y_pid): (u32, u32) = (words[0].parse().unwrap(), words[1].parse().unwrap());
        // A pid of 0 or 1 would make the kill below hit far more than the containers.
        assert!(x_pid > 1 && y_pid > 1, "{ready}");
        let (x_if, y_if) = (words[2], words[3]);
        let ids = [words[4].to_string(), words[5].to_string()];
        let held = File::open(format!("/proc/{x_pid}/ns/net")).expect("hold X's namespace");

        first.kill().expect("kill the first runtime");
        first.wait().expect("reap the first runtime");
        for pid in [x_pid, y_pid] {
            // Killing a pid namespace's init ends everything in it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for pid in [x_pid, y_pid] {
            wait_dead(pid);
        }
        let links = lab.host_ip(&["-o", "link", "show"]);
        assert!(
            links.contains(x_if),
            "X's veth lives on with its namespace: {links}"
        );
        assert!(
            !links.contains(y_if),
            "Y's veth went with its namespace: {links}"
        );

        lab.run_with(
            "inner_crash_restart",
            &[("SILO_NETPOL_GONE", format!("{x_if} {y_if}"))],
        );
        drop(held);
        remove_cgroups(&ids);
    });
}

// The lab.

/// A host namespace with an uplink to an internet namespace, and the servers out there.
struct Lab {
    bundle: PathBuf,
    prefix: String,
    host: String,
    inet: String,
    state: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    servers: Vec<std::thread::JoinHandle<()>>,
}

fn in_lab(tag: &str, body: impl FnOnce(&Lab)) {
    let bundle = common::bundle();
    ensure_nft();
    let before = RealHost::snapshot();
    {
        let lab = Lab::new(tag, &bundle);
        body(&lab);
    }
    RealHost::snapshot().assert_same_as(&before);
}

impl Lab {
    fn new(tag: &str, bundle: &Path) -> Lab {
        let base = format!("silo-np-{}-{tag}", std::process::id());
        let mut lab = Lab {
            bundle: bundle.to_path_buf(),
            prefix: format!("np{}{tag}", std::process::id()),
            host: format!("{base}-h"),
            inet: format!("{base}-i"),
            state: tempfile::tempdir().expect("make a state directory"),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        for ns in [&lab.host, &lab.inet] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (h, i) = (lab.host.clone(), lab.inet.clone());
        ip(&[
            "link", "add", UPLINK, "netns", &h, "type", "veth", "peer", "name", "wan0", "netns", &i,
        ]);
        ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("{HOST_UPLINK_ADDR}/24"),
            "dev",
            UPLINK,
        ]);
        ip(&["-n", &h, "link", "set", UPLINK, "up"]);
        ip(&["-n", &h, "route", "add", "default", "via", "203.0.113.1"]);
        ip(&["-n", &i, "addr", "add", "203.0.113.1/24", "dev", "wan0"]);
        ip(&["-n", &i, "link", "set", "wan0", "up"]);
        for addr in [WEB, WEB_OTHER, &DNS.to_string()] {
            ip(&["-n", &i, "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        }
        lab.start_servers();
        lab
    }

    /// Binds the internet's servers from a thread that enters the internet namespace and
    /// then ends; the sockets stay in that namespace, and are served from ordinary threads.
    fn start_servers(&mut self) {
        let ns = File::open(format!("/run/netns/{}", self.inet)).expect("open the namespace");
        let (web, dns) = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let web: Vec<TcpListener> = [(WEB, 80), (WEB, 8080), (WEB_OTHER, 80)]
                .iter()
                .map(|(a, p)| TcpListener::bind((*a, *p)).expect("bind a web server"))
                .collect();
            let dns = UdpSocket::bind((DNS, 53)).expect("bind the DNS server");
            (web, dns)
        })
        .join()
        .expect("bind the servers");
        for listener in web {
            let stop = self.stop.clone();
            self.servers.push(std::thread::spawn(move || {
                serve_http(listener, &stop, None)
            }));
        }
        let stop = self.stop.clone();
        self.servers
            .push(std::thread::spawn(move || serve_dns(dns, &stop)));
    }

    fn host_ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.host];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn command(&self, scenario: &str, env: &[(&str, String)]) -> Command {
        let exe = std::env::current_exe().expect("the test binary");
        let netns = format!("/run/netns/{}", self.host);
        let inode = std::fs::metadata(&netns).expect("the host namespace").ino();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={netns}"))
            .arg("--")
            .arg(exe)
            .args([
                scenario,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SILO_NETPOL_NETNS", inode.to_string())
            .env("SILO_NETPOL_STATE", self.state.path().join("state"))
            .env("SILO_NETPOL_BUNDLE", &self.bundle)
            .env("SILO_NETPOL_PREFIX", &self.prefix)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, scenario: &str) {
        self.run_with(scenario, &[]);
    }

    fn run_with(&self, scenario: &str, env: &[(&str, String)]) {
        let out = self
            .command(scenario, env)
            .output()
            .expect("run the scenario");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Shown with --nocapture, or when the outer test fails.
        println!("{stdout}{stderr}");
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "scenario {scenario} failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
    }

    fn spawn(&self, scenario: &str) -> std::process::Child {
        self.command(scenario, &[])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the scenario")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
        for ns in [&self.host, &self.inet] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// nft is how silo drives the firewall; install it the way rootfs/build.sh installs busybox.
fn ensure_nft() {
    let found = ["/usr/sbin/nft", "/sbin/nft"]
        .iter()
        .any(|p| Path::new(p).exists());
    if found {
        return;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "nftables"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ok = install() || (Command::new("apt-get").arg("update").status().is_ok() && install());
    assert!(ok, "nftables is needed and could not be installed");
}

/// Answers every HTTP request with where it came from and where it went:
/// `hello from ADDR:PORT to PEER`. With `hits`, counts the connections.
fn serve_http(listener: TcpListener, stop: &AtomicBool, hits: Option<&AtomicUsize>) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::SeqCst) {
        let (mut conn, peer) = match listener.accept() {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if let Some(h) = hits {
            h.fetch_add(1, Ordering::SeqCst);
        }
        let local = listener.local_addr().unwrap();
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let body = format!("hello from {local} to {}\n", peer.ip());
        let _ = write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

/// Answers A queries for any name with the web server's address, and anything else with no
/// records.
fn serve_dns(socket: UdpSocket, stop: &AtomicBool) {
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(answer) = dns_answer(&buf[..n]) {
            let _ = socket.send_to(&answer, peer);
        }
    }
}

fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    let mut i = 12;
    while *query.get(i)? != 0 {
        i += 1 + usize::from(query[i]);
    }
    let question_end = i + 5;
    let qtype = u16::from_be_bytes([*query.get(i + 1)?, *query.get(i + 2)?]);
    query.get(..question_end)?;
    let is_a = qtype == 1;
    let mut out = query[..2].to_vec();
    out.extend([0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    out.extend(&query[12..question_end]);
    if is_a {
        let ip: Ipv4Addr = WEB.parse().unwrap();
        out.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend(ip.octets());
    }
    Some(out)
}

/// Waits until process `pid` has exited (gone, or a zombie whose namespaces are released).
fn wait_dead(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return;
            }
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "process {pid} did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroups of containers whose runtime was killed stay behind; they are empty now.
fn remove_cgroups(ids: &[String]) {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    for root in roots {
        for id in ids {
            let dir = root.join("silo").join(id);
            if dir.is_dir() {
                std::fs::remove_dir(&dir)
                    .unwrap_or_else(|e| panic!("remove cgroup {}: {e}", dir.display()));
            }
        }
    }
}

/// What the tests must never change in the real network namespace.
#[derive(Debug, PartialEq)]
struct RealHost {
    routes: Vec<String>,
    forwarding: BTreeMap<String, String>,
    interfaces: Vec<String>,
    ruleset: String,
}

impl RealHost {
    fn snapshot() -> RealHost {
        // Other suites may run containers in the real namespace meanwhile: their veths
        // (sl…) and silo's table, which exists while they run, are not ours to compare.
        let not_silo = |line: &&str| !line.contains(" sl") && !line.contains("dev sl");
        let routes = ip(&["route", "show", "table", "all"]);
        let routes = routes
            .lines()
            .filter(not_silo)
            .map(str::to_string)
            .collect();
        let mut forwarding = BTreeMap::new();
        for key in [
            "ip_forward",
            "conf/all/forwarding",
            "conf/default/forwarding",
        ] {
            let v = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{key}")).unwrap();
            forwarding.insert(key.to_string(), v.trim().to_string());
        }
        let net_dev = std::fs::read_to_string("/proc/net/dev").unwrap();
        let interfaces: Vec<String> = net_dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(|n| n.trim().to_string())
            .filter(|n| !n.starts_with(firewall::HOST_IF_PREFIX))
            .collect();
        for name in &interfaces {
            let path = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
            if let Ok(v) = std::fs::read_to_string(&path) {
                forwarding.insert(name.clone(), v.trim().to_string());
            }
        }
        let out = Command::new("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        let full = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !full.contains(UPLINK) && !full.contains("198.51.100") && !full.contains("203.0.113"),
            "the real firewall mentions this test's lab:\n{full}"
        );
        RealHost {
            routes,
            forwarding,
            interfaces,
            ruleset: without_table(&full, "table inet silo {"),
        }
    }

    fn assert_same_as(&self, before: &RealHost) {
        assert_eq!(self, before, "the real network namespace changed");
    }
}

/// `ruleset` without the block that starts with the line `header`.
fn without_table(ruleset: &str, header: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in ruleset.lines() {
        if line == header {
            skipping = true;
        } else if skipping && line == "}" {
            skipping = false;
        } else if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

// Inner scenarios: run by the outer tests, inside the lab's host namespace.

/// The lab as the scenario sees it; `None` when not run by an outer test.
struct World {
    runtime: Runtime,
    /// Container ids start with it, unique to the outer test.
    prefix: String,
    made: std::sync::Mutex<Vec<silo::Container>>,
    bundle: PathBuf,
    state: PathBuf,
    netns_seen: std::sync::Mutex<Vec<String>>,
}

fn world(uplink: Option<&str>) -> Option<World> {
    let inode = std::env::var("SILO_NETPOL_NETNS").ok()?;
    let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    assert_eq!(
        own.to_string(),
        inode,
        "refusing to run a network scenario outside the lab's host namespace"
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(silo::log_filter())
        .with_test_writer()
        .try_init();
    let state = PathBuf::from(std::env::var("SILO_NETPOL_STATE").unwrap());
    let runtime = Runtime::new(RuntimeConfig {
        state_dir: state.clone(),
        uplink: uplink.map(str::to_string),
        resolvers: Some(vec![DNS]),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    Some(World {
        runtime,
        prefix: std::env::var("SILO_NETPOL_PREFIX").unwrap(),
        made: std::sync::Mutex::new(Vec::new()),
        bundle: std::env::var("SILO_NETPOL_BUNDLE").unwrap().into(),
        state,
        netns_seen: std::sync::Mutex::new(Vec::new()),
    })
}

/// How a container's run went.
#[derive(Debug)]
struct Ran {
    code: i32,
    log: String,
    took: Duration,
}

impl World {
    fn opts(&self, script: &str) -> StartOptions {
        StartOptions {
            bundle: self.bundle.clone(),
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
            ..StartOptions::default()
        }
    }

    fn container(&self, name: &str) -> silo::Container {
        let c = self
            .runtime
            .container(&format!("{}-{name}", self.prefix))
            .unwrap();
        self.made.lock().unwrap().push(c.clone());
        c
    }

    async fn start(&self, name: &str, opts: StartOptions) -> silo::Container {
        let c = self.container(name);
        c.start(opts)
            .await
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        if let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/net", c.pid().unwrap())) {
            self.netns_seen
                .lock()
                .unwrap()
                .push(ns.to_string_lossy().into_owned());
        }
        c
    }

    /// Runs a container to its end and destroys it.
    async fn run(&self, id: &str, opts: StartOptions) -> Ran {
        let started = Instant::now();
        let c = self.start(id, opts).await;
        let code = common::exit_code(&c).await;
        let took = started.elapsed();
        let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
        c.destroy(None).await.unwrap();
        println!("--- {id} (exit {code}, {took:?}):\n{log}");
        Ran { code, log, took }
    }

    /// Nothing of silo's is left in the host namespace: no veth, no table, the uplink's
    /// forwarding off again, and no container network namespace alive.
    fn assert_clean(&self) {
        let net_dev = std::fs::read_to_string("/proc/net/dev").unwrap();
        assert!(
            !net_dev.contains(&format!(" {}", firewall::HOST_IF_PREFIX)),
            "a veth is left:\n{net_dev}"
        );
        let tables = nft(&["list", "tables"]);
        assert!(!tables.contains("silo"), "silo's table is left: {tables}");
        assert_eq!(uplink_forwarding(), "0", "the uplink still forwards");
        let seen = self.netns_seen.lock().unwrap().clone();
        for proc_dir in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(ns) = std::fs::read_link(proc_dir.path().join("ns/net")) {
                let ns = ns.to_string_lossy().into_owned();
                assert!(
                    !seen.contains(&ns),
                    "{} is still in a container's namespace",
                    proc_dir.path().display()
                );
            }
        }
        let records: Vec<_> = std::fs::read_dir(&self.state)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("network.json").exists())
            .collect();
        assert!(records.is_empty(), "network records are left: {records:?}");
    }
}

fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().expect("run nft");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uplink_forwarding() -> String {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{UPLINK}/forwarding"))
        .unwrap()
        .trim()
        .to_string()
}

/// Runs a scenario's body, then destroys every container it made, even when it failed.
fn scenario(w: &World, body: impl std::future::Future<Output = ()>) {
    use futures_util::FutureExt;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let result = std::panic::AssertUnwindSafe(body).catch_unwind().await;
            let made = w.made.lock().unwrap().clone();
            for c in made {
                if let Err(e) = c.destroy(None).await {
                    eprintln!("destroy {}: {e}", c.id());
                }
            }
            if let Err(panic) = result {
                std::panic::resume_unwind(panic);
            }
        })
}

/// Fetches `url` from inside a container, bounded by `timeout` (busybox wget's own -T is
/// not used: it crashes on some failures), and prints `TAG rc=N`.
fn fetch(tag: &str, url: &str) -> String {
    format!("timeout 5 wget -qO- {url}; echo {tag} rc=$?; ")
}

/// A busybox shell function that prints `URL rc=N` for a bounded fetch.
const PROBE: &str = "probe() { timeout 5 wget -qO- \"$1\" >/dev/null 2>&1; echo \"$1 rc=$?\"; }; ";

/// The host end's address, from the container's own /31 route.
const GATEWAY: &str = "gw=$(ip route | sed -n 's|/31 dev eth0.*||p'); ";

/// A server on every address of the host namespace, counting connections.
fn host_server() -> (Arc<AtomicUsize>, Arc<AtomicBool>) {
    let listener = TcpListener::bind(("0.0.0.0", HOST_PORT)).expect("bind the host's server");
    let hits = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (h, s) = (hits.clone(), stop.clone());
    std::thread::spawn(move || serve_http(listener, &s, Some(&h)));
    (hits, stop)
}

#[test]
#[ignore = "run by the outer tests inside a lab"]
fn inner_internet_off() {
    let Some(w) = world(Some(UPLINK)) else { return };
    scenario(&w, async {
        let (hits, stop) = host_server();

        // No default route: the connect fails at once.
        let script = format!("ip route; {}", fetch("web", &format!("http://{WEB}/")));
        let ran = w.run("off", w.opts(&script)).await;
        assert_eq!(ran.code, 0, "{ran:?}");
        assert!(!ran.log.contains("default"), "no default route: {ran:?}");
        assert!(ran.log.contains("web rc=1"), "{ran:?}");
        assert!(ran.log.contains("unreachable"), "{ran:?}");
        assert!(
            ran.took < Duration::from_secs(3),
            "it must fail at once: {ran:?}"
        );
        assert!(!ran.log.contains("hello"), "{ran:?}");

        // With CAP_NET_ADMIN the container adds the route itself, and still gets nowhere:
        // not out to the internet, not to the host.
        let bundle = net_admin_bundle(&w);
        let script = format!(
            "{GATEWAY} ip route add default via $gw && echo route added; ip route; {}{}",
            fetch("web", &format!("http://{WEB}/")),
            fetch("host", &format!("http://{HOST_UPLINK_ADDR}:{HOST_PORT}/")),
        );
        let opts = StartOptions {
            bundle: bundle.path().to_path_buf(),
            ..w.opts(&script)
        };
        let ran = w.run("off-admin", opts).await;
        assert!(ran.log.contains("route added"), "{ran:?}");
        assert!(ran.log.contains("default via"), "{ran:?}");
        assert!(
            !ran.log.contains("web rc=0") && ran.log.contains("web rc="),
            "{ran:?}"
        );
        assert!(
            ran.log.contains("host rc=1"),
            "refused, not left hanging: {ran:?}"
        );
        assert!(!ran.log.contains("hello"), "{ran:?}");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "the host's server was reached"
        );
        stop.store(true, Ordering::SeqCst);
        w.assert_clean();
    });
}

#[test]
#[ignore = "run by the outer tests inside a lab"]
fn inner_table_removed_behind_silo() {
    let Some(w) = world(Some(UPLINK)) else { return };
    scenario(&w, async {
        let (hits, stop) = host_server();
        // The runtime now holds the table in memory: a start without internet has nothing
        // to change in it.
        let a = w.start("a", w.opts("exec /bin/testprog sleep")).await;
        assert!(nft(&["list", "tables"]).contains("silo"));
        // Someone else removes it. What the runtime remembers is stale now.
        nft(&["delete", "table", "inet", "silo"]);
        let script = format!(
            "{PROBE}{GATEWAY}probe http://$gw:{HOST_PORT}/; echo probes done; \
             exec /bin/testprog sleep"
        );
        let b = w.start("b", w.opts(&script)).await;
        let log = wait_for_log(&b, "probes done").await;
        assert!(log.contains(" rc=1"), "the host was reached: {log}");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "a container reached the host's server"
        );
        let table = nft(&["list", "table", "inet", "silo"]);
        assert!(table.contains("sl*"), "{table}");
        for c in [a, b] {
            c.destroy(None).await.unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        w.assert_clean();
    });
}

/// The demo bundle, with CAP_NET_ADMIN on top of the default capabilities.
fn net_admin_bundle(w: &World) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(w.bundle.join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let caps: Vec<&str> = vec![
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_ADMIN",
    ];
    config["process"]["capabilities"] = serde_json::json!({
        "bounding": caps, "effective": caps, "permitted": caps,
    });
    config["root"]["path"] = serde_json::json!(w.bundle.join("rootfs"));
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
#[ignore = "run by the outer tests inside a lab"]
fn inner_internet_on() {
    // No uplink configured: the default route's interface is taken.
    let Some(w) = world(None) else { return };
    scenario(&w, async {
        let script = format!(
            "cat /etc/resolv.conf; ip route; {}nslookup -type=a fake.example.test; \
             echo dns rc=$?",
            fetch("web", &format!("http://{WEB}/")),
        );
        let opts = StartOptions {
            enable_internet: true,
            ..w.opts(&script)
        };
        let ran = w.run("on", opts).await;
        assert_eq!(ran.code, 0, "{ran:?}");
        assert!(ran.log.contains(&format!("nameserver {DNS}")), "{ran:?}");
        assert!(ran.log.contains("default via"), "{ran:?}");
        // Masqueraded: the server saw the host's uplink address.
        let hello = format!("hello from {WEB}:80 to {HOST_UPLINK_ADDR}");
        assert!(ran.log.contains(&hello), "{ran:?}");
        assert!(ran.log.contains("web rc=0"), "{ran:?}");
        assert!(ran.log.contains("dns rc=0"), "{ran:?}");
        assert!(ran.log.contains(&format!("Address: {WEB}")), "{ran:?}");
        w.assert_clean();
    });
}

#[test]
#[ignore = "run by the outer tests inside a lab"]
fn inner_isolation() {
    let Some(w) = world(Some(UPLINK)) else { return };
    scenario(&w, async {
        let (hits, stop) = host_server();
        let b = w.start("b", w.opts("exec /bin/testprog serve 8080")).await;
        let b_link = b.network_link().await.unwrap();
        let targets = [
            format!("http://{}:8080/", b_link.container_addr),
            format!("http://$gw:{HOST_PORT}/"),
            format!("http://{}:{HOST_PORT}/", b_link.host_addr),
            format!("http://{HOST_UPLINK_ADDR}:{HOST_PORT}/"),
            format!("http://127.0.0.1:{HOST_PORT}/"),
            "http://169.254.169.254/".to_string(),
        ];
        let probes: String = targets.iter().map(|t| format!("probe {t}; ")).collect();
        let script =
            format!("{PROBE}{GATEWAY}{probes}echo probes done; exec /bin/testprog serve 8080");
        // A has internet, so the host forwards for it: even so it reaches none of these.
        let a = w
            .start(
                "a",
                StartOptions {
                    enable_internet: true,
                    ..w.opts(&script)
                },
            )
            .await;
        // C has no internet.
        let c = w.start("c", w.opts(&script)).await;

        for (name, container) in [("a", &a), ("c", &c)] {
            let log = wait_for_log(container, "probes done").await;
            println!("--- {name}:\n{log}");
            let results: Vec<&str> = log.lines().filter(|l| l.contains(" rc=")).collect();
            assert_eq!(results.len(), targets.len(), "{name}: {log}");
            for line in results {
                // 1: refused or unreachable at once; 143 would be a timeout.
                assert!(
                    line.ends_with(" rc=1"),
                    "{name} got through or hung: {line}"
                );
            }
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "a container reached the host's server"
        );

        // The host reaches every container's ports.
        for (name, container) in [("a", &a), ("b", &b), ("c", &c)] {
            let (status, body) = common::get(container, 8080, "/").await;
            assert_eq!(
                (status, body.as_str()),
                (200, "hello from silo\n"),
                "{name}"
            );
        }
        for container in [a, b, c] {
            container.destroy(None).await.unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        w.assert_clean();
    });
}

/// The container's log once it holds `marker`.
async fn wait_for_log(c: &silo::Container, marker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
        if log.contains(marker) {
            return log;
        }
        assert!(Instant::now() < deadline, "{marker:?} never came:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
#[ignore = "run by the outer tests inside a lab"]
fn inner_allow_list() {
    let Some(w) = world(Some(UPLINK)) else { return };
    scenario(&w, async {
        // Egress rules without internet are refused before anything is made.
        let bad = w.container("no-internet");
        let opts = StartOptions {
            egress: vec!["198.51.100.10:80".parse().unwrap()],
            ..w.opts("true")
        };
        let err = bad.start(opts).await.unwrap_err();
        assert!(
            matches!(err, Error::Firewall(firewall::Error::EgressWithoutInternet)),
            "{err}"
        );
        assert!(!bad.running());

        let allow: Vec<EgressRule> = vec![format!("{WEB}:80").parse().unwrap()];
        let script = format!(
            "{PROBE}probe http://{WEB}/; probe http://{WEB}:8080/; probe http://{WEB_OTHER}/; \
             nslookup -type=a fake.example.test; echo dns rc=$?; echo probes done; exec sleep 1000"
        );
        let c = w
            .start(
                "allow",
                StartOptions {
                    enable_internet: true,
                    egress: allow.clone(),
                    ..w.opts(&script)
                },
            )
            .await;
        let log = wait_for_log(&c, "probes done").await;
        println!("--- allow:\n{log}");
        assert!(log.contains(&format!("http://{WEB}/ rc=0")), "{log}");
        assert!(log.contains(&format!("http://{WEB}:8080/ rc=1")), "{log}");
        assert!(log.contains(&format!("http://{WEB_OTHER}/ rc=1")), "{log}");
        assert!(
            log.contains("dns rc=0"),
            "the resolver stays reachable: {log}"
        );

        // Applying the same policy again changes nothing, handles included; another policy
        // changes only this container's rules, and applying the first one again restores it.
        let link = c.network_link().await.unwrap();
        let resolver: EgressRule = format!("{DNS}:53").parse().unwrap();
        let policy = |allow: &[EgressRule]| Egress::Internet {
            uplink: UPLINK.into(),
            allow: allow.iter().copied().chain([resolver]).collect(),
        };
        let listing = || nft(&["-a", "list", "table", "inet", "silo"]);
        let first = listing();
        println!("--- table:\n{first}");
        assert!(
            first.contains(&format!("\"{} {WEB}/32:80\"", link.host_if)),
            "{first}"
        );
        let (l, p) = (link.clone(), policy(&allow));
        tokio::task::spawn_blocking(move || firewall::apply(&l, &p).unwrap())
            .await
            .unwrap();
        assert_eq!(
            listing(),
            first,
            "applying the same policy twice changed the table"
        );

        let other: Vec<EgressRule> = vec![format!("{WEB_OTHER}/32").parse().unwrap()];
        let (l, p) = (link.clone(), policy(&other));
        tokio::task::spawn_blocking(move || firewall::apply(&l, &p).unwrap())
            .await
            .unwrap();
        let changed = listing();
        assert!(changed.contains(&format!("{WEB_OTHER}/32\"")), "{changed}");
        assert!(!changed.contains(&format!("{WEB}/32:80\"")), "{changed}");
        let (l, p) = (link.clone(), policy(&allow));
        tokio::task::spawn_blocking(move || firewall::apply(&l, &p).unwrap())
            .await
            .unwrap();
        // The same rules, though maybe in another order: they all accept.
        let strip = |t: &str| {
            let mut lines: Vec<String> = t
                .lines()
                .map(|l| l.split(" # handle").next().unwrap_or(l).to_string())
                .collect();
            lines.sort();
            lines
        };
        assert_eq!(strip(&listing()), strip(&first));

        c.destroy(None).await.unwrap();
        w.assert_clean();
    });
}

#[test]
#[ignore = "run by the outer tests inside a lab"]
fn inner_crash_start() {
    let Some(w) = world(Some(UPLINK)) else { return };
    scenario(&w, async {
        let x = w
            .start(
                "x",
                StartOptions {
                    enable_internet: true,
                    egress: vec![format!("{WEB}:80").parse().unwrap()],
                    ..w.opts("exec /bin/testprog sleep")
                },
            )
            .await;
        let y = w.start("y", w.opts("exec /bin/testprog sleep")).await;
        let tables = nft(&["list", "table", "inet", "silo"]);
        assert!(tables.contains(UPLINK), "{tables}");
        assert_eq!(uplink_forwarding(), "1");
        let (xl, yl) = (
            x.network_link().await.unwrap(),
            y.network_link().await.unwrap(),
        );
        println!(
            "READY {} {} {} {} {} {}",
            x.pid().unwrap(),
            y.pid().unwrap(),
            xl.host_if,
            yl.host_if,
            x.id(),
            y.id()
        );
        std::io::stdout().flush().unwrap();
        // Killed here by the outer test.
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
}

#[test]
#[ignore = "run by the outer tests inside a lab"]
fn inner_crash_restart() {
    // Runtime::new, inside world(), is the restart.
    let Some(w) = world(Some(UPLINK)) else { return };
    let gone = std::env::var("SILO_NETPOL_GONE").unwrap();
    let net_dev = std::fs::read_to_string("/proc/net/dev").unwrap();
    for host_if in gone.split_whitespace() {
        assert!(!net_dev.contains(host_if), "{host_if} is left:\n{net_dev}");
    }
    w.assert_clean();
    // A second start has nothing left to do.
    drop(w);
    let again = world(Some(UPLINK)).unwrap();
    again.assert_clean();
}

#[test]
fn dns_answers_are_well_formed() {
    // A query for "a.test", type A.
    let query = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1,
    ];
    let answer = dns_answer(&query).unwrap();
    assert_eq!(&answer[..2], &[0x12, 0x34]);
    assert_eq!(answer[7], 1, "one answer");
    assert_eq!(&answer[answer.len() - 4..], &[198, 51, 100, 10]);
    let mut aaaa = query;
    aaaa[21] = 28;
    assert_eq!(dns_answer(&aaaa).unwrap()[7], 0, "no AAAA answer");
    assert!(dns_answer(&query[..15]).is_none());
}

#[test]
fn without_table_drops_only_that_table() {
    let ruleset =
        "table inet filter {\n\tchain x {\n\t}\n}\ntable inet silo {\n\tset a {\n\t}\n}\n";
    assert_eq!(
        without_table(ruleset, "table inet silo {"),
        "table inet filter {\n\tchain x {\n\t}\n}\n"
    );
}
