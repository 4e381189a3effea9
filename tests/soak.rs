//! A short soak: start -> fetch -> destroy, four containers at a time, and nothing of them
//! left on the host or in the runtime's process afterwards. scripts/soak runs a long one.

mod common;

use std::time::{Duration, Instant};

use common::soak::{Soak, open_fds, soak};
use common::{exit_code, run};

/// Both tests count this process's descriptors, so they take turns.
static FDS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fetch_destroy_cycles_leak_nothing() {
    let _turn = FDS.lock().await;
    let config = Soak {
        cycles: 40,
        parallel: 4,
        time_limit: Duration::from_secs(120),
    };
    run("soak", |h| async move {
        let report = soak(&h, &config).await;
        assert_eq!(report.cycles, config.cycles, "{report}");
        assert!(report.leaks.is_empty(), "{report}");
    })
    .await;
}

#[tokio::test]
async fn a_run_that_ends_by_itself_closes_its_descriptors() {
    let _turn = FDS.lock().await;
    run("selfexit", |h| async move {
        let before = open_fds();
        let c = h.start("true", &["/bin/true"]).await;
        assert_eq!(exit_code(&c).await, 0);
        // With no destroy, the monitor task lets the last of them go just after it
        // publishes the exit. Only the lock on its state directory stays, which says that
        // this runtime still owns the stopped container's record.
        let lock = h.runtime.config().state_dir.join(c.id()).join("lock");
        // (Reading /proc/self/fd takes a descriptor of its own.)
        let held = |now: &std::collections::BTreeMap<String, String>| {
            now.iter()
                .filter(|(fd, target)| before.get(*fd) != Some(target))
                .filter(|(_, target)| !target.starts_with("/proc/"))
                .map(|(_, target)| target.clone())
                .collect::<Vec<String>>()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while held(&open_fds()) != [lock.display().to_string()] && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(held(&open_fds()), [lock.display().to_string()]);
        // Destroyed, it holds nothing. (The runtime's own descriptors may have gone
        // meanwhile; only one that is new would be a leak.)
        c.destroy(None).await.unwrap();
        assert_eq!(held(&open_fds()), Vec::<String>::new());
    })
    .await;
}
