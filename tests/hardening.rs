//! What a container started with silo's defaults can see and do, looked at from inside, and
//! bundles written to escape.

mod common;

use std::path::{Path, PathBuf};

use common::{bundle, run};
use serde_json::{Value, json};

/// Runs `script` with /bin/sh in a container of the demo bundle (or `bundle_dir`) and
/// returns its exit code and output.
async fn sh(
    h: &common::Harness,
    name: &str,
    bundle_dir: Option<PathBuf>,
    script: &str,
) -> (i32, String) {
    let c = h.container(name);
    let mut opts = h.opts(&["/bin/sh", "-c", script]);
    if let Some(dir) = bundle_dir {
        opts.bundle = dir;
    }
    c.start(opts).await.unwrap();
    let code = common::exit_code(&c).await;
    let mut log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
    if let Some(err) = c.outcome().and_then(|o| o.boot_error.clone()) {
        log.push_str(&err);
    }
    c.destroy(None).await.unwrap();
    (code, log)
}

fn status_line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[tokio::test]
async fn defaults_confine_the_container() {
    run("defaults", |h| async move {
        let (code, out) = sh(&h, "status", None, "exec /bin/testprog status fds").await;
        assert_eq!(code, 0, "{out}");
        // CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE
        // NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP
        let usual = "00000000a80425fb";
        assert_eq!(status_line(&out, "CapEff:"), usual);
        assert_eq!(status_line(&out, "CapPrm:"), usual);
        assert_eq!(status_line(&out, "CapBnd:"), usual);
        assert_eq!(status_line(&out, "CapInh:"), "0000000000000000");
        assert_eq!(status_line(&out, "CapAmb:"), "0000000000000000");
        assert_eq!(status_line(&out, "NoNewPrivs:"), "1");
        assert_eq!(status_line(&out, "Seccomp:"), "2");
        // The init holds stdio and nothing else of the runtime's.
        let fds: Vec<&str> = out
            .lines()
            .filter(|l| l.contains(" -> "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(fds, ["0", "1", "2"], "{out}");
    })
    .await;
}

#[tokio::test]
async fn blocked_calls_fail_and_ordinary_work_succeeds() {
    run("calls", |h| async move {
        let script = r#"
            unshare -n true 2>/dev/null && echo unshare=allowed || echo unshare=blocked
            mount -t tmpfs none /mnt 2>/dev/null && echo mount=allowed || echo mount=blocked
            nsenter -t 1 -u true 2>/dev/null && echo setns=allowed || echo setns=blocked
            swapoff -a 2>/dev/null && echo swapoff=allowed || echo swapoff=blocked
            echo 1 > /proc/sys/kernel/panic 2>/dev/null && echo procsys=writable \
                || echo procsys=readonly
            echo 1 > /proc/sysrq-trigger 2>/dev/null && echo sysrq=writable || echo sysrq=readonly
            [ -z "$(cat /proc/timer_list 2>/dev/null)" ] && echo timer_list=empty
            [ -z "$(ls /sys/firmware 2>/dev/null)" ] && echo firmware=empty
            echo data > /tmp/file && [ "$(cat /tmp/file)" = data ] && echo files=ok
            /bin/testprog serve 127.0.0.1:9000 2>/dev/null &
            for i in $(seq 50); do
                wget -qO- http://127.0.0.1:9000/ 2>/dev/null && break
                sleep 0.05
            done
            (exit 7); sh -c 'exit 5'; [ $? = 5 ] && echo fork_exec=ok
            kill %1
            grep ' /proc ' /proc/self/mountinfo | grep -q 'nosuid,nodev,noexec' \
                && echo proc=nosuid,nodev,noexec
            echo "dev=$(ls /dev | tr '\n' ' ')"
            [ "$(cut -d' ' -f6 /proc/1/stat)" = 1 ] && echo session=own
        "#;
        let (_, out) = sh(&h, "calls", None, script).await;
        for want in [
            "unshare=blocked",
            "mount=blocked",
            "setns=blocked",
            "swapoff=blocked",
            "procsys=readonly",
            "sysrq=readonly",
            "timer_list=empty",
            "firmware=empty",
            "files=ok",
            "hello from silo",
            "fork_exec=ok",
            "proc=nosuid,nodev,noexec",
            "dev=fd full mqueue null ptmx pts random shm stderr stdin stdout tty urandom zero ",
            "session=own",
        ] {
            assert!(
                out.lines().any(|l| l == want),
                "missing {want:?} in:\n{out}"
            );
        }
    })
    .await;
}

/// A writable copy of the demo rootfs, for bundles that plant things in it.
fn rootfs_copy(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(bundle().join("rootfs"))
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success());
    root
}

fn write_bundle(dir: &Path, config: &Value) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn demo_config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(bundle().join("config.json")).unwrap()).unwrap()
}

