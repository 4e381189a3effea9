//! A daemon killed with SIGKILL, as a crash would, and started again: it adopts the
//! containers that still run, reports those that exited meanwhile with their real exit
//! codes, and removes what a start cut short left half made. Each step of a start and a
//! destroy is tried through the crash points of `silo::fault`.
//!
//! The tests here run one at a time: they check that no veth of silo's is left in the
//! network namespace, which another test's containers would share.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::daemon::{Endpoint, assert_gone, handshake, silo_serve, with_daemon};
use http::{Method, Request, header};
use http_body_util::Full;
use serde_json::json;
use tokio::net::UnixStream;

const SERVE: &[&str] = &["/bin/testprog", "serve", "8080"];
const SLEEP: &[&str] = &["/bin/testprog", "sleep"];

static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn a_daemon_killed_and_restarted_adopts_its_containers() {
    let _alone = ALONE.lock().await;
    with_daemon("adopt", |d| async move {
        let (status, web) = d.put("web", SERVE, json!({ "waitForPorts": [8080] })).await;
        assert_eq!(status, 200, "{web}");
        let (_, gone) = d.put("gone", SLEEP, json!({})).await;
        // Counts on, a line every 50 ms, whether or not a daemon reads its output.
        let counter = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done";
        d.put("logs", &["/bin/sh", "-c", counter], json!({})).await;
        let logs_path = format!("/v1/containers/{}/logs", d.id("logs"));

        // Idle for a second, then stopped: a timeout the next daemon must keep.
        let (status, idle) = d
            .put(
                "idle",
                SERVE,
                json!({ "waitForPorts": [8080], "sleepAfter": 1 }),
            )
            .await;
        assert_eq!(status, 200, "{idle}");

        // Writes, then writes again and exits while no daemon runs.
        let (_, last) = d
            .put(
                "last",
                &[
                    "/bin/sh",
                    "-c",
                    "echo before; sleep 0.5; echo during; exit 6",
                ],
                json!({}),
            )
            .await;

        d.crash();
        let last_pid = last["pid"].as_u64().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{last_pid}")).exists() {
            assert!(std::time::Instant::now() < deadline, "{last} did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // While no daemon runs, one container dies: killed from outside, as the OOM killer
        // or an operator might.
        let gone_pid = gone["pid"].as_u64().unwrap() as i32;
        // SAFETY: kill(2) on the init of a container this test started.
        assert_eq!(unsafe { libc::kill(gone_pid, libc::SIGKILL) }, 0);
        d.restart(None).await;

        // The running one is the same process, and still answers, takes signals and reports
        // its real exit code.
        let (status, info) = d.get("web").await;
        assert_eq!(status, 200, "{info}");
        assert_eq!(
            (info["running"].as_bool(), &info["pid"]),
            (Some(true), &web["pid"])
        );
        assert_eq!(info["startedAt"], web["startedAt"]);
        assert_eq!(info["address"], web["address"]);
        let (status, hello) = d.fetch("web", 8080, "/").await;
        assert_eq!((status, hello.as_str()), (200, "hello from silo\n"));

        // The one that died meanwhile is reported stopped, with how it died.
        let info = d
            .wait_status("gone", "stopped", Duration::from_secs(5))
            .await;
        assert_eq!(info["exitCode"], 137, "{info}");
        let monitor = format!("/v1/containers/{}/monitor", d.id("gone"));
        let (_, result) = d.call(Method::GET, &monitor, None).await;
        assert_eq!(
            result["error"],
            format!(
                "container {} was killed by signal 9 (exit code 137)",
                d.id("gone")
            )
        );

        // What the exited one wrote while no daemon read its output is kept, as its code.
        let info = d
            .wait_status("last", "stopped", Duration::from_secs(5))
            .await;
        assert_eq!(info["exitCode"], 6, "{info}");
        let path = format!("/v1/containers/{}/logs", d.id("last"));
        let (_, text) = d.raw(Method::GET, &path, Bytes::new()).await;
        assert_eq!(text, "before\nduring\n");

        // The adopted idle timeout still stops the idle one.
        let info = d
            .wait_status("idle", "stopped", Duration::from_secs(10))
            .await;
        assert_eq!(info["exitCode"], 143, "{info}");

        // The log pipe was taken over: what the container wrote before, during and after
        // the restart is there, with no line lost, and it keeps writing.
        let counted = |text: &str| {
            let lines: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
            let want: Vec<u64> = (0..lines.len() as u64).collect();
            assert_eq!(lines, want, "lines lost or mangled");
            lines.len()
        };
        let (_, text) = d.raw(Method::GET, &logs_path, Bytes::new()).await;
        let before = counted(&text);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, text) = d.raw(Method::GET, &logs_path, Bytes::new()).await;
        assert!(
            counted(&text) > before,
            "the container stopped writing: {text}"
        );

        let monitor = format!("/v1/containers/{}/monitor", d.id("web"));
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.call(Method::GET, &monitor, None).await })
        };
        let signal = format!("/v1/containers/{}/signal", d.id("web"));
        let (status, _) = d
            .call(Method::POST, &signal, Some(json!({ "signal": 15 })))
            .await;
        assert_eq!(status, 204);
        let (_, result) = waiter.await.unwrap();
        assert_eq!(result["exitCode"], 143, "{result}");

        // And a second crash and restart finds the same again.
        d.crash();
        d.restart(None).await;
        let (_, info) = d.get("web").await;
        assert_eq!(
            (info["status"].as_str(), info["exitCode"].as_i64()),
            (Some("stopped"), Some(143))
        );
        let (_, info) = d.get("logs").await;
        assert_eq!(info["running"], true, "{info}");
    })
    .await;
}

