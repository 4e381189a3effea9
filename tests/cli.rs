//! `silo run`: output on the terminal, exit codes, signal forwarding, errors.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn silo_run(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_silo"))
        .arg("--state-dir")
        .arg(state)
        .arg("run")
        .arg(common::bundle())
        .arg("--")
        .args(args)
        .output()
        .expect("run silo")
}

#[test]
fn run_streams_output_and_exits_with_the_containers_code() {
    let state = tempfile::tempdir().unwrap();
    let out = silo_run(
        state.path(),
        &["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    let out = silo_run(state.path(), &["/bin/testprog", "segv"]);
    assert_eq!(out.status.code(), Some(139));

    let out = silo_run(state.path(), &["/no/such/entrypoint"]);
    assert_eq!(out.status.code(), Some(127));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exec /no/such/entrypoint"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_silo"))
        .args(["--state-dir"])
        .arg(state.path())
        .args(["run", "/no/such/bundle"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/no/such/bundle"), "{stderr}");
}

#[test]
fn run_forwards_sigint_and_sigterm() {
    let state = tempfile::tempdir().unwrap();
    // The last case ignores the signal, so only the second one ends it (by destroy).
    let cases: [(i32, &[&str], usize, i32); 3] = [
        (libc::SIGINT, &[], 1, 130),
        (libc::SIGTERM, &[], 1, 143),
        (libc::SIGTERM, &["--on", "TERM=ignore"], 2, 137),
    ];
    for (sig, rules, times, code) in cases {
        let mut child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_silo"))
                .arg("--state-dir")
                .arg(state.path())
                .arg("run")
                .arg(common::bundle())
                .args(["--", "/bin/testprog", "--on", "USR1=log"])
                .args(rules)
                .args(["serve", "8080"])
                .stderr(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let child = &mut child.0;
        // The server announces itself on stderr once it listens.
        let mut stderr = child.stderr.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("listening") {
            let n = std::io::Read::read(&mut stderr, &mut buf).unwrap();
            assert!(
                n > 0,
                "silo run ended early: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        for _ in 0..times {
            // SAFETY: kill(2) on the pid of the child this test spawned and has not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, sig) };
            std::thread::sleep(Duration::from_millis(100));
        }
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "signal was not forwarded"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(code));
    }
}

/// Ends the `silo run` this test started if an assertion fails first (SIGTERM is
/// forwarded, so the container goes with it).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on the pid of our own unreaped child.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_killed_runs_stopped_container_is_cleared_by_the_next_run() {
    let state = tempfile::tempdir().unwrap();
    let mut killed = Command::new(env!("CARGO_BIN_EXE_silo"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("run")
        .arg(common::bundle())
        .args(["--", "/bin/sh", "-c", "sleep 0.3; exit 4"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn silo run");
    let id = format!("run-{}", killed.id());
    let dir = state.path().join(&id);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dir.join("container.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Killed as a crash would: its container runs on, and ends with nobody to tell.
    killed.kill().unwrap();
    killed.wait().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(dir.exists());

    let out = silo_run(state.path(), &["/bin/true"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !dir.exists(),
        "the killed run's container is still recorded"
    );
    for controller in ["pids", "memory"] {
        let cgroup = format!("/sys/fs/cgroup/{controller}/silo/{id}");
        assert!(!std::path::Path::new(&cgroup).exists(), "{cgroup} is left");
    }
}
