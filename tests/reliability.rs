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
