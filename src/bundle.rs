//! An OCI bundle: a directory holding `config.json` and the root filesystem it names.
//!
//! [`Bundle::load`] reads the configuration with oci-spec and checks it against what silo
//! implements. Anything silo would otherwise silently ignore is refused by its JSON path, so
//! a bundle never runs with less isolation than its author asked for.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Errors from reading or checking a bundle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bundle {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("bundle {0}: config.json is missing")]
    MissingConfig(PathBuf),
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: unknown field {field}")]
    Unknown { path: PathBuf, field: String },
    #[error("{path}: field {field} is required")]
    Missing { path: PathBuf, field: &'static str },
    #[error("{path}: field {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: field {field} is not supported by silo{hint}")]
    Unsupported {
        path: PathBuf,
        field: String,
        hint: &'static str,
    },
    #[error("{path}: root filesystem {rootfs} does not exist or is not a directory")]
    MissingRootfs { path: PathBuf, rootfs: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A bundle whose configuration silo has read and accepted.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    config_path: PathBuf,
    rootfs: PathBuf,
    spec: Spec,
}

impl Bundle {
    /// Reads `DIR/config.json`, checks every field against what silo supports and resolves
    /// the root filesystem (relative to the bundle directory, as the OCI spec says).
    pub fn load(dir: impl AsRef<Path>) -> Result<Bundle> {
        Bundle::load_checked(dir.as_ref(), false)
    }

    /// Like [`Bundle::load`], but accepts `hooks` and `process.terminal`, for a caller that
    /// runs the hooks itself and hands the terminal over (runc's command line).
    pub fn load_for_runc(dir: impl AsRef<Path>) -> Result<Bundle> {
        Bundle::load_checked(dir.as_ref(), true)
    }

    fn load_checked(dir: &Path, runc: bool) -> Result<Bundle> {
        if !dir.is_dir() {
            return Err(Error::NotADirectory(dir.to_path_buf()));
        }
        let dir = dir
            .canonicalize()
            .map_err(|_| Error::NotADirectory(dir.to_path_buf()))?;
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::MissingConfig(dir));
        }
        let text = std::fs::read(&config_path).map_err(|source| Error::Read {
            path: config_path.clone(),
            source,
        })?;
        Bundle::parse(&text, dir, runc)
    }

    /// Checks `text` as the `config.json` of the bundle directory `dir` (taken as given,
    /// not made absolute) without reading it from disk. Only the root filesystem is looked
    /// up, to make sure it is a directory.
    pub fn from_json(text: &[u8], dir: impl Into<PathBuf>) -> Result<Bundle> {
        Bundle::parse(text, dir.into(), false)
    }

    /// [`Bundle::from_json`], with what runc mode accepts beyond it when `runc` is set.
    fn parse(text: &[u8], dir: PathBuf, runc: bool) -> Result<Bundle> {
        let config_path = dir.join("config.json");
        // serde_json's own errors say where (line and column) and what (the field).
        let spec: Spec = serde_json::from_slice(text).map_err(|source| Error::Json {
            path: config_path.clone(),
            source,
        })?;
        let raw: serde_json::Value =
            serde_json::from_slice(text).map_err(|source| Error::Json {
                path: config_path.clone(),
                source,
            })?;
        // Keys that oci-spec does not know (a misspelt "readOnly", say) would otherwise be
        // dropped without a word; what survives a round trip is what it understood.
        let known = serde_json::to_value(&spec).unwrap_or_default();
        if let Some(field) = unknown_field(&raw, &known, "") {
            return Err(Error::Unknown {
                path: config_path,
                field,
            });
        }
        check(&spec, &config_path, runc)?;

        let root = spec.root().as_ref().ok_or(Error::Missing {
            path: config_path.clone(),
            field: "root.path",
        })?;
        let rootfs = dir.join(root.path());
        if !rootfs.is_dir() {
            return Err(Error::MissingRootfs {
                path: config_path,
                rootfs,
            });
        }
        Ok(Bundle {
            dir,
            config_path,
            rootfs,
            spec,
        })
    }

    /// This bundle with `process` in place of its own (for runc's `exec`), checked again.
    pub fn with_process(&self, process: oci_spec::runtime::Process) -> Result<Bundle> {
        let mut spec = self.spec.clone();
        spec.set_process(Some(process));
        check(&spec, &self.config_path, true)?;
        Ok(Bundle {
            spec,
            ..self.clone()
        })
    }

    /// The bundle directory, absolute.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `config.json`, for error messages.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The root filesystem, absolute.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Builds the error for a field whose value silo cannot use, naming this bundle's file.
    pub(crate) fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Invalid {
            path: self.config_path.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Refuses every field whose meaning silo does not implement; `hooks` and a terminal only
/// when the caller (runc mode) handles them.
fn check(spec: &Spec, path: &Path, runc: bool) -> Result<()> {
    let unsupported = |field: &str, hint: &'static str| {
        Err(Error::Unsupported {
            path: path.to_path_buf(),
            field: field.to_string(),
            hint,
        })
    };
    let process = spec.process().as_ref().ok_or(Error::Missing {
        path: path.to_path_buf(),
        field: "process",
    })?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(Error::Missing {
            path: path.to_path_buf(),
            field: "process.args",
        });
    }
    if process.terminal() == Some(true) && !runc {
        return unsupported("process.terminal", " (run without a terminal)");
    }
    if process.apparmor_profile().is_some() {
        return unsupported("process.apparmorProfile", "");
    }
    if process.selinux_label().is_some() {
        return unsupported("process.selinuxLabel", "");
    }
    if process.io_priority().is_some() {
        return unsupported("process.ioPriority", "");
    }
    if process.scheduler().is_some() {
        return unsupported("process.scheduler", "");
    }
    if process.exec_cpu_affinity().is_some() {
        return unsupported("process.execCPUAffinity", "");
    }
    if spec.domainname().is_some() {
        return unsupported("domainname", "");
    }
    if spec.hooks().is_some() && !runc {
        return unsupported("hooks", "");
    }
    for (i, mount) in spec.mounts().iter().flatten().enumerate() {
        if mount.uid_mappings().is_some() || mount.gid_mappings().is_some() {
            return unsupported(&format!("mounts[{i}].uidMappings"), " (no user namespaces)");
        }
        if !mount.destination().is_absolute() {
            return Err(Error::Invalid {
                path: path.to_path_buf(),
                field: format!("mounts[{i}].destination"),
                reason: format!("{} is not absolute", mount.destination().display()),
            });
        }
    }

    let Some(linux) = spec.linux() else {
        return Ok(());
    };
    if linux.uid_mappings().is_some() || linux.gid_mappings().is_some() {
        return unsupported("linux.uidMappings", " (no user namespaces)");
    }
    for (i, ns) in linux.namespaces().iter().flatten().enumerate() {
        match ns.typ() {
            LinuxNamespaceType::User => {
                return unsupported(&format!("linux.namespaces[{i}] (user)"), "");
            }
            LinuxNamespaceType::Time => {
                return unsupported(&format!("linux.namespaces[{i}] (time)"), "");
            }
            // Only runc mode's init is cloned by a process that can join a pid namespace
            // for it (see spawn::spawn_direct).
            LinuxNamespaceType::Pid if ns.path().is_some() && !runc => {
                return unsupported(
                    &format!("linux.namespaces[{i}].path"),
                    " (only network, ipc and uts namespaces can be joined)",
                );
            }
            LinuxNamespaceType::Mount | LinuxNamespaceType::Cgroup if ns.path().is_some() => {
                return unsupported(
                    &format!("linux.namespaces[{i}].path"),
                    " (only network, ipc, uts and, from runc's command line, pid namespaces \
                     can be joined)",
                );
            }
            _ => {}
        }
    }
    if linux.net_devices().is_some() {
        return unsupported("linux.netDevices", "");
    }
    if linux.intel_rdt().is_some() {
        return unsupported("linux.intelRdt", "");
    }
    if linux.personality().is_some() {
        return unsupported("linux.personality", "");
    }
    if linux.memory_policy().is_some() {
        return unsupported("linux.memoryPolicy", "");
    }
    if linux.time_offsets().is_some() {
        return unsupported("linux.timeOffsets", "");
    }
    if linux.mount_label().is_some() {
        return unsupported("linux.mountLabel", "");
    }
    if let Some(p) = linux.rootfs_propagation()
        && p != "private"
        && p != "rprivate"
    {
        return unsupported(&format!("linux.rootfsPropagation ({p})"), " (only private)");
    }
    if let Some(res) = linux.resources() {
        for (i, rule) in res.devices().iter().flatten().enumerate() {
            if rule.allow() && !standard_device_rule(rule) {
                return unsupported(
                    &format!("linux.resources.devices[{i}] ({})", device_rule_text(rule)),
                    " beyond the standard devices (null, zero, full, random, urandom, tty, \
                     console, ptmx, pts): a container opens only device nodes silo binds in",
                );
            }
        }
        if res.block_io().is_some() {
            return unsupported("linux.resources.blockIO", "");
        }
        if res.hugepage_limits().is_some() {
            return unsupported("linux.resources.hugepageLimits", "");
        }
        if res.network().is_some() {
            return unsupported("linux.resources.network", "");
        }
        if res.rdma().is_some() {
            return unsupported("linux.resources.rdma", "");
        }
        if res.unified().is_some() {
            return unsupported("linux.resources.unified", "");
        }
        if let Some(cpu) = res.cpu() {
            let set = [
                ("cpus", cpu.cpus().is_some()),
                ("mems", cpu.mems().is_some()),
                ("realtimeRuntime", cpu.realtime_runtime().is_some()),
                ("realtimePeriod", cpu.realtime_period().is_some()),
                ("idle", cpu.idle().is_some()),
                ("burst", cpu.burst().is_some()),
            ];
            if let Some((name, _)) = set.iter().find(|(_, is_set)| *is_set) {
                return unsupported(
                    &format!("linux.resources.cpu.{name}"),
                    " (only shares, quota and period)",
                );
            }
        }
        if let Some(mem) = res.memory() {
            let set = [
                ("kernel", mem.kernel().is_some()),
                ("kernelTCP", mem.kernel_tcp().is_some()),
                ("disableOOMKiller", mem.disable_oom_killer().is_some()),
                ("swappiness", mem.swappiness().is_some()),
            ];
            if let Some((name, _)) = set.iter().find(|(_, is_set)| *is_set) {
                return unsupported(
                    &format!("linux.resources.memory.{name}"),
                    " (only limit, reservation and swap)",
                );
            }
        }
    }
    Ok(())
}

