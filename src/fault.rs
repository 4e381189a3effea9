//! Crash points for tests: `SILO_CRASH_AT=start:veth` makes the process kill itself with
//! SIGKILL when it reaches the point of that name, so that a test can check what a runtime
//! started afterwards makes of what was left half done. Unset, a point costs one load.

use std::sync::OnceLock;

/// The points a start and a destroy pass, in order.
pub const POINTS: &[&str] = &[
    "start:record",
    "start:cgroup",
    "start:spawn",
    "start:veth",
    "start:firewall",
    "destroy:signal",
    "exit:teardown",
];

/// Dies here, at once and without cleaning up, if `SILO_CRASH_AT` names this point.
pub fn point(name: &str) {
    static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();
    let at = CRASH_AT.get_or_init(|| std::env::var("SILO_CRASH_AT").ok());
    if at.as_deref() == Some(name) {
        tracing::warn!(point = name, "SILO_CRASH_AT: killing this process");
        // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so this does not return.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
