//! The main job, end to end: start a container from the demo bundle serving HTTP, fetch a
//! page through its TCP port, send it SIGTERM, and print how it exited.
//!
//! Run it as root through `scripts/demo`, which builds the bundle first.

use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use silo::{Runtime, RuntimeConfig, StartOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bundle = std::env::args().nth(1).context("usage: demo BUNDLE")?;
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let container = runtime.container("demo")?;
    let opts = StartOptions {
        bundle: bundle.into(),
        entrypoint: Some(vec!["/bin/testprog".into(), "serve".into(), "8080".into()]),
        env: [("GREETING".to_string(), "hello".to_string())].into(),
        ..StartOptions::default()
    };
    container.start(opts).await?;
    let pid = container.pid().map_or("?".into(), |p| p.to_string());
    println!("started container {} (pid {pid})", container.id());

    let result = talk(&container).await;
    if result.is_err() {
        container.destroy(Some("demo failed".into())).await?;
    }
    result?;

    container.signal(libc::SIGTERM).await?;
    println!("sent SIGTERM");
    match container.monitor().await {
        Ok(()) => println!("monitor: exited cleanly"),
        Err(silo::Error::Exit(exit)) => println!("monitor: {exit}"),
        Err(e) => return Err(e.into()),
    }
    container.destroy(None).await?;
    Ok(())
}

async fn talk(container: &silo::Container) -> anyhow::Result<()> {
    let port = container.tcp_port(8080)?;
    println!("port 8080 answers at {}", port.socket_addr().await?);
    // start() does not wait for readiness: retry until the server inside listens.
    for attempt in 0.. {
        let req = http::Request::get("/").body(Empty::<bytes::Bytes>::new())?;
        match port.fetch(req).await {
            Ok(resp) => {
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                println!(
                    "GET / -> {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
                return Ok(());
            }
            Err(silo::Error::NotListening { .. }) if attempt < 200 => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!()
}
