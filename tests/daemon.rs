//! `silo serve` end to end: each test starts the daemon binary on a unix socket and state
//! directory of its own, drives it with a real HTTP client (hyper over a UnixStream) against
//! real containers, then deletes what it made, stops the daemon by its PID and checks that
//! nothing of its containers is left.

mod common;

use common::daemon::{Daemon, Endpoint, silo_serve, with, with_daemon};

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_tungstenite::tungstenite::Message;

const SERVE: &[&str] = &["/bin/testprog", "serve", "8080"];
const SLEEP: &[&str] = &["/bin/testprog", "sleep"];

#[tokio::test]
async fn start_inspect_list_and_proxy() {
    with_daemon("start", |d| async move {
        let (status, list) = d.call(Method::GET, "/v1/containers", None).await;
        assert_eq!((status, list), (200, json!([])));

        let (status, info) = d
            .put(
                "web",
                SERVE,
                json!({ "env": { "WHO": "web" }, "waitForPorts": [8080], "instance": "lite" }),
            )
            .await;
        assert_eq!(status, 200, "{info}");
        assert_eq!(info["id"], d.id("web"));
        assert_eq!(info["running"], true);
        assert_eq!(info["status"], "healthy");
        assert!(info["pid"].as_u64().is_some(), "{info}");
        assert!(info["address"].as_str().is_some(), "{info}");
        assert!(info["startedAt"].as_str().unwrap().ends_with('Z'), "{info}");
        assert_eq!(info["exitCode"], Value::Null);
        assert_eq!(info["exitedAt"], Value::Null);
        let (status, again) = d.get("web").await;
        assert_eq!((status, &again), (200, &info));

        let (status, err) = d.put("web", SERVE, json!({})).await;
        assert_eq!(status, 409, "{err}");
        assert_eq!(
            err["error"],
            format!("container {} is already running", d.id("web"))
        );

        let (_, second) = d.put("second", SLEEP, json!({})).await;
        assert_eq!(second["status"], "running", "no ports were waited for");
        let (_, list) = d.call(Method::GET, "/v1/containers", None).await;
        let ids: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [d.id("second"), d.id("web")]);

        // HTTP through the proxy: path, query, request and response bodies, app statuses.
        let (status, env) = d.fetch("web", 8080, "/env?x=1").await;
        assert_eq!(status, 200);
        assert!(env.lines().any(|l| l == "WHO=web"), "{env}");
        let (status, hello) = d.fetch("web", 8080, "/").await;
        assert_eq!((status, hello.as_str()), (200, "hello from silo\n"));
        let (status, _) = d.fetch("web", 8080, "").await;
        assert_eq!(status, 200, "the port alone proxies to /");
        let (status, _) = d.fetch("web", 8080, "/nope").await;
        assert_eq!(status, 404, "the application's own 404");
        let big = vec![b'x'; 3 << 20];
        let path = format!("/v1/containers/{}/ports/8080/echo", d.id("web"));
        let (status, echoed) = d.raw(Method::POST, &path, big.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(echoed.len(), big.len());
    })
    .await;
}

