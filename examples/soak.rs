//! The long soak behind scripts/soak: CYCLES start -> fetch -> destroy cycles of the demo
//! bundle, PARALLEL at a time, then the leak checks of tests/common/soak.rs, whose numbers
//! it prints. Exits 1 on a leak, on RSS that grows over the second half of the cycles, or
//! when the time limit cut the cycles short.
//!
//! Usage: soak [CYCLES] [PARALLEL] [TIME_LIMIT_SECONDS]. Run it as root inside a network
//! namespace of its own (scripts/soak does both).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use anyhow::Context;
use common::soak::{Soak, soak};

/// How much the resident set may grow from the middle of the soak to its end.
const MAX_RSS_GROWTH_KIB: u64 = 4096;

fn arg(n: usize, default: u64) -> anyhow::Result<u64> {
    match std::env::args().nth(n) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .with_context(|| format!("argument {n}: not a count: {v:?}")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Soak {
        cycles: arg(1, 2_000)? as usize,
        parallel: arg(2, 4)? as usize,
        time_limit: Duration::from_secs(arg(3, 1_800)?),
    };
    anyhow::ensure!(
        config.cycles > 0 && config.parallel > 0,
        "{config:?}: use counts above 0"
    );
    let report = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (out, run_config) = (report.clone(), config.clone());
    common::run("soak", |h| async move {
        *out.lock().unwrap() = Some(soak(&h, &run_config).await);
    })
    .await;
    let report = report
        .lock()
        .unwrap()
        .take()
        .context("the soak made no report")?;
    println!("{report}");
    anyhow::ensure!(report.leaks.is_empty(), "the soak leaked");
    // Flat, give or take the allocator: a leak of a few KiB a cycle shows over the second
    // half of a long soak.
    let [.., mid, end] = report.rss_kib;
    anyhow::ensure!(
        end <= mid + MAX_RSS_GROWTH_KIB,
        "RSS grew by {} KiB over the second half of the cycles",
        end - mid
    );
    anyhow::ensure!(
        report.cycles == config.cycles,
        "the time limit stopped the soak after {} of {} cycles",
        report.cycles,
        config.cycles
    );
    Ok(())
}
