//! Bundles: bad ones are refused with errors that name the file and field and leave nothing
//! behind; real tools' config.json files are accepted or refused by field; limits from the
//! bundle and the instance type reach the cgroup.

mod common;

use std::path::{Path, PathBuf};

use common::{bundle, exit_code, run};
use serde_json::{Value, json};
use silo::Error;

/// A bundle directory of the test's own whose config is `config` and whose root is the demo
/// rootfs.
struct TestBundle {
    dir: tempfile::TempDir,
}

impl TestBundle {
    fn new(mut config: Value) -> TestBundle {
        let dir = tempfile::tempdir().unwrap();
        if config["root"]["path"] == json!("rootfs") || config["root"]["path"].is_null() {
            config["root"]["path"] = json!(bundle().join("rootfs"));
        }
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        TestBundle { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

fn demo_config() -> Value {
    let text = std::fs::read_to_string(bundle().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn case(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cases")
        .join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Options that run `dir` with its own entrypoint.
fn as_written(h: &common::Harness, dir: &Path) -> silo::StartOptions {
    silo::StartOptions {
        bundle: dir.to_path_buf(),
        entrypoint: None,
        ..h.opts(&[])
    }
}

/// Starts `bundle` and returns the error, checking that no cgroup was left.
async fn refused(h: &common::Harness, name: &str, dir: &Path) -> String {
    let c = h.container(name);
    let err = c
        .start(as_written(h, dir))
        .await
        .expect_err("the bundle must be refused");
    assert!(!c.running());
    for ctrl in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let leaf = ctrl.path().join("silo").join(c.id());
        assert!(!leaf.exists(), "{} left behind", leaf.display());
    }
    err.to_string()
}

#[tokio::test]
async fn bad_bundles_are_refused_by_name() {
    run("badbundle", |h| async move {
        let empty = tempfile::tempdir().unwrap();
        let msg = refused(&h, "noconfig", empty.path()).await;
        assert!(msg.contains("config.json is missing"), "{msg}");

        let msg = refused(&h, "nodir", Path::new("/nonexistent/bundle")).await;
        assert!(msg.contains("/nonexistent/bundle"), "{msg}");

        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join("config.json"), "{\"ociVersion\": ").unwrap();
        let msg = refused(&h, "badjson", bad.path()).await;
        assert!(msg.contains("config.json"), "{msg}");

        // Each: a change to the demo config, and what the error must name.
        type Change = fn(&mut Value);
        let cases: &[(&str, Change, &[&str])] = &[
            (
                "norootfs",
                |c| c["root"]["path"] = json!("/nonexistent/rootfs"),
                &["/nonexistent/rootfs", "config.json"],
            ),
            (
                "unsupported",
                |c| c["linux"]["intelRdt"] = json!({"closID": "x"}),
                &["field linux.intelRdt is not supported"],
            ),
            (
                "misspelt",
                |c| c["root"]["readOnly"] = json!(true),
                &["unknown field root.readOnly"],
            ),
            (
                "badtype",
                |c| c["process"]["user"]["uid"] = json!("root"),
                &["config.json", "line", "column"],
            ),
            (
                "climb",
                |c| c["mounts"] = json!([{"destination": "/../../etc", "type": "tmpfs"}]),
                &["climbs out of the root filesystem"],
            ),
            (
                "rlimit",
                |c| {
                    c["process"]["rlimits"] =
                        json!([{"type": "RLIMIT_NOFILE", "hard": u64::MAX, "soft": 1}])
                },
                &["process.rlimits[0]", "hard limit"],
            ),
            (
                "sysctl",
                |c| c["linux"]["sysctl"] = json!({"kernel.panic": "1"}),
                &["linux.sysctl.kernel.panic"],
            ),
            (
                // Granting a device beyond the standard ones cannot be honoured.
                "tun",
                |c| {
                    c["linux"]["resources"] = json!({"devices": [
                        {"allow": false, "access": "rwm"},
                        {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                        {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm"}
                    ]})
                },
                &["linux.resources.devices[2]"],
            ),
            (
                "noargs",
                |c| c["process"]["args"] = json!([]),
                &["process.args"],
            ),
        ];
        for (name, change, wanted) in cases {
            let mut cfg = demo_config();
            change(&mut cfg);
            let b = TestBundle::new(cfg);
            let msg = refused(&h, name, &b.path()).await;
            for want in *wanted {
                assert!(msg.contains(want), "{name}: {want:?} not in {msg:?}");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn runc_spec_is_refused_by_field_then_runs_without_a_terminal() {
    run("runcspec", |h| async move {
        let cfg = case("runc-1.1-spec.config.json");
        let b = TestBundle::new(cfg.clone());
        let msg = refused(&h, "as-is", &b.path()).await;
        assert!(msg.contains("process.terminal"), "{msg}");

        let mut cfg = cfg;
        cfg["process"]["terminal"] = json!(false);
        cfg["process"]["args"] = json!(["/bin/testprog", "status", "hostname", "exit", "0"]);
        let b = TestBundle::new(cfg);
        let c = h.container("runs");
        let opts = as_written(&h, &b.path());
        c.start(opts).await.unwrap();
        assert_eq!(exit_code(&c).await, 0);
        let out = std::fs::read_to_string(c.log_path()).unwrap();
        // AUDIT_WRITE (29), KILL (5), NET_BIND_SERVICE (10), and nothing else.
        assert!(out.contains("CapEff:\t0000000020000420"), "{out}");
        assert!(out.contains("CapBnd:\t0000000020000420"), "{out}");
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        assert!(out.lines().any(|l| l == "runc"), "{out}");
    })
    .await;
}

#[tokio::test]
async fn podman_config_runs_with_its_seccomp_profile() {
    run("podman", |h| async move {
        let mut cfg = case("podman-4.3-httpd.config.json");
        cfg["root"]["path"] = json!(bundle().join("rootfs"));
        let b = TestBundle::new(cfg.clone());
        // As written, its bind sources are Podman's files, which this host does not have.
        let msg = refused(&h, "as-is", &b.path()).await;
        assert!(msg.contains("mounts[") && msg.contains(".source"), "{msg}");

        // Bind sources rewritten to files of the test's own, as the case's README says.
        let files = tempfile::tempdir().unwrap();
        cfg["root"]["path"] = json!(bundle().join("rootfs"));
        cfg["process"]["args"] = json!([
            "/bin/sh",
            "-c",
            "cat /etc/hostname; /bin/testprog env status"
        ]);
        for m in cfg["mounts"].as_array_mut().unwrap() {
            if m["type"] != json!("bind") {
                continue;
            }
            let name = Path::new(m["destination"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_owned();
            let src = files.path().join(name);
            if m["destination"] == json!("/dev/shm") {
                std::fs::create_dir(&src).unwrap();
            } else {
                std::fs::write(&src, "podman-made\n").unwrap();
            }
            m["source"] = json!(src);
        }
        let b = TestBundle::new(cfg);
        let c = h.container("runs");
        let opts = as_written(&h, &b.path());
        c.start(opts).await.unwrap();
        if let Err(e) = c.monitor().await {
            panic!("{e}");
        }
        let out = std::fs::read_to_string(c.log_path()).unwrap();
        assert!(out.lines().next() == Some("podman-made"), "{out}");
        assert!(out.contains("container=podman"), "{out}");
        // Podman leaves noNewPrivileges out; silo's default for that is on.
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        assert!(out.contains("Seccomp:\t2"), "{out}");
        // The bundle's nested cgroupsPath went below /silo and is gone with the container:
        // once destroy returns (monitor reports the exit before the teardown is done).
        c.destroy(None).await.unwrap();
        for ctrl in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let dir = ctrl.path().join("silo/libpod_parent");
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    })
    .await;
}

fn read_cgroup(pid: u32, controller: &str, file: &str) -> Option<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _ = parts.next();
        let ctrls = parts.next()?;
        let path = parts.next()?;
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })?;
    let v1 = Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(path.trim_start_matches('/'));
    std::fs::read_to_string(v1.join(file))
        .ok()
        .map(|s| s.trim().to_string())
}

#[tokio::test]
async fn limits_reach_the_cgroup_and_oom_is_reported() {
    if silo::cgroup::Layout::detect() != silo::cgroup::Layout::V1 {
        eprintln!("this test reads v1 controller files");
        return;
    }
    run("limits", |h| async move {
        let mut cfg = demo_config();
        cfg["linux"]["resources"] = json!({"pids": {"limit": 64}, "memory": {"limit": 268435456}});
        let b = TestBundle::new(cfg);
        let c = h.container("bundle");
        let mut opts = h.opts(&["/bin/testprog", "sleep"]);
        opts.bundle = b.path();
        c.start(opts).await.unwrap();
        h.record(&c).await;
        let pid = c.pid().unwrap();
        assert_eq!(read_cgroup(pid, "pids", "pids.max").as_deref(), Some("64"));
        assert_eq!(
            read_cgroup(pid, "memory", "memory.limit_in_bytes").as_deref(),
            Some("268435456")
        );
        c.destroy(None).await.unwrap();

        let c = h.container("lite");
        let mut opts = h.opts(&["/bin/testprog", "sleep"]);
        opts.instance = Some("lite".parse().unwrap());
        c.start(opts).await.unwrap();
        h.record(&c).await;
        let pid = c.pid().unwrap();
        assert_eq!(
            read_cgroup(pid, "memory", "memory.limit_in_bytes").as_deref(),
            Some("268435456")
        );
        assert_eq!(
            read_cgroup(pid, "cpu", "cpu.cfs_quota_us").as_deref(),
            Some("6250")
        );
        assert_eq!(
            read_cgroup(pid, "pids", "pids.max").as_deref(),
            Some("4096")
        );
        c.destroy(None).await.unwrap();

        let c = h.container("oom");
        let mut opts = h.opts(&["/bin/testprog", "alloc", "256"]);
        opts.instance = Some("cpu=1,memory=64M".parse().unwrap());
        c.start(opts).await.unwrap();
        match c.monitor().await {
            Err(Error::Exit(e)) => {
                assert!(e.oom_killed, "{e:?}");
                assert_eq!(e.code, 137);
                assert!(e.to_string().contains("ran out of memory"), "{e}");
            }
            other => panic!("expected an OOM kill, got {other:?}"),
        }
    })
    .await;
}

/// A network namespace of the test's own, deleted when dropped.
struct NetNs(String);

impl NetNs {
    fn new(name: &str) -> NetNs {
        let status = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(status.success(), "ip netns add {name}");
        NetNs(name.to_string())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[tokio::test]
async fn a_joined_network_namespace_is_used_as_is() {
    run("joinnet", |h| async move {
        let ns = NetNs::new(&format!("silo-test-{}", std::process::id()));
        let mut cfg = demo_config();
        cfg["root"]["path"] = json!(bundle().join("rootfs"));
        for n in cfg["linux"]["namespaces"].as_array_mut().unwrap() {
            if n["type"] == json!("network") {
                n["path"] = json!(format!("/var/run/netns/{}", ns.0));
            }
        }
        let b = TestBundle::new(cfg);
        let c = h.container("joined");
        let mut opts = h.opts(&["/bin/sh", "-c", "ip -o link | cut -d: -f2; sleep 5"]);
        opts.bundle = b.path();
        c.start(opts).await.unwrap();
        // silo made no veth for it, and will not guess an address for its ports.
        assert!(c.network_link().await.is_none());
        let err = c.tcp_port(8080).unwrap().connect().await.unwrap_err();
        assert!(matches!(err, Error::ForeignNetwork(_)), "{err}");
        // Inside, it sees the namespace it joined: loopback only, no eth0 of silo's.
        let mut out = String::new();
        for _ in 0..100 {
            out = std::fs::read_to_string(c.log_path()).unwrap_or_default();
            if out.contains("lo") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"], "{out}");
        c.destroy(None).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_cgroups_path_inside_another_container_is_refused() {
    run("nested", |h| async move {
        let outer = h.start("outer", &["/bin/testprog", "sleep"]).await;
        let mut cfg = demo_config();
        cfg["root"]["path"] = json!(bundle().join("rootfs"));
        cfg["linux"]["cgroupsPath"] = json!(format!("{}/inner", outer.id()));
        let b = TestBundle::new(cfg);
        let msg = refused(&h, "inner", &b.path()).await;
        assert!(msg.contains("holds processes"), "{msg}");
        // The outer container is untouched and goes as usual.
        assert!(outer.running());
        outer.destroy(None).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn oom_score_adj_and_hostname_are_honoured() {
    run("procopts", |h| async move {
        let mut cfg = demo_config();
        cfg["root"]["path"] = json!(bundle().join("rootfs"));
        cfg["process"]["oomScoreAdj"] = json!(500);
        cfg["hostname"] = json!("tenant-7");
        let b = TestBundle::new(cfg.clone());
        let c = h.container("adj");
        let mut opts = h.opts(&["/bin/sh", "-c", "cat /proc/self/oom_score_adj; hostname"]);
        opts.bundle = b.path();
        c.start(opts).await.unwrap();
        c.monitor().await.unwrap();
        let out = std::fs::read_to_string(c.log_path()).unwrap();
        assert_eq!(out, "500\ntenant-7\n");

        cfg["hostname"] = json!("x".repeat(65));
        let b = TestBundle::new(cfg);
        let msg = refused(&h, "longname", &b.path()).await;
        assert!(msg.contains("hostname") && msg.contains("64"), "{msg}");
    })
    .await;
}