#[tokio::test]
async fn bad_starts_are_refused_and_leave_nothing() {
    with_daemon("badstart", |d| async move {
        let bundle = common::bundle();
        let path = format!("/v1/containers/{}", d.id("bad"));
        let cases: Vec<(&str, u16, &str)> = vec![
            ("not json", 400, "invalid request body"),
            ("", 400, "a JSON body is required"),
            (
                r#"{"bundle": "/x", "nope": 1}"#,
                400,
                "unknown field `nope`",
            ),
            (
                r#"{"env": {}}"#,
                400,
                "field `bundle` or `image` is required",
            ),
            (r#"{"bundle": "relative/dir"}"#, 400, "must be absolute"),
            (r#"{"bundle": "/no/such/bundle"}"#, 400, "/no/such/bundle"),
        ];
        for (body, want, needle) in cases {
            let (status, text) = d.raw(Method::PUT, &path, body.to_string()).await;
            assert_eq!(status, want, "{body}: {text}");
            let err: Value = serde_json::from_str(&text).unwrap();
            assert!(
                err["error"].as_str().unwrap().contains(needle),
                "{body}: {err}"
            );
        }
        let json_cases = [
            (json!({ "instance": "huge" }), 400, "invalid instance type"),
            (
                json!({ "entrypoint": [] }),
                400,
                "entrypoint must not be empty",
            ),
            (
                json!({ "env": { "A=B": "x" } }),
                400,
                "invalid environment variable",
            ),
            (
                json!({ "waitForPorts": [0] }),
                400,
                "TCP port 0 is out of range",
            ),
            (json!({ "waitForPorts": [65536] }), 400, "out of range"),
            (json!({ "sleepAfter": -1 }), 400, "sleepAfter"),
        ];
        for (extra, want, needle) in json_cases {
            let mut body = json!({ "bundle": bundle });
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let (status, err) = d.call(Method::PUT, &path, Some(body)).await;
            assert_eq!(status, want, "{extra}: {err}");
            assert!(
                err["error"].as_str().unwrap().contains(needle),
                "{extra}: {err}"
            );
        }
        // Refused before it is read: the client's write may fail, so this one speaks HTTP
        // by hand and reads the answer while it writes.
        let Endpoint::Unix(socket) = &d.endpoint else {
            unreachable!()
        };
        let (mut rd, mut wr) = UnixStream::connect(socket).await.unwrap().into_split();
        let len = 2 << 20;
        let mut huge =
            format!("PUT {path} HTTP/1.1\r\nHost: silo\r\nContent-Length: {len}\r\n\r\n")
                .into_bytes();
        huge.resize(huge.len() + len, b' ');
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&huge).await;
        });
        let mut head = vec![0u8; 1024];
        let n = rd.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
        writer.abort();
        let (status, err) = d
            .call(
                Method::PUT,
                "/v1/containers/-bad",
                Some(json!({ "bundle": bundle })),
            )
            .await;
        assert_eq!(status, 400);
        assert!(
            err["error"]
                .as_str()
                .unwrap()
                .contains("invalid container id")
        );

        // Nothing was started, so nothing is known.
        let (status, err) = d.get("bad").await;
        assert_eq!(status, 404);
        assert_eq!(
            err["error"],
            format!("container {} does not exist", d.id("bad"))
        );
        let (_, list) = d.call(Method::GET, "/v1/containers", None).await;
        assert_eq!(list, json!([]));
    })
    .await;
}