#[tokio::test]
async fn symlinks_in_the_rootfs_cannot_redirect_mounts_to_the_host() {
    run("symlinks", |h| async move {
        let dir = tempfile::tempdir().unwrap();
        let root = rootfs_copy(dir.path());
        // Host directories the tenant would like silo to mount over or create nodes in.
        let victim = tempfile::tempdir().unwrap();
        let victim_dev = victim.path().join("dev");
        let victim_data = victim.path().join("data");
        std::fs::create_dir(&victim_dev).unwrap();
        std::fs::create_dir(&victim_data).unwrap();
        std::fs::remove_dir(root.join("dev")).unwrap();
        std::os::unix::fs::symlink(&victim_dev, root.join("dev")).unwrap();
        // Resolved inside the root, the link names this directory of the rootfs.
        let inside = root.join(victim_dev.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::os::unix::fs::symlink("../../../../../../..", root.join("escape")).unwrap();
        let mut cfg = demo_config();
        cfg["root"]["path"] = json!("rootfs");
        cfg["mounts"].as_array_mut().unwrap().push(
            json!({"destination": format!("/escape{}", victim_data.display()),
                         "type": "tmpfs", "source": "tmpfs"}),
        );
        write_bundle(dir.path(), &cfg);

        let (code, out) = sh(
            &h,
            "redirect",
            Some(dir.path().to_path_buf()),
            "ls /dev/null && echo ran",
        )
        .await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("ran"), "{out}");
        // The host's directories saw nothing: no nodes, no mounts.
        assert_eq!(std::fs::read_dir(&victim_dev).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(&victim_data).unwrap().count(), 0);
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&victim.path().display().to_string()),
            "{mounts}"
        );
        // What the tenant pointed outside landed inside its own rootfs instead (and its
        // /dev, a tmpfs of the container's own mount namespace, is gone with it).
        assert!(inside.is_dir());
        let data_inside = root.join(victim_data.strip_prefix("/").unwrap());
        assert!(
            data_inside.is_dir(),
            "{} was not made in the rootfs",
            data_inside.display()
        );
    })
    .await;
}

#[tokio::test]
async fn a_cwd_outside_the_root_stays_inside() {
    run("cwd", |h| async move {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = demo_config();
        cfg["root"]["path"] = json!(bundle().join("rootfs"));
        cfg["process"]["cwd"] = json!("/../../../..");
        write_bundle(dir.path(), &cfg);
        let (code, out) = sh(
            &h,
            "cwd",
            Some(dir.path().to_path_buf()),
            "pwd; ls /bin/testprog",
        )
        .await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, "/\n/bin/testprog\n");
    })
    .await;
}

#[tokio::test]
async fn the_runtime_binary_cannot_be_run_or_reopened_from_inside() {
    run("selfexe", |h| async move {
        // The entrypoint names the runtime's own binary through /proc/self/exe, which
        // points at it until the exec.
        let c = h.container("direct");
        c.start(h.opts(&["/proc/self/exe"])).await.unwrap();
        let err = c.monitor().await.unwrap_err().to_string();
        assert!(
            err.contains("refusing to run the runtime's own binary"),
            "{err}"
        );

        // The same through a script's interpreter line.
        let dir = tempfile::tempdir().unwrap();
        let root = rootfs_copy(dir.path());
        std::fs::write(root.join("bin/sneaky"), "#!/proc/self/exe\n").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(root.join("bin/sneaky"))
                .unwrap()
                .permissions(),
            0o755,
        );
        std::process::Command::new("chmod")
            .args(["755"])
            .arg(root.join("bin/sneaky"))
            .status()
            .unwrap();
        let mut cfg = demo_config();
        cfg["root"]["path"] = json!("rootfs");
        write_bundle(dir.path(), &cfg);
        let c = h.container("script");
        let mut opts = h.opts(&["/bin/sneaky"]);
        opts.bundle = dir.path().to_path_buf();
        c.start(opts).await.unwrap();
        let err = c.monitor().await.unwrap_err().to_string();
        assert!(
            err.contains("refusing to run the runtime's own binary"),
            "{err}"
        );

        // And after the exec, /proc/1/exe is the entrypoint, not the runtime.
        let (_, out) = sh(&h, "after", None, "readlink /proc/1/exe").await;
        assert_eq!(out.trim(), "/bin/busybox");
    })
    .await;
}

#[tokio::test]
async fn a_fake_dev_null_is_not_used_for_masking() {
    run("fakenull", |h| async move {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "host secret\n").unwrap();
        let mut cfg = demo_config();
        cfg["root"]["path"] = json!(bundle().join("rootfs"));
        cfg["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/dev/null", "type": "bind", "source": secret, "options": ["bind"]
        }));
        write_bundle(dir.path(), &cfg);
        let c = h.container("fake");
        let mut opts = h.opts(&["/bin/true"]);
        opts.bundle = dir.path().to_path_buf();
        c.start(opts).await.unwrap();
        let err = c.monitor().await.unwrap_err().to_string();
        assert!(err.contains("check /dev/null"), "{err}");
    })
    .await;
}

