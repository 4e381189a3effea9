//! End-to-end checks of `silo::network` against the real kernel: veth pairs into network
//! namespaces that each test creates and removes itself. Needs root; skipped otherwise.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use silo::network::{self, AddressPool, Error, Link};

/// A network namespace kept alive by an `unshare -n sleep` process this test started. Dropping
/// it kills that process (by its PID) so the namespace, and any veth in it, goes away.
struct Netns {
    child: Child,
    file: Option<File>,
}

impl Netns {
    fn new() -> Netns {
        let child = Command::new("unshare")
            .args(["-n", "sleep", "60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare -n sleep 60");
        let mut ns = Netns { child, file: None };
        // unshare enters the new namespace and then execs sleep; until it has, /proc/PID/ns/net
        // still names ours.
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let path = format!("/proc/{}/ns/net", ns.pid());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let theirs = std::fs::read_link(&path).expect("read the namespace link");
            let exe = std::fs::read_link(format!("/proc/{}/exe", ns.pid())).unwrap_or_default();
            if theirs != own && exe.file_name().is_some_and(|n| n == "sleep") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "unshare did not enter a new namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ns.file = Some(File::open(&path).expect("open the namespace"));
        ns
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_ref().unwrap().as_fd()
    }

    /// Runs `ip ARGS` inside the namespace and returns its stdout.
    fn ip(&self, args: &[&str]) -> String {
        let pid = self.pid().to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &pid, "-n", "ip"]).args(args);
        run(cmd)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.file = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deletes the host end of a veth pair on drop unless disarmed, so a failing assertion does
/// not leave the pair behind.
struct LinkGuard(Option<String>);

impl LinkGuard {
    fn new(link: &Link) -> LinkGuard {
        LinkGuard(Some(link.host_if.clone()))
    }

