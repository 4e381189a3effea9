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
        // Reported once, and the rest of the container is gone by then.
        assert!(
            std::fs::read_to_string(&cgroup_procs).is_err(),
            "the cgroup outlived the container"
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