/// Every capability but those whose calls a probe could make dangerous if seccomp let them
/// through (reboot, modules, clocks): with these, an EPERM can only come from seccomp.
fn wide_caps() -> Value {
    let excluded = [
        "CAP_SYS_BOOT",
        "CAP_SYS_MODULE",
        "CAP_SYS_TIME",
        "CAP_MAC_ADMIN",
    ];
    // Only what the test itself holds (root may lack some, CAP_SYS_RESOURCE here).
    let all: Vec<String> = caps::read(None, caps::CapSet::Permitted)
        .unwrap()
        .into_iter()
        .map(|c| c.to_string())
        .filter(|name| !excluded.contains(&name.as_str()))
        .collect();
    json!({"bounding": all, "effective": all, "permitted": all})
}

async fn probe(h: &common::Harness, name: &str, cfg: Value, calls: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), &cfg);
    let c = h.container(name);
    let mut args = vec!["/bin/testprog", "probe"];
    args.extend_from_slice(calls);
    let mut opts = h.opts(&args);
    opts.bundle = dir.path().to_path_buf();
    c.start(opts).await.unwrap();
    if let Err(e) = c.monitor().await {
        panic!("{e}");
    }
    std::fs::read_to_string(c.log_path()).unwrap()
}

#[tokio::test]
async fn seccomp_blocks_what_capabilities_alone_would_allow() {
    run("seccomp", |h| async move {
        let calls = [
            "mount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "clone_newns",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "userfaultfd",
            "open_by_handle_at",
            "io_uring_setup",
            "ioctl_tiocsti",
            "ioctl_tiocsti_high",
            "ioctl_tioclinux",
            "init_module",
            "kexec_load",
            "reboot",
            "swapon",
            "clock_settime",
        ];
        let mut cfg = demo_config();
        cfg["root"]["path"] = json!(bundle().join("rootfs"));
        let out = probe(&h, "default", cfg.clone(), &[]).await;
        for call in calls {
            assert!(
                out.lines().any(|l| l == format!("{call}=EPERM")),
                "{call}:\n{out}"
            );
        }

        cfg["process"]["capabilities"] = wide_caps();
        let out = probe(&h, "wide", cfg.clone(), &calls[..16]).await;
        for call in &calls[..16] {
            assert!(
                out.lines().any(|l| l == format!("{call}=EPERM")),
                "{call}:\n{out}"
            );
        }

        // The control: with a profile that allows everything, the same probe sees the
        // calls go through to the kernel, which answers otherwise than EPERM.
        cfg["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW"});
        let out = probe(&h, "control", cfg, &["unshare", "bpf", "ioctl_tiocsti"]).await;
        assert!(out.contains("unshare=ok"), "{out}");
        assert!(!out.contains("bpf=EPERM"), "{out}");
        assert!(out.contains("ioctl_tiocsti=ENOTTY"), "{out}");
    })
    .await;
}

#[tokio::test]
async fn device_nodes_the_container_makes_cannot_be_opened() {
    run("devices", |h| async move {
        // Volumes the bundle adds without nodev: a tmpfs and a bind of a host directory.
        let dir = tempfile::tempdir().unwrap();
        let volume = tempfile::tempdir().unwrap();
        let mut cfg = demo_config();
        cfg["root"]["path"] = json!(bundle().join("rootfs"));
        let mounts = cfg["mounts"].as_array_mut().unwrap();
        mounts.push(
            json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "mode=1777"]}),
        );
        mounts.push(
            json!({"destination": "/data", "type": "bind", "source": volume.path(),
                           "options": ["rbind", "rw"]}),
        );
        write_bundle(dir.path(), &cfg);
        // 1:3 is the null device: harmless to open, so a failure to refuse shows plainly.
        let script = r#"
            echo x > /dev/null && echo null=ok
            [ "$(head -c 3 /dev/zero | wc -c)" = 3 ] && echo zero=ok
            head -c 8 /dev/urandom > /dev/null && echo urandom=ok
            for node in /dev/made /tmp/made /scratch/made /data/made; do
                mknod "$node" c 1 3 || echo "mknod $node failed"
                (exec 3> "$node") 2>/dev/null && echo "$node=opened" || echo "$node=refused"
                rm -f "$node"
            done
        "#;
        let (code, out) = sh(&h, "mknod", Some(dir.path().to_path_buf()), script).await;
        assert_eq!(code, 0, "{out}");
        let wanted = [
            "null=ok",
            "zero=ok",
            "urandom=ok",
            "/dev/made=refused",
            "/tmp/made=refused",
            "/scratch/made=refused",
            "/data/made=refused",
        ];
        for want in wanted {
            assert!(
                out.lines().any(|l| l == want),
                "missing {want:?} in:\n{out}"
            );
        }
    })
    .await;
}
