//! Exits reported once and right, whatever the container's processes do; limits that hold.

mod common;

use std::time::{Duration, Instant};

use common::{exit_code, get, run};
use silo::Error;

#[tokio::test]
async fn an_init_that_exits_takes_its_children_with_it() {
    run("orphaned", |h| async move {
        // The init leaves children and grandchildren running, then exits 1.
        let c = h
            .start(
                "parent",
                &["/bin/sh", "-c", "/bin/testprog fork 3 & sleep 0.3; exit 1"],
            )
            .await;
        let cgroup_procs = format!("/sys/fs/cgroup/pids/silo/{}/cgroup.procs", c.id());
        assert_eq!(exit_code(&c).await, 1);
        // Reported once, and every process of the container is gone by then. (The empty
        // cgroup itself may still be being removed: destroy waits for that.)
        let left = std::fs::read_to_string(&cgroup_procs).unwrap_or_default();
        assert!(
            left.trim().is_empty(),
            "processes outlived the init: {left}"
        );
        assert!(!c.running());
        assert_eq!(exit_code(&c).await, 1);
    })
    .await;
}

#[tokio::test]
async fn destroy_completes_when_the_init_never_reaps() {
    run("zombies", |h| async move {
        let c = h
            .start("hoarder", &["/bin/testprog", "orphans", "20", "sleep"])
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), c.destroy(None))
            .await
            .expect("destroy finishes within 10 s")
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        c.monitor().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_pids_limit() {
    run("forkbomb", |h| async move {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(common::bundle().join("config.json")).unwrap(),
        )
        .unwrap();
        cfg["root"]["path"] = serde_json::json!(common::bundle().join("rootfs"));
        cfg["linux"]["resources"] = serde_json::json!({"pids": {"limit": 50}});
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let c = h.container("bomb");
        let mut opts = h.opts(&["/bin/testprog", "forkbomb"]);
        opts.bundle = dir.path().to_path_buf();
        c.start(opts).await.unwrap();
        h.record(&c).await;
        let log = c.log_path();
        let deadline = Instant::now() + Duration::from_secs(10);
        let out = loop {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            if out.contains("forked") {
                break out;
            }
            assert!(
                Instant::now() < deadline,
                "the fork bomb never hit its limit: {out}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // 49 children plus the init make the 50 the limit allows.
        assert!(out.contains("forked 49 children"), "{out}");
        // The host still answers: a fresh container starts and serves.
        let other = h
            .start("neighbour", &["/bin/testprog", "serve", "8080"])
            .await;
        assert_eq!(get(&other, 8080, "/").await.0, 200);
        c.destroy(None).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn signals_after_exit_never_reach_a_process_that_took_the_pid() {
    run("pidreuse", |h| async move {
        let c = h.start("short", &["/bin/testprog", "sleep"]).await;
        let old_pid = c.pid().unwrap();
        c.signal(libc::SIGKILL).await.unwrap();
        assert_eq!(exit_code(&c).await, 137);

        // Hand the dead init's pid to a process of the test's own: the kernel gives the
        // next fork ns_last_pid + 1. Other processes fork too, so try a few times.
        let mut squatter = None;
        for _ in 0..20 {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (old_pid - 1).to_string()).unwrap();
            let child = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap();
            if child.id() == old_pid {
                squatter = Some(KillOnDrop(child));
                break;
            }
            let mut child = child;
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let mut squatter = squatter.expect("no process could take the old pid");
        let squatter = &mut squatter.0;

        for sig in [libc::SIGTERM, libc::SIGKILL] {
            assert!(matches!(c.signal(sig).await, Err(Error::NotRunning(_))));
        }
        c.destroy(Some("late".into())).await.unwrap();
        assert!(
            squatter.try_wait().unwrap().is_none(),
            "the process that took pid {old_pid} was hit"
        );
        // The outcome is still the real one: destroy after exit changes nothing.
        assert_eq!(exit_code(&c).await, 137);
    })
    .await;
}

/// Ends a process the test started, whether or not the test got that far.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_second_runtime_on_the_same_state_leaves_a_live_ones_containers_alone() {
    run("owned", |h| async move {
        let c = h.start("mine", &["/bin/testprog", "sleep"]).await;
        // Two `silo run`s share /run/silo this way: the second must neither adopt nor tear
        // down what the first still owns.
        let other = silo::Runtime::new(h.runtime.config().clone()).unwrap();
        assert!(
            other.containers().is_empty(),
            "adopted a live runtime's container"
        );
        let theirs = other.container(c.id()).unwrap();
        let started = theirs.start(h.opts(&["/bin/testprog", "sleep"])).await;
        assert!(
            matches!(started, Err(Error::OwnedElsewhere(_))),
            "{started:?}"
        );
        let destroyed = theirs.destroy(None).await;
        assert!(
            matches!(destroyed, Err(Error::OwnedElsewhere(_))),
            "{destroyed:?}"
        );
        assert!(c.running());
        assert!(h.runtime.config().state_dir.join(c.id()).exists());
        c.signal(libc::SIGKILL).await.unwrap();
        assert_eq!(exit_code(&c).await, 137);
    })
    .await;
}

/// The parent of `pid`, from /proc.
fn parent_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("PPid:")).unwrap();
    line[5..].trim().parse().unwrap()
}

#[tokio::test]
async fn the_keeper_outlives_stray_signals_and_its_loss_is_reported_honestly() {
    run("keeper", |h| async move {
        let c = h.start("kept", &["/bin/testprog", "sleep"]).await;
        let keeper = parent_of(c.pid().unwrap());
        let comm = std::fs::read_to_string(format!("/proc/{keeper}/comm")).unwrap();
        assert_eq!(comm.trim(), "silo-keeper");
        // It holds no terminal or pipe of the caller's: only the exit record, the log pipe,
        // the state directory (to save what is left in the pipe) and its init's pidfd.
        for fd in 0..3 {
            let target = std::fs::read_link(format!("/proc/{keeper}/fd/{fd}")).unwrap();
            assert_eq!(target, std::path::Path::new("/dev/null"), "fd {fd}");
        }
        let held: Vec<String> = std::fs::read_dir(format!("/proc/{keeper}/fd"))
            .unwrap()
            .flatten()
            .map(|e| std::fs::read_link(e.path()).unwrap().display().to_string())
            .filter(|t| t != "/dev/null")
            .collect();
        assert_eq!(held.len(), 4, "{held:?}");
        assert!(held.iter().any(|t| t.ends_with(c.id())), "{held:?}");
        assert!(held.iter().any(|t| t.ends_with("/exit")), "{held:?}");
        assert_eq!(
            held.iter().filter(|t| t.starts_with("pipe:")).count(),
            1,
            "{held:?}"
        );
        // What a terminal's ^C or a signal to the supervisor's group would send.
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            // SAFETY: kill(2) on the keeper of a container this test started.
            assert_eq!(unsafe { libc::kill(keeper as i32, sig) }, 0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            parent_of(c.pid().unwrap()),
            keeper,
            "the keeper died of a signal"
        );

        // Killed, it takes the exit status with it: the container is reported as exited
        // with an unknown status, not as a success, and only once its init is gone.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(keeper as i32, libc::SIGKILL) }, 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(c.running(), "the init runs on without its keeper");
        c.signal(libc::SIGKILL).await.unwrap();
        match c.monitor().await {
            Err(Error::Exit(e)) => {
                assert!(!e.known, "{e}");
                assert_eq!(e.code, 255);
                assert!(e.to_string().contains("exit status was lost"), "{e}");
            }
            other => panic!("monitor: {other:?}"),
        }
    })
    .await;
}

/// A small tmpfs over `dir`, unmounted when dropped (also when the test fails).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .expect("mount a tmpfs");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn a_full_state_disk_is_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let _tmpfs = Tmpfs::mount(&state, "256k");
    let runtime = silo::Runtime::new(silo::RuntimeConfig {
        state_dir: state.clone(),
        log_limit: 1 << 20,
        ..silo::RuntimeConfig::default()
    })
    .unwrap();
    let pid = std::process::id();
    let opts = |args: &[&str]| silo::StartOptions {
        bundle: common::bundle(),
        entrypoint: Some(args.iter().map(|s| s.to_string()).collect()),
        ..silo::StartOptions::default()
    };

    // Its output fills the disk: the log drops what does not fit, and the container runs on.
    let writer = runtime.container(&format!("full-{pid}")).unwrap();
    writer
        .start(opts(&["/bin/testprog", "spew"]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while nix::sys::statvfs::statvfs(&state)
        .unwrap()
        .blocks_available()
        > 0
    {
        assert!(Instant::now() < deadline, "the log never filled the disk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still writing: nothing stopped reading its output.
    let written = || {
        let io = std::fs::read_to_string(format!("/proc/{}/io", writer.pid().unwrap())).unwrap();
        let line = io
            .lines()
            .find(|l| l.starts_with("wchar:"))
            .unwrap()
            .to_string();
        line[6..].trim().parse::<u64>().unwrap()
    };
    let before = written();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        written() > before,
        "the container's writes block on a full disk"
    );

    // A start that cannot record itself fails at once, naming the cause, and leaves nothing.
    let refused = runtime.container(&format!("full2-{pid}")).unwrap();
    let err = refused
        .start(opts(&["/bin/testprog", "sleep"]))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("write the record"), "{text}");
    assert!(text.contains("No space left on device"), "{text}");
    assert!(
        !state.join(refused.id()).exists(),
        "its state directory is left"
    );
    for controller in ["pids", "memory", "cpu"] {
        let cgroup = format!("/sys/fs/cgroup/{controller}/silo/{}", refused.id());
        assert!(!std::path::Path::new(&cgroup).exists(), "{cgroup} is left");
    }

    // The exit is still recorded: its record was written whole before the disk filled.
    writer.signal(libc::SIGKILL).await.unwrap();
    assert_eq!(exit_code(&writer).await, 137);
    writer.destroy(None).await.unwrap();
    assert!(!state.join(writer.id()).exists());
}

#[tokio::test]
async fn racing_lifecycle_calls_on_one_id_end_in_one_consistent_state() {
    run("race", |h| async move {
        let c = h.container("one");
        let pids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for round in 0..4 {
            // Starts, signals, destroys and monitors, all at once and in no set order.
            let calls = (0..32).map(|i| {
                let c = c.clone();
                let opts = h.opts(&["/bin/testprog", "sleep"]);
                let pids = pids.clone();
                tokio::spawn(async move {
                    match (i + round) % 4 {
                        0 => {
                            if c.start(opts).await.is_ok()
                                && let Some(pid) = c.pid()
                            {
                                pids.lock().unwrap().push(pid);
                            }
                        }
                        1 => drop(c.signal(libc::SIGTERM).await),
                        2 => drop(c.destroy(Some(format!("round {round}"))).await),
                        _ => drop(c.monitor().await),
                    }
                })
            });
            for call in futures_util::future::join_all(calls).await {
                call.expect("no lifecycle call panics");
            }
            // Whatever won, the state is whole: a running container has its init in its
            // cgroup; a stopped one has neither.
            let cgroup = format!("/sys/fs/cgroup/pids/silo/{}", c.id());
            match c.pid() {
                Some(pid) => {
                    let procs = std::fs::read_to_string(format!("{cgroup}/cgroup.procs"))
                        .expect("a running container has its cgroup");
                    assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
                }
                None => {
                    c.monitor().await.ok();
                    assert!(!std::path::Path::new(&cgroup).exists(), "round {round}");
                }
            }
        }

        // Every waiter of one run sees the same outcome, whichever call ended it.
        c.destroy(None).await.unwrap();
        c.start(h.opts(&["/bin/testprog", "sleep"])).await.unwrap();
        h.record(&c).await;
        let waiters: Vec<_> = (0..16)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { format!("{:?}", c.monitor().await) })
            })
            .collect();
        let enders = (0..8).map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                match i % 2 {
                    0 => drop(c.destroy(Some("the end".into())).await),
                    _ => drop(c.signal(libc::SIGKILL).await),
                }
            })
        });
        futures_util::future::join_all(enders).await;
        let outcomes: std::collections::BTreeSet<String> = futures_util::future::join_all(waiters)
            .await
            .into_iter()
            .map(|w| w.unwrap())
            .collect();
        assert_eq!(outcomes.len(), 1, "waiters disagree: {outcomes:?}");
        // No init of any round lives on (a reused pid would be in another cgroup).
        for pid in pids.lock().unwrap().iter() {
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"));
            assert!(
                !cgroup.is_ok_and(|g| g.contains(c.id())),
                "init {pid} lives on"
            );
        }
    })
    .await;
}
