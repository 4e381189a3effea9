//! The cgroup v2 path, tested on any host: the `silo` CLI runs in a private mount namespace
//! where the unified hierarchy is mounted at /sys/fs/cgroup, so silo detects v2 there.

mod common;

use std::process::Command;

#[test]
fn containers_run_in_a_v2_cgroup_that_is_removed_after() {
    let bundle = common::bundle();
    let state = tempfile::tempdir().unwrap();
    let id = format!("v2-{}", std::process::id());
    let script = r#"
        set -u
        mount -t cgroup2 none /sys/fs/cgroup || exit 99
        "$SILO" --state-dir "$STATE" run --id "$ID" "$BUNDLE" -- /bin/testprog sleep &
        silo=$!
        for _ in $(seq 250); do
            [ -s "/sys/fs/cgroup/silo/$ID/cgroup.procs" ] && break
            sleep 0.02
        done
        echo "procs=$(cat "/sys/fs/cgroup/silo/$ID/cgroup.procs" 2>/dev/null | wc -l)"
        kill -TERM "$silo"
        wait "$silo"
        echo "exit=$?"
        [ -e "/sys/fs/cgroup/silo/$ID" ] && echo "cgroup=left" || echo "cgroup=gone"
        echo "memory=$(grep -cw memory /sys/fs/cgroup/cgroup.controllers)"
        "$SILO" --state-dir "$STATE" run --id "$ID-lite" --instance lite "$BUNDLE" -- /bin/true
        echo "lite=$?"
    "#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", script])
        .env("SILO", env!("CARGO_BIN_EXE_silo"))
        .env("STATE", state.path())
        .env("ID", &id)
        .env("BUNDLE", &bundle)
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let has = |line: &str| stdout.lines().any(|l| l == line);
    assert!(
        has("procs=1"),
        "the init was not in its v2 cgroup:\n{stdout}\n{stderr}"
    );
    assert!(
        has("exit=143"),
        "SIGTERM was not forwarded:\n{stdout}\n{stderr}"
    );
    assert!(
        has("cgroup=gone"),
        "the v2 cgroup was left:\n{stdout}\n{stderr}"
    );
    if has("memory=0") {
        // No memory controller is delegated to this hierarchy: a memory limit cannot be
        // applied, and silo must say so rather than run without it.
        assert!(has("lite=125"), "{stdout}\n{stderr}");
        assert!(
            stderr.contains("the memory controller is not available"),
            "{stderr}"
        );
    } else {
        assert!(has("lite=0"), "{stdout}\n{stderr}");
    }
    // Whatever happened inside, nothing of this test's is left in the real hierarchy.
    for dir in ["/sys/fs/cgroup/unified/silo", "/sys/fs/cgroup/silo"] {
        let leaf = std::path::Path::new(dir).join(&id);
        assert!(!leaf.exists(), "{} left behind", leaf.display());
    }
}