/// The first key of `raw` (a non-null value) that `known` does not have, as a JSON path.
fn unknown_field(raw: &serde_json::Value, known: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    match (raw, known) {
        (Value::Object(raw), Value::Object(known)) => raw.iter().find_map(|(key, value)| {
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            match known.get(key) {
                None if !value.is_null() => Some(path),
                None => None,
                Some(k) => unknown_field(value, k, &path),
            }
        }),
        (Value::Array(raw), Value::Array(known)) => raw
            .iter()
            .zip(known)
            .enumerate()
            .find_map(|(i, (r, k))| unknown_field(r, k, &format!("{at}[{i}]"))),
        _ => None,
    }
}

/// A device rule as the kernel's devices.allow writes it: `c 10:200 rwm`.
fn device_rule_text(rule: &oci_spec::runtime::LinuxDeviceCgroup) -> String {
    let number = |n: Option<i64>| n.map_or("*".to_string(), |n| n.to_string());
    let typ = rule
        .typ()
        .map_or("a".to_string(), |t| t.as_str().to_string());
    let access = rule.access().as_deref().unwrap_or("rwm");
    format!(
        "{typ} {}:{} {access}",
        number(rule.major()),
        number(rule.minor())
    )
}

/// Whether a device cgroup rule grants no more than silo gives every container anyway:
/// mknod alone (nodes the container makes cannot be opened), or the standard devices.
fn standard_device_rule(rule: &oci_spec::runtime::LinuxDeviceCgroup) -> bool {
    use oci_spec::runtime::LinuxDeviceType as T;
    let access = rule.access().as_deref().unwrap_or("rwm");
    if !access.contains('r') && !access.contains('w') {
        return true;
    }
    let char_dev = matches!(rule.typ(), Some(T::C));
    let standard = matches!(
        (rule.major(), rule.minor()),
        (Some(1), Some(3 | 5 | 7 | 8 | 9)) | (Some(5), Some(0..=2)) | (Some(136), _)
    );
    char_dev && standard
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(config: &str) -> (tempfile::TempDir, Result<Bundle>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let bundle = Bundle::load(dir.path());
        (dir, bundle)
    }

    const MINIMAL: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"cwd":"/","args":["/bin/true"],"user":{"uid":0,"gid":0}}}"#;

    #[test]
    fn minimal_bundle_loads() {
        let (_dir, bundle) = bundle_with(MINIMAL);
        let bundle = bundle.unwrap();
        assert!(bundle.rootfs().ends_with("rootfs"));
    }

    #[test]
    fn bad_json_names_the_file() {
        let (_dir, err) = bundle_with("{not json");
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("config.json"), "{msg}");
    }

    #[test]
    fn missing_rootfs_is_named() {
        let cfg = MINIMAL.replace("\"rootfs\"", "\"nowhere\"");
        let (_dir, err) = bundle_with(&cfg);
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("nowhere"), "{msg}");
    }

    #[test]
    fn unsupported_field_is_named() {
        let cfg = MINIMAL.replace(r#""root""#, r#""linux":{"intelRdt":{"closID":"x"}},"root""#);
        let (_dir, err) = bundle_with(&cfg);
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("linux.intelRdt"), "{msg}");
    }

    #[test]
    fn empty_args_are_refused() {
        let cfg = MINIMAL.replace(r#"["/bin/true"]"#, "[]");
        let (_dir, err) = bundle_with(&cfg);
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("process.args"), "{msg}");
    }

    #[test]
    fn misspelt_fields_are_named() {
        let cfg = MINIMAL.replace(r#""path":"rootfs""#, r#""path":"rootfs","readOnly":true"#);
        let (_dir, err) = bundle_with(&cfg);
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("unknown field root.readOnly"), "{msg}");
    }

    #[test]
    fn wrong_types_say_where() {
        let cfg = MINIMAL.replace(r#""uid":0"#, r#""uid":"zero""#);
        let (_dir, err) = bundle_with(&cfg);
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("line") && msg.contains("column"), "{msg}");
    }

    #[test]
    fn unsupported_values_are_named() {
        let with_linux = |linux: &str| MINIMAL.replace(r#""root""#, &format!("{linux},\"root\""));
        for (linux, want) in [
            (
                r#""linux":{"rootfsPropagation":"shared"}"#,
                "linux.rootfsPropagation (shared)",
            ),
            (
                r#""linux":{"resources":{"cpu":{"shares":2,"cpus":"0-1"}}}"#,
                "linux.resources.cpu.cpus",
            ),
            (
                r#""linux":{"resources":{"memory":{"swappiness":10}}}"#,
                "linux.resources.memory.swappiness",
            ),
            (
                r#""linux":{"resources":{"devices":[{"allow":true,"type":"c","major":10,
                    "minor":200,"access":"rw"}]}}"#,
                "linux.resources.devices[0] (c 10:200 rw)",
            ),
        ] {
            let (_dir, err) = bundle_with(&with_linux(linux));
            let msg = err.unwrap_err().to_string();
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn missing_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let msg = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("config.json is missing"), "{msg}");
    }
}
