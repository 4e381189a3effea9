//! The commands that report: state, list, ps, features and spec.

use std::path::Path;

use super::state::{Dir, OCI_VERSION};
use super::{Error, Global, Result, print};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    Table,
    Json,
}

pub fn state(g: &Global, id: &str) -> Result<()> {
    let dir = Dir::new(&g.root, id)?;
    let saved = dir.load()?;
    let report = saved.report(saved.status(&dir));
    let json = serde_json::to_string_pretty(&report).expect("state serializes");
    print(&format!("{json}\n"));
    Ok(())
}

pub fn list(g: &Global, format: ListFormat, quiet: bool) -> Result<()> {
    let mut saved = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&g.root) {
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Ok(dir) = Dir::new(&g.root, &id) else {
                continue;
            };
            // A directory without a state is a create under way, or one cut short.
            if let Ok(s) = dir.load() {
                let status = s.status(&dir);
                saved.push((s, status));
            }
        }
    }
    saved.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    let out = if quiet {
        saved.iter().map(|(s, _)| format!("{}\n", s.id)).collect()
    } else if format == ListFormat::Json {
        let reports: Vec<_> = saved.iter().map(|(s, st)| s.report(*st)).collect();
        format!(
            "{}\n",
            serde_json::to_string(&reports).expect("states serialize")
        )
    } else {
        let mut out = String::from("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER\n");
        for (s, st) in &saved {
            let r = s.report(*st);
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\troot\n",
                r.id,
                r.pid,
                r.status,
                r.bundle.display(),
                r.created
            ));
        }
        out
    };
    print(&out);
    Ok(())
}

pub fn ps(g: &Global, id: &str, format: ListFormat, ps_args: &[String]) -> Result<()> {
    let dir = Dir::new(&g.root, id)?;
    let saved = dir.load()?;
    let mut pids = saved.cgroup()?.procs();
    pids.sort_unstable();
    if format == ListFormat::Json {
        let json = serde_json::to_string(&pids).expect("pids serialize");
        print(&format!("{json}\n"));
        return Ok(());
    }
    // As runc: ps(1)'s own table, with only the container's lines.
    let args: Vec<&str> = if ps_args.is_empty() {
        vec!["-ef"]
    } else {
        ps_args.iter().map(String::as_str).collect()
    };
    let out = std::process::Command::new("ps")
        .args(&args)
        .output()
        .map_err(|e| dir.io("run ps", e))?;
    if !out.status.success() {
        return Err(Error::Usage(format!(
            "ps {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let column = header
        .split_whitespace()
        .position(|h| h == "PID")
        .ok_or_else(|| Error::Usage("ps printed no PID column".into()))?;
    let mut table = format!("{header}\n");
    for line in lines {
        let pid = line
            .split_whitespace()
            .nth(column)
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| pids.contains(&p)) {
            table.push_str(line);
            table.push('\n');
        }
    }
    print(&table);
    Ok(())
}

/// The OCI features document: what a bundle may ask of silo.
pub fn features() -> Result<()> {
    let caps: Vec<String> = caps::all().into_iter().map(|c| c.to_string()).collect();
    let doc = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer",
                  "poststart", "poststop"],
        "mountOptions": ["async", "atime", "bind", "dev", "diratime", "dirsync", "exec",
                         "mand", "noatime", "nodev", "nodiratime", "noexec", "nomand",
                         "norelatime", "nostrictatime", "nosuid", "private", "rbind", "relatime",
                         "ro", "rprivate", "rshared", "rslave", "runbindable", "rw", "shared",
                         "slave", "strictatime", "suid", "sync", "unbindable"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": caps,
            "cgroup": { "v1": true, "v2": true, "systemd": false, "systemdUser": false,
                        "rdma": false },
            "seccomp": { "enabled": true, "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO",
                         "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
                         "SCMP_ACT_TRAP"] },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false },
        },
        "annotations": { "org.opencontainers.runtime-spec.features.silo.version":
                         env!("CARGO_PKG_VERSION") },
    });
    let json = serde_json::to_string_pretty(&doc).expect("features serialize");
    print(&format!("{json}\n"));
    Ok(())
}

/// Writes a starter `config.json` (oci-spec's default, which follows runc's, without a
/// terminal, which silo does not support) into `bundle`.
pub fn spec(bundle: &Path, rootless: bool) -> Result<()> {
    if rootless {
        return Err(Error::Usage(
            "--rootless is not supported: silo needs root and has no user namespaces".into(),
        ));
    }
    let path = bundle.join("config.json");
    if path.exists() {
        return Err(Error::Usage(format!(
            "{} exists; remove it first",
            path.display()
        )));
    }
    let mut spec = oci_spec::runtime::Spec::default();
    if let Some(process) = spec.process_mut() {
        process.set_terminal(Some(false));
    }
    let json = serde_json::to_string_pretty(&spec).expect("a spec serializes");
    std::fs::write(&path, json + "\n").map_err(|e| Error::Io {
        id: String::new(),
        what: format!("write {}", path.display()),
        source: e,
    })
}
