//! Podman and containerd, installed from Debian by scripts/deps-runc, drive silo as their
//! OCI runtime through runc's command line. Each runs in a mount and network namespace of
//! its own (see the scripts in tests/runc/), so nothing of the machine's is changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn install() {
    static DEPS: Once = Once::new();
    DEPS.call_once(|| {
        let status = Command::new(repo().join("scripts/deps-runc"))
            .status()
            .expect("run scripts/deps-runc");
        assert!(status.success(), "scripts/deps-runc failed");
    });
}

/// Runs tests/runc/SCRIPT in new mount and network namespaces, bounded in time, and
/// asserts that it passed.
fn run_script(script: &str, args: &[&Path]) {
    install();
    let rootfs = common::bundle().join("rootfs");
    let out = Command::new("timeout")
        .args(["300", "unshare", "--mount", "--net", "--fork", "--", "bash"])
        .arg(repo().join("tests/runc").join(script))
        .arg(env!("CARGO_BIN_EXE_silo"))
        .arg(&rootfs)
        .args(args)
        .output()
        .expect("run the script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
}

/// Removes the cgroup `rel` below /silo and everything below it, in every hierarchy:
/// Podman puts conmon in a cgroup of its own there, which it never removes.
fn remove_cgroups(rel: &str) {
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let top = hierarchy.path().join("silo").join(rel);
        if !top.is_dir() {
            continue;
        }
        let mut dirs = vec![top.clone()];
        let mut i = 0;
        while i < dirs.len() {
            for entry in std::fs::read_dir(&dirs[i]).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(entry.path());
                }
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            std::fs::remove_dir(dir)
                .unwrap_or_else(|e| panic!("remove cgroup {}: {e}", dir.display()));
        }
    }
}

#[test]
fn podman_runs_silo_as_its_runtime() {
    let work = tempfile::tempdir().unwrap();
    // Podman makes conmon's cgroup below the cgroup parent: below /silo, so that nothing
    // is made elsewhere.
    let parent = format!("podman-{}", std::process::id());
    let parent_path = PathBuf::from(format!("/silo/{parent}"));
    let result = std::panic::catch_unwind(|| {
        run_script("podman.sh", &[work.path(), &parent_path]);
    });
    remove_cgroups(&parent);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn containerd_runs_silo_as_its_runc_binary() {
    let work = tempfile::tempdir().unwrap();
    run_script("containerd.sh", &[work.path()]);
    // ctr's cgroupsPath /default/ID lands below /silo, and goes with the container.
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        for id in ["c1", "c2"] {
            let leaf = hierarchy.path().join("silo/default").join(id);
            assert!(!leaf.exists(), "{} was left behind", leaf.display());
        }
    }
}