#[tokio::test]
async fn a_daemon_killed_at_each_step_converges_after_a_restart() {
    let _alone = ALONE.lock().await;
    with_daemon("crash", |d| async move {
        // Killed in the middle of a start: the half-made container is removed.
        for point in silo::fault::POINTS
            .iter()
            .filter(|p| p.starts_with("start:"))
        {
            d.crash();
            d.restart(Some(point)).await;
            let path = format!("/v1/containers/{}", d.id("half"));
            let body = json!({ "bundle": common::bundle(), "entrypoint": SERVE });
            let req = Request::put(&path).body(Full::new(Bytes::from(body.to_string())));
            let sent = async {
                let mut req = req.unwrap();
                req.headers_mut()
                    .insert(header::HOST, "silo".parse().unwrap());
                let Endpoint::Unix(socket) = &d.endpoint else {
                    unreachable!()
                };
                let mut sender = handshake(UnixStream::connect(socket).await.unwrap()).await;
                sender.send_request(req).await
            };
            assert!(sent.await.is_err(), "{point}: the daemon answered");
            d.crashed().await;
            d.restart(None).await;
            let (status, info) = d.get("half").await;
            assert_eq!(status, 404, "{point}: {info}");
            assert_gone(&d.id("half"), None);
            let state = d.dir.path().join("state/containers").join(d.id("half"));
            assert!(!state.exists(), "{point}: its state directory is left");
            assert_no_silo_network(point).await;
        }

        // Killed in a destroy before the kill: the container still runs, adopted, and the
        // destroy can be done again.
        d.crash();
        d.restart(Some("destroy:signal")).await;
        let (_, info) = d
            .put("victim", SERVE, json!({ "waitForPorts": [8080] }))
            .await;
        let path = format!("/v1/containers/{}", d.id("victim"));
        let deleted = d.clone();
        let gone = tokio::spawn(async move { deleted.raw(Method::DELETE, &path, "").await });
        d.crashed().await;
        let _ = gone.await;
        d.restart(None).await;
        let (_, again) = d.get("victim").await;
        assert_eq!(
            (again["running"].as_bool(), &again["pid"]),
            (Some(true), &info["pid"])
        );
        let (status, _) = d.fetch("victim", 8080, "/").await;
        assert_eq!(status, 200);

        // Killed after the init exited, before the teardown: the next daemon tears down and
        // reports the exit.
        d.crash();
        d.restart(Some("exit:teardown")).await;
        let (_, info) = d
            .put("ends", &["/bin/sh", "-c", "sleep 0.3; exit 3"], json!({}))
            .await;
        d.crashed().await;
        d.restart(None).await;
        let info2 = d
            .wait_status("ends", "stopped", Duration::from_secs(5))
            .await;
        assert_eq!(info2["exitCode"], 3, "{info2}");
        assert_gone(&d.id("ends"), info["pid"].as_u64().map(|p| p as u32));
    })
    .await;
}

/// No veth of silo's is left in this network namespace (the suite runs in its own, and the
/// tests of this file one at a time), and no firewall state for one. The kernel deletes a
/// veth pair with the namespace of its other end, but in the background: a pair whose
/// namespace just died is given a few seconds to go.
async fn assert_no_silo_network(when: &str) {
    let ours = || {
        let links = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap();
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        links
            .lines()
            .filter(|l| l.contains(": sl"))
            .map(str::to_string)
            .collect::<Vec<String>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !ours().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = ours();
    assert!(left.is_empty(), "{when}: veths left: {left:?}");
    let table = std::process::Command::new("nft")
        .args(["list", "table", "inet", "silo"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        !table.contains("\"sl"),
        "{when}: firewall state left:\n{table}"
    );
}

#[tokio::test]
async fn a_second_daemon_on_the_same_state_refuses_the_first_ones_containers() {
    let _alone = ALONE.lock().await;
    with_daemon("owner", |d| async move {
        let (_, mine) = d.put("mine", SLEEP, json!({})).await;
        let socket = d.dir.path().join("run/other.sock");
        let mut other = silo_serve(&d.dir, &format!("unix:{}", socket.display()))
            .spawn()
            .expect("spawn a second silo serve");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "{}", d.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let send = |method: Method| {
            let socket = socket.clone();
            let path = format!("/v1/containers/{}", d.id("mine"));
            let body = match method {
                Method::PUT => json!({ "bundle": common::bundle(), "entrypoint": SLEEP }),
                _ => json!({}),
            }
            .to_string();
            async move {
                let mut req = Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                req.headers_mut()
                    .insert(header::HOST, "silo".parse().unwrap());
                let mut sender = handshake(UnixStream::connect(&socket).await.unwrap()).await;
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status().as_u16();
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        for method in [Method::DELETE, Method::PUT] {
            let (status, body) = send(method.clone()).await;
            assert_eq!(status, 409, "{method}: {body}");
            assert!(
                body.contains("belongs to another runtime"),
                "{method}: {body}"
            );
        }
        // SAFETY: kill(2) on the second daemon, which this test started and has not reaped.
        unsafe { libc::kill(other.id() as i32, libc::SIGTERM) };
        assert!(other.wait().unwrap().success());
        let (_, info) = d.get("mine").await;
        assert_eq!(
            (&info["running"], &info["pid"]),
            (&json!(true), &mine["pid"])
        );
    })
    .await;
}