#[tokio::test]
async fn routes_and_their_errors() {
    with_daemon("routes", |d| async move {
        let unknown = d.id("ghost");
        for (method, tail, body) in [
            (Method::GET, "", None),
            (Method::POST, "/signal", Some(json!({ "signal": 15 }))),
            (Method::POST, "/stop", None),
            (Method::GET, "/monitor", None),
            (Method::GET, "/logs", None),
            (Method::GET, "/ports/8080/", None),
        ] {
            let path = format!("/v1/containers/{unknown}{tail}");
            let (status, err) = d.call(method.clone(), &path, body).await;
            assert_eq!(status, 404, "{method} {path}: {err}");
            assert_eq!(err["error"], format!("container {unknown} does not exist"));
        }
        let (status, err) = d.call(Method::GET, "/v1/containers/a%2Fb", None).await;
        assert_eq!(status, 400, "{err}");

        let (status, err) = d.call(Method::GET, "/v2/containers", None).await;
        assert_eq!(status, 404);
        assert!(err["error"].as_str().unwrap().contains("no route"), "{err}");
        let (status, _) = d
            .call(Method::GET, &format!("/v1/containers/{unknown}/nope"), None)
            .await;
        assert_eq!(status, 404);

        let req = Request::post(format!("/v1/containers/{unknown}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = d.send(req).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "GET, PUT, DELETE");
        for (method, tail) in [
            (Method::GET, "/signal"),
            (Method::GET, "/stop"),
            (Method::POST, "/monitor"),
            (Method::DELETE, "/logs"),
        ] {
            let path = format!("/v1/containers/{unknown}{tail}");
            let (status, _) = d.call(method.clone(), &path, None).await;
            assert_eq!(status, 405, "{method} {path}");
        }
        let (status, _) = d.call(Method::DELETE, "/v1/containers", None).await;
        assert_eq!(status, 405);

        // Ports and signals, on a running container that listens on 8080 only.
        let (status, _) = d.put("web", SERVE, json!({ "waitForPorts": [8080] })).await;
        assert_eq!(status, 200);
        let web = d.id("web");
        for (port, want, needle) in [
            (
                "9999",
                502,
                format!("container {web} is not listening on TCP port 9999"),
            ),
            (
                "0",
                400,
                "TCP port 0 is out of range: use 1 to 65535".to_string(),
            ),
            (
                "70000",
                400,
                "TCP port 70000 is out of range: use 1 to 65535".to_string(),
            ),
            (
                "http",
                400,
                "invalid TCP port \"http\": use 1 to 65535".to_string(),
            ),
        ] {
            let path = format!("/v1/containers/{web}/ports/{port}/");
            let (status, err) = d.call(Method::GET, &path, None).await;
            assert_eq!(status, want, "{port}: {err}");
            assert_eq!(err["error"], needle.as_str());
        }
        let signal = format!("/v1/containers/{web}/signal");
        for (body, want) in [
            (json!({ "signal": 0 }), 400),
            (json!({ "signal": 65 }), 400),
            (json!({ "signal": "TERM" }), 400),
            (json!({}), 400),
        ] {
            let (status, err) = d.call(Method::POST, &signal, Some(body.clone())).await;
            assert_eq!(status, want, "{body}: {err}");
        }
        let (status, _) = d.call(Method::POST, &signal, None).await;
        assert_eq!(status, 400, "the signal route needs a body");
        let (status, _) = d
            .call(
                Method::POST,
                &format!("/v1/containers/{web}/stop"),
                Some(json!({"signal": 99})),
            )
            .await;
        assert_eq!(status, 400);

        // Once it has stopped: 409 for what needs it running.
        let (status, _) = d
            .call(Method::POST, &signal, Some(json!({ "signal": 9 })))
            .await;
        assert_eq!(status, 204);
        d.wait_status("web", "stopped", Duration::from_secs(10))
            .await;
        let (status, err) = d
            .call(Method::POST, &signal, Some(json!({ "signal": 15 })))
            .await;
        assert_eq!(status, 409);
        assert_eq!(err["error"], format!("container {web} is not running"));
        let (status, _) = d
            .call(Method::POST, &format!("/v1/containers/{web}/stop"), None)
            .await;
        assert_eq!(status, 409);
        let (status, err) = d.fetch("web", 8080, "/").await;
        assert_eq!(status, 409, "{err}");
    })
    .await;
}

#[tokio::test]
async fn signal_stop_and_monitor() {
    with_daemon("stop", |d| async move {
        let (_, info) = d.put("web", SERVE, json!({ "waitForPorts": [8080] })).await;
        let pid = info["pid"].as_u64().unwrap();
        let monitor = format!("/v1/containers/{}/monitor", d.id("web"));
        // Many clients wait at once, and all see the same outcome.
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let d = d.clone();
                let monitor = monitor.clone();
                tokio::spawn(async move { d.call(Method::GET, &monitor, None).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "monitor must wait"
        );
        let signal = format!("/v1/containers/{}/signal", d.id("web"));
        let (status, _) = d
            .call(Method::POST, &signal, Some(json!({ "signal": 15 })))
            .await;
        assert_eq!(status, 204);
        let want = json!({
            "exitCode": 143,
            "error": format!("container {} exited with code 143", d.id("web")),
            "oomKilled": false,
        });
        for w in waiters {
            assert_eq!(w.await.unwrap(), (200, want.clone()));
        }
        let (_, info) = d.get("web").await;
        assert_eq!(info["status"], "stopped");
        assert_eq!(info["running"], false);
        assert_eq!(info["exitCode"], 143);
        assert_eq!(info["pid"], Value::Null);
        assert_eq!(info["address"], Value::Null);
        assert!(info["exitedAt"].as_str().is_some(), "{info}");
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        // Monitor answers at once for a run that has ended.
        assert_eq!(d.call(Method::GET, &monitor, None).await, (200, want));

        // A stopped container starts again, with a fresh outcome.
        let (status, _) = d
            .put("web", &["/bin/testprog", "exit", "0"], json!({}))
            .await;
        assert_eq!(status, 200);
        let (_, result) = d.call(Method::GET, &monitor, None).await;
        assert_eq!(
            result,
            json!({ "exitCode": 0, "error": null, "oomKilled": false })
        );

        // Graceful stop of a process that exits on SIGTERM: its own code, at once. (Ready
        // first: as PID 1 of its namespace it ignores signals it has no handler for yet.)
        d.put("term", SERVE, json!({ "waitForPorts": [8080] }))
            .await;
        let started = Instant::now();
        let stop = format!("/v1/containers/{}/stop", d.id("term"));
        let (status, info) = d.call(Method::POST, &stop, None).await;
        assert_eq!(status, 200, "{info}");
        assert_eq!(
            (info["status"].as_str(), info["exitCode"].as_i64()),
            (Some("stopped"), Some(143))
        );
        assert!(started.elapsed() < Duration::from_secs(5));

        // One that ignores it: SIGKILL once the timeout has passed.
        d.put(
            "stubborn",
            &["/bin/testprog", "--on", "TERM=ignore", "sleep"],
            json!({}),
        )
        .await;
        let started = Instant::now();
        let stop = format!("/v1/containers/{}/stop", d.id("stubborn"));
        let body = json!({ "signal": 15, "timeoutMs": 300 });
        let (status, info) = d.call(Method::POST, &stop, Some(body)).await;
        assert_eq!(status, 200, "{info}");
        assert_eq!(info["exitCode"], 137);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5));

        // Another signal, with an exit rule: its own code.
        d.put(
            "usr1",
            &["/bin/testprog", "--on", "USR1=exit:7", "serve", "8080"],
            json!({ "waitForPorts": [8080] }),
        )
        .await;
        let stop = format!("/v1/containers/{}/stop", d.id("usr1"));
        let body = json!({ "signal": libc::SIGUSR1 });
        let (_, info) = d.call(Method::POST, &stop, Some(body)).await;
        assert_eq!(info["exitCode"], 7);
    })
    .await;
}

#[tokio::test]
async fn delete_with_a_reason_and_again() {
    with_daemon("delete", |d| async move {
        d.put("web", SLEEP, json!({})).await;
        let path = format!("/v1/containers/{}", d.id("web"));
        let monitor = tokio::spawn({
            let d = d.clone();
            let path = format!("{path}/monitor");
            async move { d.call(Method::GET, &path, None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let body = json!({ "reason": "maintenance" });
        let (status, _) = d.call(Method::DELETE, &path, Some(body)).await;
        assert_eq!(status, 204);
        let (status, result) = monitor.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            result,
            json!({
                "exitCode": 137,
                "error": format!("container {} was destroyed: maintenance", d.id("web")),
                "oomKilled": false,
            })
        );
        // Gone, and deleting again is fine.
        let (status, _) = d.get("web").await;
        assert_eq!(status, 404);
        let (status, _) = d.call(Method::DELETE, &path, None).await;
        assert_eq!(status, 204);
        let (status, _) = d.call(Method::DELETE, "/v1/containers/-x", None).await;
        assert_eq!(status, 400);
        let (status, _) = d
            .call(Method::DELETE, &path, Some(json!({ "why": 1 })))
            .await;
        assert_eq!(status, 400);

        // A stopped container is deleted too, and its log with it.
        d.put("done", &["/bin/testprog", "exit", "3"], json!({}))
            .await;
        d.wait_status("done", "stopped", Duration::from_secs(10))
            .await;
        let state = d.dir.path().join("state/containers").join(d.id("done"));
        assert!(state.join("log").exists());
        let path = format!("/v1/containers/{}", d.id("done"));
        let (status, _) = d.call(Method::DELETE, &path, None).await;
        assert_eq!(status, 204);
        assert!(!state.exists());
    })
    .await;
}

#[tokio::test]
async fn wait_for_ports_times_out_or_fails_fast() {
    with_daemon("ready", |d| async move {
        // Nothing ever listens: 504 after the deadline, and the container keeps running.
        let started = Instant::now();
        let body = json!({ "waitForPorts": [8080, 8081], "timeoutMs": 400 });
        let (status, err) = d.put("quiet", SERVE, body).await;
        assert_eq!(status, 504, "{err}");
        assert_eq!(
            err["error"],
            format!(
                "container {}: TCP port 8081 did not accept a connection within 400 ms",
                d.id("quiet")
            )
        );
        assert!(started.elapsed() >= Duration::from_millis(400));
        let (_, info) = d.get("quiet").await;
        assert_eq!(info["status"], "running");

        // It exits meanwhile: the exit, at once.
        let started = Instant::now();
        let body = json!({ "waitForPorts": [8080], "timeoutMs": 20000 });
        let (status, err) = d
            .put("dies", &["/bin/testprog", "exit", "3"], body.clone())
            .await;
        assert_eq!(status, 502, "{err}");
        assert_eq!(
            err["error"],
            format!(
                "container {} exited with code 3 before TCP port 8080 accepted a connection",
                d.id("dies")
            )
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let (status, err) = d.put("noexec", &["/no/such/program"], body).await;
        assert_eq!(status, 502, "{err}");
        assert!(
            err["error"].as_str().unwrap().contains("/no/such/program"),
            "{err}"
        );

        // A server that takes a while: ready as soon as it listens.
        let slow = ["/bin/sh", "-c", "sleep 1; exec /bin/testprog serve 8080"];
        let started = Instant::now();
        let (status, info) = d
            .put("slow", &slow, json!({ "waitForPorts": [8080] }))
            .await;
        assert_eq!(status, 200, "{info}");
        assert_eq!(info["status"], "healthy");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(3),
            "{took:?}"
        );
        let (status, _) = d.fetch("slow", 8080, "/").await;
        assert_eq!(status, 200);
    })
    .await;
}

#[tokio::test]
async fn logs_stream_and_follow() {
    with_daemon("logs", |d| async move {
        let script = "echo one; echo err >&2; sleep 2; echo two";
        d.put("talk", &["/bin/sh", "-c", script], json!({})).await;
        let path = format!("/v1/containers/{}/logs", d.id("talk"));
        // Following: the first lines come while it runs, the rest when written, and the
        // stream ends with the run.
        let req = Request::get(format!("{path}?follow=1"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = d.send(req).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                frames.push(String::from_utf8_lossy(&data).into_owned());
            }
        }
        assert_eq!(frames.concat(), "one\nerr\ntwo\n");
        assert!(
            frames.len() > 1 && !frames[0].contains("two"),
            "it did not follow: {frames:?}"
        );
        let (_, info) = d.get("talk").await;
        assert_eq!(info["status"], "stopped");

        // Without follow: what is there now, at once.
        let (status, text) = d.raw(Method::GET, &path, Bytes::new()).await;
        assert_eq!((status, text.as_str()), (200, "one\nerr\ntwo\n"));
        d.put("idle", SLEEP, json!({})).await;
        let path = format!("/v1/containers/{}/logs", d.id("idle"));
        let started = Instant::now();
        let (status, text) = d.raw(Method::GET, &path, Bytes::new()).await;
        assert_eq!((status, text.as_str()), (200, ""));
        assert!(started.elapsed() < Duration::from_secs(2));
    })
    .await;
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    with_daemon("ws", |d| async move {
        let (status, info) = d
            .put(
                "ws",
                &["/bin/testprog", "ws", "9000"],
                json!({ "waitForPorts": [9000] }),
            )
            .await;
        assert_eq!(status, 200, "{info}");
        let Endpoint::Unix(socket) = &d.endpoint else {
            unreachable!()
        };
        let stream = UnixStream::connect(socket).await.unwrap();
        let url = format!("ws://silo/v1/containers/{}/ports/9000/chat", d.id("ws"));
        let (mut ws, resp) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("websocket handshake through the daemon");
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("hello, container")).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text("hello, container")
        );
        let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(blob.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
        ws.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"p"))
        );
        ws.close(None).await.unwrap();
        while let Some(msg) = ws.next().await {
            if msg.is_err() {
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn raw_tcp_tunnels() {
    with_daemon("tunnel", |d| async move {
        let (status, info) = d
            .put(
                "echo",
                &["/bin/testprog", "echo", "7000"],
                json!({ "waitForPorts": [7000] }),
            )
            .await;
        assert_eq!(status, 200, "{info}");
        let path = format!("/v1/containers/{}/ports/7000", d.id("echo"));
        for method in [Method::GET, Method::CONNECT] {
            let mut req = Request::builder().method(method.clone()).uri(&path);
            if method == Method::GET {
                req = req
                    .header(header::UPGRADE, "tcp")
                    .header(header::CONNECTION, "upgrade");
            }
            let resp = d.send(req.body(Full::new(Bytes::new())).unwrap()).await;
            let want = if method == Method::GET { 101 } else { 200 };
            assert_eq!(resp.status().as_u16(), want, "{method}");
            let upgraded = hyper::upgrade::on(resp).await.expect("upgrade");
            let mut io = TokioIo::new(upgraded);
            let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).collect();
            let (mut rd, mut wr) = tokio::io::split(&mut io);
            let writer = async {
                wr.write_all(&payload).await.unwrap();
                wr.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let reader = rd.read_to_end(&mut back);
            let (_, read) = tokio::join!(writer, reader);
            read.unwrap();
            assert!(
                back == payload,
                "{method}: the echo differs ({} bytes)",
                back.len()
            );
        }
        // Nobody listening: a clear 502 instead of a tunnel.
        let req = Request::get(format!("/v1/containers/{}/ports/7001", d.id("echo")))
            .header(header::UPGRADE, "tcp")
            .header(header::CONNECTION, "upgrade")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = d.send(req).await;
        assert_eq!(resp.status(), 502);
    })
    .await;
}

#[tokio::test]
async fn sleep_after_stops_an_idle_container_but_not_a_busy_one() {
    with_daemon("sleep", |d| async move {
        let body = json!({ "waitForPorts": [8080], "sleepAfter": 1 });
        for name in ["idle", "busy"] {
            let (status, info) = d.put(name, SERVE, body.clone()).await;
            assert_eq!(status, 200, "{info}");
        }
        // Requests every 200 ms keep one awake; the other gets none.
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            assert_eq!(d.fetch("busy", 8080, "/").await.0, 200);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let info = d
            .wait_status("idle", "stopped", Duration::from_secs(1))
            .await;
        assert_eq!(info["exitCode"], 143, "stopped gracefully with SIGTERM");
        let (_, info) = d.get("busy").await;
        assert_eq!(info["status"], "healthy");

        // An open tunnel counts as traffic, even with no bytes going through.
        let path = format!("/v1/containers/{}/ports/8080", d.id("busy"));
        let req = Request::get(&path)
            .header(header::UPGRADE, "tcp")
            .header(header::CONNECTION, "upgrade")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = d.send(req).await;
        assert_eq!(resp.status(), 101);
        let tunnel = hyper::upgrade::on(resp).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1800)).await;
        let (_, info) = d.get("busy").await;
        assert_eq!(info["status"], "healthy", "stopped under an open tunnel");
        let closed = Instant::now();
        drop(tunnel);
        let info = d
            .wait_status("busy", "stopped", Duration::from_secs(4))
            .await;
        assert_eq!(info["exitCode"], 143);
        assert!(closed.elapsed() >= Duration::from_millis(900));
    })
    .await;
}

#[tokio::test]
async fn concurrent_requests_on_one_id_end_consistent() {
    with_daemon("race", |d| async move {
        let id = d.id("race");
        let base = format!("/v1/containers/{id}");
        let requests = (0..100u32).map(|i| {
            let d = d.clone();
            let base = base.clone();
            // A fixed shuffle of the four kinds, so each run mixes them the same way, spread
            // over half a second so that they meet the container in every state.
            let kind = (i * 37 + 11) % 4;
            let delay = Duration::from_millis(u64::from(i * 53 % 100) * 5);
            async move {
                tokio::time::sleep(delay).await;
                match kind {
                    0 => {
                        let (status, body) = d.put("race", SERVE, json!({})).await;
                        assert!([200, 409].contains(&status), "start: {status} {body}");
                        ("start", status)
                    }
                    1 => {
                        let body = json!({ "signal": 15 });
                        let signal = format!("{base}/signal");
                        let (status, body) = d.call(Method::POST, &signal, Some(body)).await;
                        assert!([204, 404, 409].contains(&status), "signal: {status} {body}");
                        ("signal", status)
                    }
                    2 => {
                        let (status, body) = d.fetch("race", 8080, "/").await;
                        assert!(
                            [200, 404, 409, 502].contains(&status),
                            "fetch: {status} {body}"
                        );
                        ("fetch", status)
                    }
                    _ => {
                        let (status, body) = d.call(Method::DELETE, &base, None).await;
                        assert_eq!(status, 204, "destroy: {body}");
                        ("destroy", status)
                    }
                }
            }
        });
        let started = Instant::now();
        let answers = futures_util::future::join_all(requests).await;
        assert!(started.elapsed() < Duration::from_secs(60));
        let mut tally = std::collections::BTreeMap::new();
        for answer in answers {
            *tally.entry(answer).or_insert(0) += 1;
        }
        eprintln!("answers (kind, status) -> count: {tally:?}");
        assert!(tally.contains_key(&("start", 200)), "{tally:?}");

        // The daemon's answer matches the machine.
        let cgroups = || -> Vec<PathBuf> {
            std::fs::read_dir("/sys/fs/cgroup")
                .unwrap()
                .flatten()
                .map(|d| d.path().join("silo").join(&id))
                .filter(|p| p.exists())
                .collect()
        };
        let (status, info) = d.get("race").await;
        let (_, list) = d.call(Method::GET, "/v1/containers", None).await;
        match status {
            404 => {
                assert_eq!(list, json!([]));
                assert!(cgroups().is_empty(), "deleted but {:?} exist", cgroups());
            }
            200 => {
                assert_eq!(list, json!([info.clone()]));
                if info["running"] == true {
                    let pid = info["pid"].as_u64().unwrap();
                    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
                    assert!(cgroup.contains(&format!("/silo/{id}")), "{cgroup}");
                    let deadline = Instant::now() + Duration::from_secs(10);
                    loop {
                        let (status, _) = d.fetch("race", 8080, "/").await;
                        if status == 200 {
                            break;
                        }
                        assert!(Instant::now() < deadline, "running but never answers");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                } else {
                    let info = d
                        .wait_status("race", "stopped", Duration::from_secs(10))
                        .await;
                    assert_eq!(info["exitCode"], 143, "{info}");
                    assert!(cgroups().is_empty(), "stopped but {:?} exist", cgroups());
                }
            }
            other => panic!("GET after the race: {other} {info}"),
        }
    })
    .await;
}

#[tokio::test]
async fn fifty_containers_each_answer_their_own_fetch() {
    with_daemon("fifty", |d| async move {
        const N: usize = 50;
        let started = Instant::now();
        let starts = (0..N).map(|i| {
            let d = d.clone();
            async move {
                let body = json!({
                    "env": { "WHO": format!("c{i}") },
                    "waitForPorts": [8080],
                    "instance": "lite",
                });
                let (status, info) = d.put(&format!("c{i}"), SERVE, body).await;
                assert_eq!(status, 200, "c{i}: {info}");
                info["address"].as_str().unwrap().to_string()
            }
        });
        let addresses: BTreeSet<String> = futures_util::future::join_all(starts)
            .await
            .into_iter()
            .collect();
        assert_eq!(
            addresses.len(),
            N,
            "every container has an address of its own"
        );
        let fetches = (0..N).map(|i| {
            let d = d.clone();
            async move {
                let (status, env) = d.fetch(&format!("c{i}"), 8080, "/env").await;
                assert_eq!(status, 200);
                assert!(env.lines().any(|l| l == format!("WHO=c{i}")), "c{i}: {env}");
            }
        });
        futures_util::future::join_all(fetches).await;
        let (_, list) = d.call(Method::GET, "/v1/containers", None).await;
        assert_eq!(list.as_array().unwrap().len(), N);
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "took {:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn the_socket_is_private_and_single() {
    with_daemon("socket", |d| async move {
        let Endpoint::Unix(socket) = &d.endpoint else {
            unreachable!()
        };
        let mode = std::fs::metadata(socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir = std::fs::metadata(socket.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir & 0o777, 0o700);

        // A second daemon on the same socket refuses to start, and leaves it alone.
        let other = tempfile::tempdir().unwrap();
        let listen = format!("unix:{}", socket.display());
        let out = silo_serve(&other, &listen).status().unwrap();
        assert!(!out.success());
        let log = std::fs::read_to_string(other.path().join("daemon.log")).unwrap();
        assert!(log.contains("another daemon is already listening"), "{log}");
        assert_eq!(d.call(Method::GET, "/v1/containers", None).await.0, 200);
    })
    .await;
}

#[tokio::test]
async fn tcp_needs_a_token_beyond_loopback_and_checks_it() {
    common::bundle();
    // Refused before binding anything: no token for a non-loopback address.
    let dir = tempfile::tempdir().unwrap();
    let status = silo_serve(&dir, "0.0.0.0:7999").status().unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("without --token-file"), "{log}");

    // On loopback with a token, every request must carry it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::spawn(
        "token",
        dir,
        &addr,
        Endpoint::Tcp(addr.clone()),
        Some("s3cret-token".into()),
    )
    .await;
    with(Arc::new(d), |d| async move {
        assert_eq!(d.call(Method::GET, "/v1/containers", None).await.0, 200);
        for auth in [
            "",
            "Authorization: Bearer wrong\r\n",
            "Authorization: s3cret-token\r\n",
        ] {
            let req = format!("GET /v1/containers HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]);
            assert!(head.starts_with("HTTP/1.1 401"), "{auth:?}: {head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("www-authenticate: bearer"),
                "{head}"
            );
        }
        let (status, info) = d.put("web", SERVE, json!({ "waitForPorts": [8080] })).await;
        assert_eq!(status, 200, "{info}");
        let (status, _) = d.fetch("web", 8080, "/").await;
        assert_eq!(status, 200);
    })
    .await;
}

#[tokio::test]
async fn images_run_with_their_exposed_ports_as_readiness() {
    with_daemon("image", |d| async move {
        let oci = d.dir.path().join("oci");
        common::oci::demo_image(
            &oci,
            json!({"Cmd": ["/bin/testprog", "serve", "8080"], "ExposedPorts": {"8080/tcp": {}}}),
        );
        let out = Command::new(env!("CARGO_BIN_EXE_silo"))
            .arg("--state-dir")
            .arg(d.dir.path().join("state"))
            .args(["image", "import"])
            .arg(&oci)
            .args(["--name", "demo:1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let path = format!("/v1/containers/{}", d.id("img"));
        let (status, info) = d
            .call(Method::PUT, &path, Some(json!({"image": "demo:1"})))
            .await;
        assert_eq!(status, 200, "{info}");
        assert_eq!(info["status"], "healthy", "the image's port was waited for");
        let (status, hello) = d.fetch("img", 8080, "/").await;
        assert_eq!((status, hello.as_str()), (200, "hello from silo\n"));
        let bundle = d
            .dir
            .path()
            .join("state/images/bundles/serve")
            .join(d.id("img"));
        assert!(bundle.join("rootfs/bin/testprog").is_file());

        let other = format!("/v1/containers/{}", d.id("bad"));
        let (status, err) = d
            .call(Method::PUT, &other, Some(json!({"image": "nope:1"})))
            .await;
        assert_eq!(status, 400, "{err}");
        assert!(err["error"].as_str().unwrap().contains("nope:1"), "{err}");
        let both = json!({"image": "demo:1", "bundle": common::bundle()});
        let (status, err) = d.call(Method::PUT, &other, Some(both)).await;
        assert_eq!(status, 400, "{err}");
        assert!(
            !d.dir
                .path()
                .join("state/images/bundles/serve")
                .join(d.id("bad"))
                .exists()
        );

        let (status, _) = d.call(Method::DELETE, &path, None).await;
        assert_eq!(status, 204);
        assert!(
            !bundle.exists(),
            "the unpacked image outlived its container"
        );
    })
    .await;
}