    /// After a successful detach the name may already belong to someone else's container.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            let _ = Command::new("ip")
                .args(["link", "del", "dev", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn run(mut cmd: Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn host_ip(args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(cmd)
}

fn host_link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The `<...>` flags of the one interface `ip -o link` printed.
fn flags(ip_link_output: &str) -> Vec<String> {
    let start = ip_link_output.find('<').expect("flags in ip link output") + 1;
    let end = ip_link_output[start..].find('>').unwrap() + start;
    ip_link_output[start..end]
        .split(',')
        .map(str::to_string)
        .collect()
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: needs root to create network namespaces and veth pairs");
    false
}

/// Accepts one connection on `addr` inside `ns` and greets it. The listening socket is opened
/// from a thread that entered the namespace, so it belongs to the namespace; the thread exits
/// afterwards and the rest of the test process is unaffected.
fn serve_once_in(ns: &Netns, addr: SocketAddr) -> std::thread::JoinHandle<()> {
    let ns_file = ns.file.as_ref().unwrap().try_clone().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        nix::sched::setns(&ns_file, CloneFlags::CLONE_NEWNET).expect("enter the namespace");
        let listener = TcpListener::bind(addr).expect("listen inside the namespace");
        ready_tx.send(()).unwrap();
        let (mut conn, _) = listener.accept().expect("accept");
        conn.write_all(b"hello from the container").unwrap();
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server ready");
    server
}

#[tokio::test]
async fn attach_wires_both_ends_and_carries_tcp() {
    if !is_root() {
        return;
    }
    let ns = Netns::new();
    let pool = AddressPool::default();
    let link = network::attach(&pool, ns.fd()).await.expect("attach");
    let mut guard = LinkGuard::new(&link);

    assert!(pool.contains(link.container_addr), "{link:?}");
    assert_eq!(u32::from(link.host_addr) % 2, 0, "{link:?}");
    assert_eq!(
        u32::from(link.container_addr),
        u32::from(link.host_addr) + 1
    );
    assert_eq!(link.host_if, network::host_if_name(link.container_addr));

    // Host end: addressed and up.
    let addrs = host_ip(&["-o", "-4", "addr", "show", "dev", &link.host_if]);
    assert!(
        addrs.contains(&format!("inet {}/31", link.host_addr)),
        "{addrs}"
    );
    let host_link = host_ip(&["-o", "link", "show", "dev", &link.host_if]);
    assert!(flags(&host_link).iter().any(|f| f == "UP"), "{host_link}");

    // Container end: eth0 addressed and up, lo up; nothing named after the host end.
    let addrs = ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains(&format!("inet {}/31", link.container_addr)),
        "{addrs}"
    );
    for dev in ["eth0", "lo"] {
        let out = ns.ip(&["-o", "link", "show", "dev", dev]);
        assert!(flags(&out).iter().any(|f| f == "UP"), "{out}");
    }
    let lo = ns.ip(&["-o", "-4", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("inet 127.0.0.1/8"), "{lo}");

    // The host reaches a server listening on the container address.
    let server_addr = SocketAddr::from((link.container_addr, 8080));
    let server = serve_once_in(&ns, server_addr);
    let mut conn = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))
        .expect("connect from the host to the container");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = String::new();
    conn.read_to_string(&mut greeting).unwrap();
    assert_eq!(greeting, "hello from the container");
    server.join().unwrap();

    network::detach(&link).await.expect("detach");
    guard.disarm();
    assert!(
        !host_link_exists(&link.host_if),
        "{} still exists",
        link.host_if
    );
    let left = ns.ip(&["-o", "link", "show"]);
    assert!(!left.contains("eth0"), "{left}");

    // Detaching again is not an error: the pair is already gone.
    network::detach(&link).await.expect("second detach");
}

#[tokio::test]
async fn attaches_in_a_row_get_different_addresses() {
    if !is_root() {
        return;
    }
    let pool = AddressPool::default();
    let (ns1, ns2) = (Netns::new(), Netns::new());
    let first = network::attach(&pool, ns1.fd())
        .await
        .expect("first attach");
    let mut guard1 = LinkGuard::new(&first);
    let second = network::attach(&pool, ns2.fd())
        .await
        .expect("second attach");
    let mut guard2 = LinkGuard::new(&second);

    assert_ne!(first.container_addr, second.container_addr);
    assert_ne!(first.host_addr, second.host_addr);
    assert_ne!(first.host_if, second.host_if);

    for (link, guard) in [(&first, &mut guard1), (&second, &mut guard2)] {
        network::detach(link).await.expect("detach");
        guard.disarm();
        assert!(
            !host_link_exists(&link.host_if),
            "{} still exists",
            link.host_if
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attaches_share_a_small_pool_without_clashing() {
    if !is_root() {
        return;
    }
    // Two slots, outside the default pool so other tests do not compete for them.
    let pool: AddressPool = "10.210.255.252/30".parse().unwrap();
    let namespaces: Vec<Netns> = (0..3).map(|_| Netns::new()).collect();
    let attaches = namespaces.iter().map(|ns| network::attach(&pool, ns.fd()));
    let results = futures_util::future::join_all(attaches).await;

    let mut guards = Vec::new();
    let mut links = Vec::new();
    let mut exhausted = 0;
    for result in results {
        match result {
            Ok(link) => {
                guards.push(LinkGuard::new(&link));
                links.push(link);
            }
            Err(Error::PoolExhausted(p)) => {
                assert_eq!(p, "10.210.255.252/30");
                exhausted += 1;
            }
            Err(e) => panic!("attach: {e}"),
        }
    }
    assert_eq!((links.len(), exhausted), (2, 1), "{links:?}");
    let addrs: HashSet<Ipv4Addr> = links.iter().map(|l| l.container_addr).collect();
    let expected: HashSet<Ipv4Addr> = [
        Ipv4Addr::new(10, 210, 255, 253),
        Ipv4Addr::new(10, 210, 255, 255),
    ]
    .into();
    assert_eq!(addrs, expected);

    // Freeing a slot makes it available again.
    network::detach(&links[0]).await.expect("detach");
    guards[0].disarm();
    let late = namespaces
        .iter()
        .find(|ns| {
            ns.ip(&["-o", "link", "show"])
                .lines()
                .all(|l| !l.contains("eth0"))
        })
        .expect("a namespace without eth0");
    let again = network::attach(&pool, late.fd())
        .await
        .expect("attach after a detach");
    guards.push(LinkGuard::new(&again));
    assert_eq!(again, links[0]);

    for (link, guard) in [(&links[1], 1), (&again, 2)] {
        network::detach(link).await.expect("detach");
        guards[guard].disarm();
    }
}

#[tokio::test]
async fn attach_refuses_a_namespace_that_already_has_eth0() {
    if !is_root() {
        return;
    }
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ]);
    match network::attach(&AddressPool::default(), ns.fd()).await {
        Err(Error::ContainerInterfaceExists(name)) => assert_eq!(name, "eth0"),
        Ok(link) => {
            let _guard = LinkGuard::new(&link);
            panic!("attach succeeded: {link:?}");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test]
async fn detach_of_a_missing_pair_succeeds() {
    if !is_root() {
        return;
    }
    // An address in a reserved block no pool here uses, so no real pair has this name.
    let container_addr = Ipv4Addr::new(198, 51, 100, 255);
    let link = Link {
        host_if: network::host_if_name(container_addr),
        host_addr: Ipv4Addr::new(198, 51, 100, 254),
        container_addr,
    };
    assert!(!host_link_exists(&link.host_if));
    network::detach(&link)
        .await
        .expect("detach of a missing pair");
}

#[tokio::test]
async fn attach_with_a_fd_that_is_no_namespace_fails_cleanly() {
    if !is_root() {
        return;
    }
    let not_a_namespace = File::open("/dev/null").unwrap();
    match network::attach(&AddressPool::default(), not_a_namespace.as_fd()).await {
        Err(e @ Error::Io { .. }) => {
            assert!(e.to_string().contains("enter network namespace"), "{e}");
        }
        Ok(link) => {
            let _guard = LinkGuard::new(&link);
            panic!("attach succeeded: {link:?}");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}
