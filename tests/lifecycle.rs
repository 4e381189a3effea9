//! The core lifecycle, end to end: start, running, signal, tcp_port, destroy, monitor.

mod common;

use std::time::Duration;

use common::{exit_code, get, run};
use silo::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn serves_http_takes_a_signal_and_reports_its_exit() {
    run("serve", |h| async move {
        let c = h.start("web", &["/bin/testprog", "serve", "8080"]).await;
        assert!(c.running());
        let (status, body) = get(&c, 8080, "/").await;
        assert_eq!((status, body.as_str()), (200, "hello from silo\n"));
        let (_, hostname) = get(&c, 8080, "/hostname").await;
        assert_eq!(hostname.trim(), "silo");

        c.signal(libc::SIGTERM).await.unwrap();
        assert_eq!(exit_code(&c).await, 143);
        assert!(!c.running());
        let err = c.monitor().await.unwrap_err();
        assert!(err.to_string().contains("exited with code 143"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn exit_codes_map_like_a_shell() {
    run("codes", |h| async move {
        let cases: &[(&str, &[&str], i32)] = &[
            ("zero", &["/bin/testprog", "exit", "0"], 0),
            ("three", &["/bin/testprog", "exit", "3"], 3),
            ("max", &["/bin/testprog", "exit", "255"], 255),
            ("segv", &["/bin/testprog", "segv"], 128 + libc::SIGSEGV),
        ];
        for (name, args, want) in cases {
            let c = h.container(name);
            c.start(h.opts(args)).await.unwrap();
            assert_eq!(exit_code(&c).await, *want, "{name}");
        }
        let c = h.start("kill", &["/bin/testprog", "sleep"]).await;
        c.signal(libc::SIGKILL).await.unwrap();
        assert_eq!(exit_code(&c).await, 137);
        let outcome = c.outcome().unwrap();
        assert_eq!(outcome.status, silo::ExitStatus::Signal(libc::SIGKILL));
    })
    .await;
}

#[tokio::test]
async fn env_merges_over_the_bundle_and_entrypoint_replaces_args() {
    run("env", |h| async move {
        let c = h.container("env");
        let mut opts = h.opts(&["/bin/testprog", "serve", "8080"]);
        opts.env.insert("GREETING".into(), "hi there".into());
        opts.env.insert("HOME".into(), "/tmp".into());
        c.start(opts).await.unwrap();
        h.record(&c).await;
        let (_, env) = get(&c, 8080, "/env").await;
        let lines: Vec<&str> = env.lines().collect();
        assert!(lines.contains(&"GREETING=hi there"), "{env}");
        assert!(lines.contains(&"HOME=/tmp"), "{env}");
        assert!(!lines.contains(&"HOME=/root"), "{env}");
        assert!(lines.iter().any(|l| l.starts_with("PATH=")), "{env}");

        for (name, value) in [("A=B", "x"), ("", "x"), ("NUL\0", "x"), ("OK", "nul\0")] {
            let bad = h.container("bad-env");
            let mut opts = h.opts(&["/bin/testprog", "exit", "0"]);
            opts.env.insert(name.into(), value.into());
            let err = bad.start(opts).await.unwrap_err();
            assert!(matches!(err, Error::InvalidEnv { .. }), "{err}");
            assert!(!bad.running());
        }
    })
    .await;
}

#[tokio::test]
async fn an_unknown_entrypoint_surfaces_through_monitor() {
    run("noexec", |h| async move {
        let c = h.container("missing");
        c.start(h.opts(&["/no/such/program"])).await.unwrap();
        let err = c.monitor().await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/no/such/program"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");

        let c = h.container("not-in-path");
        c.start(h.opts(&["nosuchcmd"])).await.unwrap();
        let msg = c.monitor().await.unwrap_err().to_string();
        assert!(msg.contains("nosuchcmd") && msg.contains("PATH"), "{msg}");

        // A command found through the bundle's PATH runs.
        let c = h.container("in-path");
        c.start(h.opts(&["true"])).await.unwrap();
        c.monitor().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn fetch_to_a_port_nobody_listens_on_is_a_clear_error() {
    run("nolisten", |h| async move {
        let c = h.start("quiet", &["/bin/testprog", "sleep"]).await;
        let started = std::time::Instant::now();
        let req = http::Request::get("/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let err = c.tcp_port(8080).unwrap().fetch(req).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("container {} is not listening on TCP port 8080", c.id())
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "it must not hang"
        );
        assert!(matches!(c.tcp_port(0), Err(Error::InvalidPort(0))));
        assert!(matches!(c.tcp_port(65536), Err(Error::InvalidPort(65536))));
    })
    .await;
}

#[tokio::test]
async fn connect_gives_a_raw_byte_stream() {
    run("connect", |h| async move {
        let c = h.start("echo", &["/bin/testprog", "echo", "7000"]).await;
        let port = c.tcp_port(7000).unwrap();
        let mut stream = loop {
            match port.connect().await {
                Ok(s) => break s,
                Err(Error::NotListening { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        };
        stream.write_all(b"ping\x00\xffpong").await.unwrap();
        let mut buf = [0u8; 10];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping\x00\xffpong");
    })
    .await;
}

#[tokio::test]
async fn destroy_with_and_without_a_reason() {
    run("destroy", |h| async move {
        let c = h.start("plain", &["/bin/testprog", "sleep"]).await;
        c.destroy(None).await.unwrap();
        assert!(!c.running());
        c.monitor().await.unwrap();
        // Idempotent.
        c.destroy(None).await.unwrap();
        c.destroy(Some("late".into())).await.unwrap();
        c.monitor().await.unwrap();

        let c = h
            .start("reason", &["/bin/testprog", "--on", "TERM=ignore", "sleep"])
            .await;
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.monitor().await })
        };
        let (a, b) = tokio::join!(
            c.destroy(Some("maintenance".into())),
            c.destroy(Some("second".into()))
        );
        a.unwrap();
        b.unwrap();
        for result in [waiter.await.unwrap(), c.monitor().await] {
            match result {
                Err(Error::Exit(e)) => {
                    assert_eq!(e.reason.as_deref(), Some("maintenance"));
                    assert_eq!(e.code, 137);
                    assert_eq!(
                        e.to_string(),
                        format!("container {} was destroyed: maintenance", c.id())
                    );
                }
                other => panic!("expected the destroy reason, got {other:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn monitor_reports_an_exit_before_the_teardown_and_destroy_waits_for_it() {
    run("settle", |h| async move {
        let c = h.start("settle", &["/bin/testprog", "sleep"]).await;
        // The teardown removes the container's firewall state under the firewall's lock:
        // while this test holds it, the teardown cannot finish.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(silo::firewall::LOCK_PATH)
            .unwrap();
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        c.signal(libc::SIGKILL).await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), c.monitor())
            .await
            .expect("monitor reports the exit without waiting for the teardown");
        assert!(matches!(exit, Err(Error::Exit(e)) if e.code == 137));
        assert!(!c.running());

        let destroy = tokio::spawn({
            let c = c.clone();
            async move { c.destroy(None).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !destroy.is_finished(),
            "destroy returned while the teardown was still going on"
        );
        drop(lock);
        tokio::time::timeout(Duration::from_secs(20), destroy)
            .await
            .expect("destroy returns once the teardown is done")
            .unwrap()
            .unwrap();
        // The harness checks that nothing of it is left.
    })
    .await;
}

#[tokio::test]
async fn destroy_kills_every_process_of_the_container() {
    run("tree", |h| async move {
        let c = h
            .start(
                "tree",
                &["/bin/testprog", "fork", "3", "orphans", "2", "sleep"],
            )
            .await;
        let pid = c.pid().unwrap();
        // Wait until the children exist, then collect them from the host's view.
        let mut children = Vec::new();
        for _ in 0..200 {
            children = descendants(pid);
            if children.len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(children.len() >= 3, "children: {children:?}");
        c.destroy(None).await.unwrap();
        for child in children {
            assert!(
                !std::path::Path::new(&format!("/proc/{child}")).exists(),
                "process {child} survived destroy"
            );
        }
    })
    .await;
}

/// Every process whose parent chain leads to `pid`, seen from the host.
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut changed = true;
    while changed {
        changed = false;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if ppid.is_some_and(|pp| found.contains(&pp)) && !found.contains(&p) {
                found.push(p);
                changed = true;
            }
        }
    }
    found.retain(|p| *p != pid);
    found
}

#[tokio::test]
async fn lifecycle_errors() {
    run("errors", |h| async move {
        let c = h.container("life");
        assert!(!c.running());
        assert!(matches!(c.signal(15).await, Err(Error::NotRunning(_))));
        assert!(matches!(c.monitor().await, Err(Error::NeverStarted(_))));
        c.destroy(None).await.unwrap();

        c.start(h.opts(&["/bin/testprog", "sleep"])).await.unwrap();
        h.record(&c).await;
        let again = c.start(h.opts(&["/bin/testprog", "sleep"])).await;
        assert!(matches!(again, Err(Error::AlreadyRunning(_))), "{again:?}");
        for bad in [0, 65, -1] {
            assert!(matches!(c.signal(bad).await, Err(Error::InvalidSignal(_))));
        }
        c.signal(libc::SIGKILL).await.unwrap();
        assert_eq!(exit_code(&c).await, 137);
        assert!(matches!(c.signal(15).await, Err(Error::NotRunning(_))));

        // A stopped container starts again, with a fresh outcome.
        c.start(h.opts(&["/bin/testprog", "exit", "4"]))
            .await
            .unwrap();
        assert_eq!(exit_code(&c).await, 4);

        assert!(matches!(
            h.runtime.container("../etc"),
            Err(Error::InvalidId(_))
        ));
        let empty = c.start(silo::StartOptions {
            entrypoint: Some(vec![]),
            ..h.opts(&[])
        });
        assert!(matches!(empty.await, Err(Error::EmptyEntrypoint)));
    })
    .await;
}

#[tokio::test]
async fn two_containers_run_side_by_side() {
    run("pair", |h| async move {
        let mut handles = Vec::new();
        for name in ["left", "right"] {
            let c = h.container(name);
            let mut opts = h.opts(&["/bin/testprog", "serve", "8080"]);
            opts.env.insert("WHO".into(), name.into());
            c.start(opts).await.unwrap();
            h.record(&c).await;
            handles.push((name, c));
        }
        let a = handles[0]
            .1
            .tcp_port(8080)
            .unwrap()
            .socket_addr()
            .await
            .unwrap();
        let b = handles[1]
            .1
            .tcp_port(8080)
            .unwrap()
            .socket_addr()
            .await
            .unwrap();
        assert_ne!(a, b);
        for (name, c) in &handles {
            let (_, env) = get(c, 8080, "/env").await;
            assert!(env.lines().any(|l| l == format!("WHO={name}")), "{env}");
        }
        handles[0].1.destroy(None).await.unwrap();
        let (status, _) = get(&handles[1].1, 8080, "/").await;
        assert_eq!(status, 200);
    })
    .await;
}

#[tokio::test]
async fn many_monitors_see_the_same_outcome() {
    run("watchers", |h| async move {
        let c = h
            .start("watched", &["/bin/testprog", "serve", "8080"])
            .await;
        // Once it answers, its signal handlers are in place: as PID 1 of its namespace it
        // would not notice SIGINT before that.
        get(&c, 8080, "/").await;
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { exit_code(&c).await })
            })
            .collect();
        c.signal(libc::SIGINT).await.unwrap();
        for w in waiters {
            assert_eq!(w.await.unwrap(), 128 + libc::SIGINT);
        }
    })
    .await;
}

#[tokio::test]
async fn output_goes_to_the_log_file() {
    run("logs", |h| async move {
        let c = h.container("talk");
        c.start(h.opts(&["/bin/sh", "-c", "echo out; echo err >&2"]))
            .await
            .unwrap();
        c.monitor().await.unwrap();
        let log = std::fs::read_to_string(c.log_path()).unwrap();
        assert!(log.contains("out\n") && log.contains("err\n"), "{log:?}");
        c.destroy(None).await.unwrap();
        assert!(!c.log_path().exists(), "destroy removes the log");
    })
    .await;
}

#[tokio::test]
async fn a_container_writing_fast_never_blocks_and_its_log_stays_capped() {
    const CAP: u64 = 64 * 1024;
    common::run_with_log_limit("spew", CAP, |h| async move {
        let c = h.start("spew", &["/bin/testprog", "spew"]).await;
        let log = c.log_path();
        let rotated = log.with_extension("1");
        // Nobody reads the log; the writer keeps going through several rotations.
        let mut rotations = 0;
        let mut last = Vec::new();
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = std::fs::read(&rotated).unwrap_or_default();
            if !now.is_empty() && now != last {
                rotations += 1;
                last = now;
            }
            let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            assert!(
                size(&log) <= CAP && size(&rotated) <= CAP,
                "the log outgrew its cap"
            );
        }
        assert!(
            rotations >= 3,
            "the container stalled: only {rotations} rotations"
        );
        assert!(c.running());
        c.destroy(None).await.unwrap();
    })
    .await;
}
