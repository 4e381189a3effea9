//! A short soak: start -> fetch -> destroy, four containers at a time, and nothing of them
//! left on the host or in the runtime's process afterwards. scripts/soak runs a long one.

mod common;

use std::time::Duration;

use common::soak::{Soak, soak};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fetch_destroy_cycles_leak_nothing() {
    let config = Soak {
        cycles: 40,
        parallel: 4,
        time_limit: Duration::from_secs(120),
    };
    common::run("soak", |h| async move {
        let report = soak(&h, &config).await;
        assert_eq!(report.cycles, config.cycles, "{report}");
        assert!(report.leaks.is_empty(), "{report}");
    })
    .await;
}
