//! Spawning a container's init process.
//!
//! The runtime is a multi-threaded tokio process. After `clone3` only the calling thread
//! exists in the child, and any lock another thread held (the allocator's, stdout's, a
//! tracing subscriber's) stays locked there forever. Two designs avoid that: re-exec a
//! single-threaded helper binary that does the setup, or do the setup in the cloned child
//! using nothing but raw syscalls on data prepared beforehand. silo does the latter: it
//! keeps start latency to one clone and one exec, and it does not need a helper binary next
//! to every program that embeds the library. The price is discipline in [`child`]: no
//! allocation, no panics, no std I/O, only `libc` calls on the [`Plan`] built in the parent,
//! and raw syscalls where glibc's wrapper would consult its (copied, stale) thread list.
//!
//! The init is not the runtime's child but a *keeper*'s: a process cloned first, that clones
//! the init, waits for it and writes its exit status into the container's state directory.
//! The runtime may then die (a supervisor crash, an upgrade) without the exit status going
//! to whoever adopts orphans; a runtime started later reads it there. The keeper also holds
//! a copy of the log pipe's read end, so that the container's writes never fail for want of
//! a reader while no runtime runs, and a later runtime takes it over with `pidfd_getfd`.
//!
//! The keeper shares the runtime's memory (`CLONE_VM`) and runs on a stack of its own. A
//! forked copy would cost each container a private copy of every page the runtime writes
//! afterwards (a megabyte each within seconds, in a daemon); sharing costs a task and a few
//! pages of stack. The price: the keeper runs beside the runtime's threads, on the cloning
//! thread's TLS, so it makes only raw syscalls (no libc call that could write `errno`), and
//! touches only its stack and what it copied there before telling the runtime to go on.
//!
//! For runc's command line, [`spawn_direct`] clones the init without a keeper, as a child
//! of the calling process, which exits after `create`: the init is then reparented to the
//! caller's subreaper (a containerd shim, conmon), which reaps it. Such an init does its
//! whole setup, says so on a ready pipe, and then waits on an exec FIFO until `start`.
//!
//! The child blocks on a pipe until [`Child::release`] so that the parent can place it in
//! its cgroup and wire its network first. Whatever fails in the child is written to an error
//! pipe as a fixed-size [`Report`] and the child exits with 127; the pipe is close-on-exec,
//! so a successful exec leaves it empty.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount};

use crate::bundle::{self, Bundle};

/// Errors from preparing or cloning the init process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bundle(#[from] bundle::Error),
    #[error(transparent)]
    Seccomp(crate::seccomp::Error),
    #[error("{what}: {value:?} contains a NUL byte")]
    Nul { what: &'static str, value: String },
    #[error("failed to {what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Os { what, source }
}

fn cstring(what: &'static str, value: impl AsRef<OsStr>) -> Result<CString> {
    let bytes = value.as_ref().as_bytes();
    CString::new(bytes).map_err(|_| Error::Nul {
        what,
        value: String::from_utf8_lossy(bytes).into_owned(),
    })
}

/// A raw syscall, returning its errno rather than writing it to `errno`: what the keeper,
/// which runs on a runtime thread's TLS, must use.
macro_rules! raw {
    ($($arg:expr),+ $(,)?) => {
        syscalls::syscall!($($arg),+)
    };
}

/// Where the container's standard output and error go.
#[derive(Debug)]
pub enum Output {
    /// The same descriptors as the calling process.
    Inherit,
    /// One descriptor for both (the write end of the log pipe).
    Fd(OwnedFd),
}

/// The process to run, after the caller's overrides were applied to the bundle's.
#[derive(Debug, Clone)]
pub struct Process {
    pub args: Vec<String>,
    pub env: Vec<String>,
}

/// The capability sets, as bitmasks over capability numbers.
#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    bounding: u64,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    ambient: u64,
}

/// The capabilities a container gets when its bundle names none: the set Docker and
/// Podman grant by default.
const DEFAULT_CAPS: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_MKNOD,
    caps::Capability::CAP_NET_RAW,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETFCAP,
    caps::Capability::CAP_SETPCAP,
    caps::Capability::CAP_NET_BIND_SERVICE,
    caps::Capability::CAP_SYS_CHROOT,
    caps::Capability::CAP_KILL,
    caps::Capability::CAP_AUDIT_WRITE,
];

/// Kernel interfaces hidden from a container whose bundle does not say otherwise: they leak
/// host information or reach host hardware.
const DEFAULT_MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// Kernel interfaces a container may read but not change, unless its bundle says otherwise.
const DEFAULT_READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// One mount, resolved to what the child passes to mount(2).
#[derive(Debug)]
struct MountOp {
    /// Destination inside the container, absolute, for error messages.
    dest: PathBuf,
    /// Destination relative to the root filesystem, for openat2.
    rel: CString,
    /// Each missing ancestor is made with mkdirat(parent, name): (parent, name) pairs from the
    /// top, parents relative to the root filesystem ("" for the root itself).
    parents: Vec<(CString, CString)>,
    /// Bind mounts of files need a file to mount onto.
    file_target: bool,
    source: Option<CString>,
    fstype: Option<CString>,
    flags: libc::c_ulong,
    data: Option<CString>,
    /// Bind mounts ignore most flags on the first call; these are applied by a remount.
    remount_flags: Option<libc::c_ulong>,
    propagation: libc::c_ulong,
    /// Made `nodev` with everything below it: all mounts but devpts and binds of device
    /// nodes (see Device).
    nodev: bool,
    /// A tmpfs on /dev gets the standard device nodes.
    is_dev: bool,
}

/// A device in the container's /dev: the host's node, bind-mounted onto an empty file.
///
/// The container's /dev and its root are mounted `nodev`, so a node the container makes
/// itself (it holds CAP_MKNOD, as in Docker's defaults) cannot be opened. Only the nodes
/// silo binds in from the host work; this takes the place of a device cgroup, and works
/// the same on cgroup v1 and v2.
#[derive(Debug)]
struct Device {
    /// The name in the container's /dev.
    name: CString,
    /// The host's node.
    source: CString,
}

/// Everything the child needs, prepared before the clone so that the child allocates
/// nothing.
#[derive(Debug)]
pub struct Plan {
    rootfs: CString,
    readonly_root: bool,
    hostname: Option<CString>,
    mounts: Vec<MountOp>,
    devices: Vec<Device>,
    /// "dev", for opening /dev inside the root.
    dev_dir: CString,
    dev_links: Vec<(CString, CString)>,
    masked: Vec<CString>,
    readonly: Vec<CString>,
    sysctls: Vec<(CString, CString)>,
    /// Written to /proc/self/oom_score_adj, when the bundle sets it.
    oom_score_adj: Option<CString>,
    rlimits: Vec<(libc::c_int, libc::rlimit)>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    umask: libc::mode_t,
    cwd: CString,
    caps: Caps,
    last_cap: u8,
    no_new_privs: bool,
    seccomp: crate::seccomp::Filters,
    /// Paths to try, in order, for the entrypoint (PATH search happens here, not in libc).
    exec_candidates: Vec<CString>,
    /// The runtime's own binary (device, inode), which the container must never run.
    runtime_exe: (u64, u64),
    /// Owns the bytes `argv_ptrs` and `envp_ptrs` point into.
    #[allow(dead_code)]
    argv: Vec<CString>,
    #[allow(dead_code)]
    envp: Vec<CString>,
    /// NULL-terminated arrays of pointers into `argv` and `envp`, for execve. Kept as
    /// addresses so the plan stays Send; a CString's bytes never move when it does.
    argv_ptrs: Vec<usize>,
    envp_ptrs: Vec<usize>,
    clone_flags: u64,
    unshare_cgroup: bool,
    /// Namespaces joined by path: (fd, CLONE_NEW* type).
    joins: Vec<(OwnedFd, libc::c_int)>,
    /// What the descriptions of steps in error reports need.
    arg0: String,
    path_var: String,
}

impl Plan {
    /// Prepares the spawn of `process` from `bundle`.
    pub fn new(bundle: &Bundle, process: &Process) -> Result<Plan> {
        Plan::with_mounts(bundle, process, &[])
    }

    /// Like [`Plan::new`], with `extra` mounted after the bundle's own mounts: files the
    /// runtime provides, such as the container's /etc/resolv.conf.
    pub fn with_mounts(bundle: &Bundle, process: &Process, extra: &[Mount]) -> Result<Plan> {
        let spec = bundle.spec();
        let proc_spec = spec
            .process()
            .as_ref()
            .expect("bundle::check requires process");
        let linux = spec.linux().clone().unwrap_or_default();

        let mut clone_flags = 0u64;
        let mut unshare_cgroup = false;
        let mut joins = Vec::new();
        let mut has_mount_ns = false;
        let mut has_uts_ns = false;
        for (i, ns) in linux.namespaces().iter().flatten().enumerate() {
            let flag = ns.typ() as libc::c_int;
            if let Some(path) = ns.path() {
                let file = std::fs::File::open(path).map_err(|_| {
                    bundle.invalid(
                        format!("linux.namespaces[{i}].path"),
                        format!("cannot open {}", path.display()),
                    )
                })?;
                joins.push((OwnedFd::from(file), flag));
                has_uts_ns |= ns.typ() == LinuxNamespaceType::Uts;
                continue;
            }
            match ns.typ() {
                LinuxNamespaceType::Cgroup => unshare_cgroup = true,
                LinuxNamespaceType::Mount => {
                    has_mount_ns = true;
                    clone_flags |= flag as u64;
                }
                LinuxNamespaceType::Uts => {
                    has_uts_ns = true;
                    clone_flags |= flag as u64;
                }
                _ => clone_flags |= flag as u64,
            }
        }
        if !has_mount_ns {
            return Err(bundle
                .invalid("linux.namespaces", "a mount namespace is required")
                .into());
        }
        let hostname = match spec.hostname() {
            Some(h) if !h.is_empty() => {
                if !has_uts_ns {
                    return Err(bundle
                        .invalid("hostname", "setting it requires a uts namespace")
                        .into());
                }
                if h.len() > 64 {
                    return Err(bundle
                        .invalid(
                            "hostname",
                            format!("{h:?} is longer than the kernel's 64 bytes"),
                        )
                        .into());
                }
                Some(cstring("hostname", h)?)
            }
            _ => None,
        };

        let rootfs = bundle.rootfs();
        let mut spec_mounts = spec.mounts().clone().unwrap_or_default();
        spec_mounts.extend_from_slice(extra);
        let mounts = mount_ops(bundle, &spec_mounts)?;
        let has_dev_tmpfs = mounts.iter().any(|m| m.is_dev);
        let devices = if has_dev_tmpfs {
            devices(bundle)?
        } else {
            Vec::new()
        };
        let dev_links = if has_dev_tmpfs {
            [
                ("/proc/self/fd", "fd"),
                ("/proc/self/fd/0", "stdin"),
                ("/proc/self/fd/1", "stdout"),
                ("/proc/self/fd/2", "stderr"),
                ("pts/ptmx", "ptmx"),
            ]
            .iter()
            .map(|(target, link)| Ok((cstring("link", target)?, cstring("link", link)?)))
            .collect::<Result<_>>()?
        } else {
            Vec::new()
        };

        // A bundle that lists none gets silo's defaults; an empty list turns them off.
        let masked = match linux.masked_paths() {
            Some(paths) => paths.iter().map(String::as_str).collect(),
            None => DEFAULT_MASKED.to_vec(),
        }
        .into_iter()
        .map(|p| cstring("linux.maskedPaths", p))
        .collect::<Result<_>>()?;
        let readonly = match linux.readonly_paths() {
            Some(paths) => paths.iter().map(String::as_str).collect(),
            None => DEFAULT_READONLY.to_vec(),
        }
        .into_iter()
        .map(|p| cstring("linux.readonlyPaths", p))
        .collect::<Result<_>>()?;
        let mut sysctls = Vec::new();
        for (key, value) in linux.sysctl().iter().flatten() {
            if !is_namespaced_sysctl(key) {
                return Err(bundle
                    .invalid(format!("linux.sysctl.{key}"), "not a namespaced sysctl")
                    .into());
            }
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            sysctls.push((
                cstring("linux.sysctl", path)?,
                cstring("linux.sysctl", value)?,
            ));
        }

        let mut rlimits = Vec::new();
        for (i, rl) in proc_spec.rlimits().iter().flatten().enumerate() {
            let resource = rl.typ() as libc::c_int;
            let field = format!("process.rlimits[{i}] ({})", rl.typ());
            if rl.soft() > rl.hard() {
                let reason = format!("soft limit {} above hard limit {}", rl.soft(), rl.hard());
                return Err(bundle.invalid(field, reason).into());
            }
            let host = nix::sys::resource::getrlimit(rlimit_resource(resource))
                .map_err(|e| os(format!("read the host's {}", rl.typ()))(e.into()))?;
            if rl.hard() > host.1 {
                return Err(bundle
                    .invalid(
                        field,
                        format!(
                            "hard limit {} exceeds the host's hard limit {}",
                            rl.hard(),
                            host.1
                        ),
                    )
                    .into());
            }
            rlimits.push((
                resource,
                libc::rlimit {
                    rlim_cur: rl.soft(),
                    rlim_max: rl.hard(),
                },
            ));
        }

        let user = proc_spec.user();
        let mut groups: Vec<libc::gid_t> = user.additional_gids().clone().unwrap_or_default();
        if groups.is_empty() {
            groups.push(user.gid());
        }
        let caps = capabilities(bundle)?;
        let last_cap = caps::runtime::thread_all_supported()
            .iter()
            .map(|c| c.index())
            .max()
            .unwrap_or(40);

        let cwd = proc_spec.cwd();
        if !cwd.is_absolute() {
            return Err(bundle
                .invalid("process.cwd", format!("{} is not absolute", cwd.display()))
                .into());
        }

        let arg0 = process.args.first().cloned().unwrap_or_default();
        let path_var = process
            .env
            .iter()
            .find_map(|kv| kv.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .to_string();
        let exec_candidates = if arg0.contains('/') {
            vec![cstring("process.args[0]", &arg0)?]
        } else {
            path_var
                .split(':')
                .filter(|d| !d.is_empty())
                .map(|d| cstring("PATH", format!("{}/{arg0}", d.trim_end_matches('/'))))
                .collect::<Result<_>>()?
        };

        let seccomp = match linux.seccomp() {
            Some(profile) => crate::seccomp::from_profile(profile),
            None => crate::seccomp::default_filters(),
        }
        .map_err(|e| match e {
            crate::seccomp::Error::Invalid { field, reason } => {
                bundle.invalid(field, reason).into()
            }
            other => Error::Seccomp(other),
        })?;

        let argv: Vec<CString> = process
            .args
            .iter()
            .map(|a| cstring("process.args", a))
            .collect::<Result<_>>()?;
        let envp: Vec<CString> = process
            .env
            .iter()
            .map(|e| cstring("process.env", e))
            .collect::<Result<_>>()?;

        Ok(Plan {
            seccomp,
            rootfs: cstring("root.path", rootfs)?,
            readonly_root: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
            hostname,
            mounts,
            devices,
            dev_dir: c"dev".to_owned(),
            dev_links,
            masked,
            readonly,
            sysctls,
            oom_score_adj: proc_spec
                .oom_score_adj()
                .map(|v| cstring("process.oomScoreAdj", v.to_string()))
                .transpose()?,
            rlimits,
            uid: user.uid(),
            gid: user.gid(),
            groups,
            umask: user.umask().unwrap_or(0o022) as libc::mode_t,
            cwd: cstring("process.cwd", cwd)?,
            caps,
            last_cap,
            // On unless the bundle turns it off: setuid binaries in a tenant's image should
            // not gain privileges.
            no_new_privs: proc_spec.no_new_privileges().unwrap_or(true),
            exec_candidates,
            runtime_exe: runtime_exe()?,
            argv_ptrs: pointers(&argv),
            envp_ptrs: pointers(&envp),
            argv,
            envp,
            clone_flags,
            unshare_cgroup,
            joins,
            arg0,
            path_var,
        })
    }

    /// Whether the container gets a network namespace of its own (and so a veth pair).
    pub fn new_network(&self) -> bool {
        self.clone_flags & libc::CLONE_NEWNET as u64 != 0
    }

    /// Whether the container joins a network namespace given by path (one that CNI or
    /// Podman manages), whose addresses silo does not know.
    pub fn joins_network(&self) -> bool {
        self.joins.iter().any(|(_, t)| *t == libc::CLONE_NEWNET)
    }

    /// Whether the container has a pid namespace of its own, so that killing its init kills
    /// all of it.
    pub fn new_pid_ns(&self) -> bool {
        self.clone_flags & libc::CLONE_NEWPID as u64 != 0
    }

    /// Says in words which step a [`Report`] from the child is about.
    pub fn describe(&self, report: &Report) -> String {
        let err = std::io::Error::from_raw_os_error(report.errno);
        let idx = report.index as usize;
        let mount = |i: usize| {
            self.mounts
                .get(i)
                .map(|m| m.dest.display().to_string())
                .unwrap_or_default()
        };
        let lossy = |v: Option<&CString>| {
            v.map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        match Step::from(report.step) {
            Step::Exec if self.arg0.contains('/') => format!("exec {}: {err}", self.arg0),
            Step::Exec => format!(
                "exec {}: not found or not executable in PATH {} ({err})",
                self.arg0, self.path_var
            ),
            Step::Mount => format!("mount {}: {err}", mount(idx)),
            Step::MountTarget => format!("create mount point {}: {err}", mount(idx)),
            Step::Device => format!(
                "create device {}: {err}",
                lossy(self.devices.get(idx).map(|d| &d.name))
            ),
            Step::Mask => format!("mask {}: {err}", lossy(self.masked.get(idx))),
            Step::ReadOnly => format!("make {} read-only: {err}", lossy(self.readonly.get(idx))),
            Step::Sysctl => format!(
                "set sysctl {}: {err}",
                lossy(self.sysctls.get(idx).map(|s| &s.0))
            ),
            Step::Rlimit => format!("set process.rlimits[{idx}]: {err}"),
            Step::Chdir => format!(
                "change to working directory {}: {err}",
                lossy(Some(&self.cwd))
            ),
            Step::PivotRoot => format!("pivot_root into {}: {err}", lossy(Some(&self.rootfs))),
            Step::Capabilities => format!("set capabilities: {err}"),
            Step::Seccomp => format!("install seccomp filter {idx}: {err}"),
            Step::NullDevice => format!("check /dev/null before masking paths: {err}"),
            Step::OomScoreAdj => format!("set process.oomScoreAdj: {err}"),
            Step::RuntimeExe => format!(
                "exec {}: refusing to run the runtime's own binary in the container",
                self.arg0
            ),
            Step::Join => format!("join a namespace given by path: {err}"),
            Step::ExecFifo => format!("wait for start on the exec FIFO: {err}"),
            Step::Terminal => format!("set up the terminal for the console socket: {err}"),
            step => format!("{step:?}: {err}"),
        }
    }
}

/// The addresses of `strings`' bytes, NULL-terminated, as execve takes them.
fn pointers(strings: &[CString]) -> Vec<usize> {
    strings
        .iter()
        .map(|s| s.as_ptr() as usize)
        .chain(std::iter::once(0))
        .collect()
}

fn runtime_exe() -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/self/exe").map_err(os("stat the runtime's binary"))?;
    Ok((meta.dev(), meta.ino()))
}

/// The sysctls that are scoped to a namespace the container owns, as runc allows them.
fn is_namespaced_sysctl(key: &str) -> bool {
    matches!(
        key,
        "kernel.msgmax"
            | "kernel.msgmnb"
            | "kernel.msgmni"
            | "kernel.sem"
            | "kernel.shmall"
            | "kernel.shmmax"
            | "kernel.shmmni"
            | "kernel.shm_rmid_forced"
    ) || key.starts_with("fs.mqueue.")
        || key.starts_with("net.")
}

fn rlimit_resource(resource: libc::c_int) -> nix::sys::resource::Resource {
    use nix::sys::resource::Resource;
    // Resource is a C-like enum over the same RLIMIT_* numbers.
    [
        Resource::RLIMIT_AS,
        Resource::RLIMIT_CORE,
        Resource::RLIMIT_CPU,
        Resource::RLIMIT_DATA,
        Resource::RLIMIT_FSIZE,
        Resource::RLIMIT_LOCKS,
        Resource::RLIMIT_MEMLOCK,
        Resource::RLIMIT_MSGQUEUE,
        Resource::RLIMIT_NICE,
        Resource::RLIMIT_NOFILE,
        Resource::RLIMIT_NPROC,
        Resource::RLIMIT_RSS,
        Resource::RLIMIT_RTPRIO,
        Resource::RLIMIT_RTTIME,
        Resource::RLIMIT_SIGPENDING,
        Resource::RLIMIT_STACK,
    ]
    .into_iter()
    .find(|r| *r as libc::c_int == resource)
    .unwrap_or(Resource::RLIMIT_NOFILE)
}

fn capabilities(bundle: &Bundle) -> Result<Caps> {
    let spec_caps = bundle
        .spec()
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().clone());
    let Some(spec_caps) = spec_caps else {
        let mask = DEFAULT_CAPS.iter().fold(0, |m, c| m | c.bitmask());
        return Ok(Caps {
            bounding: mask,
            effective: mask,
            permitted: mask,
            ..Caps::default()
        });
    };
    let to_mask = |field: &str, set: &Option<oci_spec::runtime::Capabilities>| -> Result<u64> {
        let mut mask = 0;
        for cap in set.iter().flatten() {
            let name = cap.to_string();
            let name = if name.starts_with("CAP_") {
                name
            } else {
                format!("CAP_{name}")
            };
            let parsed: caps::Capability = name.parse().map_err(|_| {
                bundle.invalid(
                    format!("process.capabilities.{field}"),
                    format!("unknown capability {name}"),
                )
            })?;
            mask |= parsed.bitmask();
        }
        Ok(mask)
    };
    let caps = Caps {
        bounding: to_mask("bounding", spec_caps.bounding())?,
        effective: to_mask("effective", spec_caps.effective())?,
        permitted: to_mask("permitted", spec_caps.permitted())?,
        inheritable: to_mask("inheritable", spec_caps.inheritable())?,
        ambient: to_mask("ambient", spec_caps.ambient())?,
    };
    // A process can only keep capabilities it holds; name the first one silo lacks rather
    // than let capset fail in the child with a bare EPERM.
    let own = caps::read(None, caps::CapSet::Permitted).unwrap_or_default();
    let own_mask = own.iter().fold(0u64, |m, c| m | c.bitmask());
    for (field, mask) in [("permitted", caps.permitted), ("effective", caps.effective)] {
        let missing = mask & !own_mask;
        if missing != 0 {
            let cap = caps::all()
                .into_iter()
                .find(|c| missing & c.bitmask() != 0)
                .map(|c| c.to_string())
                .unwrap_or_default();
            return Err(bundle
                .invalid(
                    format!("process.capabilities.{field}"),
                    format!("{cap} is not held by silo itself, so it cannot grant it"),
                )
                .into());
        }
    }
    // The kernel raises an ambient capability only if it is permitted and inheritable.
    // Bundles written by `runc spec` list ambient ones without inheritable ones; like runc,
    // silo leaves those out rather than refusing to start.
    let ambient = caps.ambient & caps.permitted & caps.inheritable;
    if ambient != caps.ambient {
        tracing::debug!(
            dropped = format_args!("{:#x}", caps.ambient & !ambient),
            "ambient capabilities that are not also permitted and inheritable are left out"
        );
    }
    Ok(Caps { ambient, ..caps })
}

/// The standard mounts every container gets unless its bundle mounts something at the same
/// destination.
fn default_mounts() -> Vec<Mount> {
    let json = r#"[
      {"destination":"/proc","type":"proc","source":"proc",
       "options":["nosuid","noexec","nodev"]},
      {"destination":"/dev","type":"tmpfs","source":"tmpfs",
       "options":["nosuid","strictatime","mode=755","size=65536k"]},
      {"destination":"/dev/pts","type":"devpts","source":"devpts",
       "options":["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620"]},
      {"destination":"/dev/shm","type":"tmpfs","source":"shm",
       "options":["nosuid","noexec","nodev","mode=1777","size=65536k"]},
      {"destination":"/sys","type":"sysfs","source":"sysfs",
       "options":["nosuid","noexec","nodev","ro"]}
    ]"#;
    serde_json::from_str(json).expect("the default mounts are valid JSON")
}

fn mount_ops(bundle: &Bundle, spec_mounts: &[Mount]) -> Result<Vec<MountOp>> {
    let mut all: Vec<Mount> = Vec::new();
    for m in default_mounts() {
        if !spec_mounts
            .iter()
            .any(|s| s.destination() == m.destination())
        {
            all.push(m);
        }
    }
    // The defaults go first so that bundle mounts below /dev or /proc land on top of them.
    all.extend(spec_mounts.iter().cloned());

    let layout = crate::cgroup::Layout::detect();
    let mut ops = Vec::with_capacity(all.len());
    for (i, m) in all.iter().enumerate() {
        let field = format!("mounts[{i}]");
        let dest = m.destination().clone();
        let rel = relative(&dest).ok_or_else(|| {
            bundle.invalid(
                format!("{field}.destination"),
                format!("{} climbs out of the root filesystem", dest.display()),
            )
        })?;
        let mut fstype = m.typ().clone().unwrap_or_default();
        let mut flags: libc::c_ulong = 0;
        let mut clear: libc::c_ulong = 0;
        let mut propagation = 0;
        let mut data = Vec::new();
        let mut bind = fstype == "bind";
        for opt in m.options().iter().flatten() {
            let (set, unset) = match opt.as_str() {
                "ro" => (libc::MS_RDONLY, 0),
                "rw" => (0, libc::MS_RDONLY),
                "nosuid" => (libc::MS_NOSUID, 0),
                "suid" => (0, libc::MS_NOSUID),
                "nodev" => (libc::MS_NODEV, 0),
                "dev" => (0, libc::MS_NODEV),
                "noexec" => (libc::MS_NOEXEC, 0),
                "exec" => (0, libc::MS_NOEXEC),
                "sync" => (libc::MS_SYNCHRONOUS, 0),
                "async" => (0, libc::MS_SYNCHRONOUS),
                "dirsync" => (libc::MS_DIRSYNC, 0),
                "mand" => (libc::MS_MANDLOCK, 0),
                "nomand" => (0, libc::MS_MANDLOCK),
                "atime" => (0, libc::MS_NOATIME),
                "noatime" => (libc::MS_NOATIME, 0),
                "diratime" => (0, libc::MS_NODIRATIME),
                "nodiratime" => (libc::MS_NODIRATIME, 0),
                "relatime" => (libc::MS_RELATIME, 0),
                "norelatime" => (0, libc::MS_RELATIME),
                "strictatime" => (libc::MS_STRICTATIME, 0),
                "nostrictatime" => (0, libc::MS_STRICTATIME),
                "bind" => {
                    bind = true;
                    (libc::MS_BIND, 0)
                }
                "rbind" => {
                    bind = true;
                    (libc::MS_BIND | libc::MS_REC, 0)
                }
                "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave"
                | "unbindable" | "runbindable" => {
                    let base = match opt.trim_start_matches('r') {
                        "private" => libc::MS_PRIVATE,
                        "shared" => libc::MS_SHARED,
                        "slave" => libc::MS_SLAVE,
                        _ => libc::MS_UNBINDABLE,
                    };
                    let rec = if opt.starts_with('r') {
                        libc::MS_REC
                    } else {
                        0
                    };
                    propagation = base | rec;
                    (0, 0)
                }
                "tmpcopyup" | "idmap" | "ridmap" | "remount" => {
                    return Err(bundle
                        .invalid(
                            format!("{field}.options"),
                            format!("{opt} is not supported"),
                        )
                        .into());
                }
                other => {
                    data.push(other.to_string());
                    (0, 0)
                }
            };
            flags |= set;
            clear |= unset;
        }
        flags &= !clear;

        let source = m.source().clone();
        let mut file_target = false;
        let mut device_bind = false;
        if bind {
            flags |= libc::MS_BIND;
            let src = source.clone().ok_or_else(|| {
                bundle.invalid(format!("{field}.source"), "a bind mount needs a source")
            })?;
            let src = if src.is_absolute() {
                src
            } else {
                bundle.dir().join(src)
            };
            let meta = std::fs::metadata(&src).map_err(|_| {
                bundle.invalid(
                    format!("{field}.source"),
                    format!("{} does not exist", src.display()),
                )
            })?;
            file_target = !meta.is_dir();
            use std::os::unix::fs::FileTypeExt;
            device_bind = meta.file_type().is_char_device() || meta.file_type().is_block_device();
            fstype = String::new();
        }
        if fstype == "cgroup" || fstype == "cgroup2" {
            // A cgroup2 mount shows the container's own subtree thanks to its cgroup
            // namespace. On v1 hosts there is no single hierarchy to show: the container
            // gets an empty read-only tmpfs there, as tools treat a missing tree as "no
            // limits to discover".
            // TODO: mount the v1 controllers one by one below a tmpfs, as runc does.
            match layout {
                crate::cgroup::Layout::V2 => fstype = "cgroup2".into(),
                crate::cgroup::Layout::V1 => {
                    fstype = "tmpfs".into();
                    flags |= libc::MS_RDONLY;
                    data.clear();
                }
            }
        }
        let resolved_source = match (&source, bind) {
            (Some(s), true) if !s.is_absolute() => Some(bundle.dir().join(s)),
            (s, _) => s.clone(),
        };
        // A bind mount takes its flags only from a second, remounting call.
        let remount_flags = (bind
            && flags & (libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC) != 0)
            .then_some(
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | (flags
                        & (libc::MS_RDONLY
                            | libc::MS_NOSUID
                            | libc::MS_NODEV
                            | libc::MS_NOEXEC
                            | libc::MS_NOATIME
                            | libc::MS_NODIRATIME
                            | libc::MS_RELATIME
                            | libc::MS_STRICTATIME)),
            );
        if bind {
            flags &= libc::MS_BIND | libc::MS_REC;
        }
        let mut parents = Vec::new();
        let mut prefix = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for comp in &comps {
            parents.push((
                cstring("mount", &prefix)?,
                cstring("mount", comp.as_os_str())?,
            ));
            prefix.push(comp.as_os_str());
        }
        let is_dev = dest == Path::new("/dev") && fstype == "tmpfs";
        if is_dev {
            // Nodes made there cannot be opened; see Device.
            flags |= libc::MS_NODEV;
        }
        ops.push(MountOp {
            is_dev,
            rel: cstring("mount", &rel)?,
            parents,
            dest,
            file_target,
            source: resolved_source
                .map(|s| cstring("mount source", s))
                .transpose()?,
            fstype: (!fstype.is_empty())
                .then(|| cstring("mount type", &fstype))
                .transpose()?,
            flags,
            data: (!data.is_empty())
                .then(|| cstring("mount options", data.join(",")))
                .transpose()?,
            remount_flags,
            propagation,
            nodev: !device_bind && fstype != "devpts",
        });
    }
    Ok(ops)
}

/// `dest` without its root, refusing `..` that would climb above the root filesystem.
fn relative(dest: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for comp in dest.components() {
        match comp {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(c) => out.push(c),
            Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// The standard devices every container gets.
const STANDARD_DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn devices(bundle: &Bundle) -> Result<Vec<Device>> {
    let host_node = |field: &str, path: &Path, kind, major, minor| -> Result<CString> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path).map_err(|_| {
            bundle.invalid(field, format!("the host has no device {}", path.display()))
        })?;
        let is_kind = match kind {
            libc::S_IFBLK => meta.file_type().is_block_device(),
            _ => meta.file_type().is_char_device(),
        };
        if !is_kind || meta.rdev() != libc::makedev(major, minor) {
            return Err(bundle
                .invalid(
                    field,
                    format!(
                        "{} on the host is not device {major}:{minor}",
                        path.display()
                    ),
                )
                .into());
        }
        cstring("device", path)
    };
    let mut out = Vec::new();
    for (name, major, minor) in STANDARD_DEVICES {
        let source = Path::new("/dev").join(name);
        out.push(Device {
            name: cstring("device", name)?,
            source: host_node("devices", &source, libc::S_IFCHR, *major, *minor)?,
        });
    }
    let linux = bundle.spec().linux().clone().unwrap_or_default();
    for (i, d) in linux.devices().iter().flatten().enumerate() {
        let field = format!("linux.devices[{i}]");
        let rel = relative(d.path())
            .filter(|r| r.starts_with("dev") && r.components().count() == 2)
            .ok_or_else(|| {
                bundle.invalid(
                    format!("{field}.path"),
                    format!("{} is not directly below /dev", d.path().display()),
                )
            })?;
        use oci_spec::runtime::LinuxDeviceType as T;
        let kind = match d.typ() {
            T::C | T::U => libc::S_IFCHR,
            T::B => libc::S_IFBLK,
            T::P | T::A => {
                return Err(bundle
                    .invalid(
                        format!("{field}.type"),
                        "only c, u and b devices can be made",
                    )
                    .into());
            }
        };
        // The node comes from the host, at the same path: silo makes no nodes of its own.
        let (major, minor) = (d.major() as u32, d.minor() as u32);
        let source = host_node(&field, d.path(), kind, major, minor)?;
        let name = rel.file_name().expect("two components").to_os_string();
        out.retain(|existing| existing.name.as_bytes() != name.as_bytes());
        out.push(Device {
            name: cstring("device", &name)?,
            source,
        });
    }
    Ok(out)
}

/// What the child reports when a step fails: which step, which item of that step, errno.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    pub step: u32,
    pub index: u32,
    pub errno: i32,
}

impl Report {
    const SIZE: usize = std::mem::size_of::<Report>();

    /// Reads a report from the error pipe, if the child wrote one. The child has exited by
    /// the time this is called, so the read does not block on it; the pipe is non-blocking
    /// in case another container's child still holds an inherited copy of the write end.
    pub fn read(fd: BorrowedFd<'_>) -> Option<Report> {
        let mut report = Report::default();
        // SAFETY: reads at most SIZE bytes into a plain repr(C) struct of integers, for
        // which every bit pattern is valid.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&mut report as *mut Report).cast(),
                Report::SIZE,
            )
        };
        (n == Report::SIZE as isize).then_some(report)
    }
}

/// The steps of [`child`], numbered for [`Report::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    Unknown = 0,
    Wait,
    Join,
    CgroupNs,
    Hostname,
    Propagation,
    BindRoot,
    OpenRoot,
    MountTarget,
    Mount,
    Device,
    PivotRoot,
    Mask,
    ReadOnly,
    Sysctl,
    RemountRoot,
    Setsid,
    Rlimit,
    Groups,
    Gid,
    Uid,
    Capabilities,
    NoNewPrivs,
    Chdir,
    Stdio,
    Exec,
    Seccomp,
    NullDevice,
    RuntimeExe,
    OomScoreAdj,
    ExecFifo,
    Terminal,
}

impl From<u32> for Step {
    fn from(n: u32) -> Step {
        const ALL: [Step; 32] = [
            Step::Unknown,
            Step::Wait,
            Step::Join,
            Step::CgroupNs,
            Step::Hostname,
            Step::Propagation,
            Step::BindRoot,
            Step::OpenRoot,
            Step::MountTarget,
            Step::Mount,
            Step::Device,
            Step::PivotRoot,
            Step::Mask,
            Step::ReadOnly,
            Step::Sysctl,
            Step::RemountRoot,
            Step::Setsid,
            Step::Rlimit,
            Step::Groups,
            Step::Gid,
            Step::Uid,
            Step::Capabilities,
            Step::NoNewPrivs,
            Step::Chdir,
            Step::Stdio,
            Step::Exec,
            Step::Seccomp,
            Step::NullDevice,
            Step::RuntimeExe,
            Step::OomScoreAdj,
            Step::ExecFifo,
            Step::Terminal,
        ];
        ALL.get(n as usize).copied().unwrap_or(Step::Unknown)
    }
}

/// A cloned init process waiting for [`Child::release`], and its keeper.
#[derive(Debug)]
pub struct Child {
    pub pid: u32,
    /// The init's pidfd, opened by the runtime (the init is the keeper's child).
    pub pidfd: OwnedFd,
    pub keeper_pid: u32,
    /// The keeper's pidfd; the keeper is the runtime's child, to be reaped once it exits.
    pub keeper: OwnedFd,
    /// To be kept until the keeper has exited; taken with [`Child::take_keeper_stack`].
    keeper_stack: Option<KeeperStack>,
    /// Read end of the error pipe (non-blocking).
    pub errors: OwnedFd,
    go: OwnedFd,
}

impl Child {
    /// Lets the child go on from its cgroup and network being ready to exec.
    pub fn release(self) -> Result<Released> {
        // SAFETY: writes one byte from a live stack variable to a pipe we own.
        let n = unsafe { libc::write(self.go.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        if n != 1 {
            return Err(os("release the container's init")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Released {
            pidfd: self.pidfd,
            keeper: self.keeper,
            errors: self.errors,
        })
    }

    /// The keeper's stack, for the caller to drop once the keeper has exited.
    pub fn take_keeper_stack(&mut self) -> Option<KeeperStack> {
        self.keeper_stack.take()
    }
}

/// What the runtime keeps of a released init.
#[derive(Debug)]
pub struct Released {
    pub pidfd: OwnedFd,
    pub keeper: OwnedFd,
    pub errors: OwnedFd,
}

/// The keeper's stack, mapped in the runtime's memory, which the keeper shares. It stays
/// mapped while the keeper may run: dropped before the keeper has exited, it is leaked
/// rather than pulled from under it. (If the runtime dies first, the memory lives on with
/// the keeper.)
#[derive(Debug)]
pub struct KeeperStack {
    base: *mut libc::c_void,
    /// The keeper's pidfd, readable once it has exited.
    keeper: Option<OwnedFd>,
}

// SAFETY: the mapping is owned by this value alone; the pointer is only unmapped on drop.
unsafe impl Send for KeeperStack {}
// SAFETY: as above; nothing reads or writes through it from the runtime's side.
unsafe impl Sync for KeeperStack {}

impl KeeperStack {
    /// Room for the keeper and for the init's setup (the init starts on a copy of it); only
    /// the pages touched cost memory.
    const SIZE: usize = 256 << 10;
    const GUARD: usize = 4096;

    fn new() -> Result<KeeperStack> {
        // SAFETY: a fresh anonymous mapping, not yet used by anything.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(os("map the keeper's stack")(std::io::Error::last_os_error()));
        }
        let stack = KeeperStack { base, keeper: None };
        // A guard page at the bottom turns an overflow into a fault, not a corruption.
        // SAFETY: the lowest page of the mapping made above.
        if unsafe { libc::mprotect(base, Self::GUARD, libc::PROT_NONE) } != 0 {
            return Err(os("guard the keeper's stack")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(stack)
    }

    /// The initial stack pointer: the stack grows down from the end of the mapping.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which clone takes as the stack's top.
        unsafe { self.base.cast::<u8>().add(Self::SIZE).cast() }
    }
}

impl Drop for KeeperStack {
    fn drop(&mut self) {
        if let Some(keeper) = &self.keeper {
            let mut fds = [nix::poll::PollFd::new(
                keeper.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let exited = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) == Ok(1);
            if !exited {
                tracing::warn!("the keeper still runs: leaving its stack mapped");
                return;
            }
        }
        // SAFETY: our own mapping, which no keeper runs on any more.
        unsafe { libc::munmap(self.base, Self::SIZE) };
    }
}

/// What the keeper holds for the runtime besides the init.
pub struct Keep<'a> {
    /// The container's exit record file, which the keeper overwrites when the init exits.
    /// It must already hold a whole (pending) record, so that the write needs no new space.
    pub exit_record: BorrowedFd<'a>,
    /// The log pipe's read end, kept open for a later runtime to take over.
    pub log: Option<BorrowedFd<'a>>,
    /// The container's state directory, where the keeper appends what is left in the log
    /// pipe when the init exits while no runtime reads it.
    pub state_dir: BorrowedFd<'a>,
}

/// Makes a pipe whose ends are close-on-exec and numbered 3 or above, so that moving the
/// child's stdio into place can never overwrite them.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| os("create a pipe")(e.into()))?;
    Ok((above_stdio(r)?, above_stdio(w)?))
}

fn above_stdio(fd: OwnedFd) -> Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new descriptor or -1.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(os("duplicate a descriptor")(std::io::Error::last_os_error()));
    }
    // SAFETY: `new` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Clones the keeper, which clones the init process into its new namespaces and (on cgroup
/// v2) straight into the cgroup `cgroup_dir`. The init stops before doing anything until
/// released.
pub fn spawn(
    plan: &Plan,
    output: &Output,
    cgroup_dir: Option<BorrowedFd<'_>>,
    keep: &Keep<'_>,
) -> Result<Child> {
    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (info_r, info_w) = pipe()?;
    let (ack_r, ack_w) = pipe()?;
    nix::fcntl::fcntl(
        &err_r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| os("configure the error pipe")(e.into()))?;
    let null = std::fs::File::open("/dev/null").map_err(os("open /dev/null"))?;
    let null = above_stdio(null.into())?;
    let out_fd: RawFd = match output {
        Output::Inherit => -1,
        Output::Fd(fd) => fd.as_raw_fd(),
    };
    let fds = ChildFds {
        go: go_r.as_raw_fd(),
        err: err_w.as_raw_fd(),
        stdin: null.as_raw_fd(),
        out: out_fd,
        ready: -1,
        fifo: -1,
        preserve: 0,
        console: -1,
        hold_before_pivot: false,
    };
    let keeper_fds = KeeperFds {
        info: info_w.as_raw_fd(),
        ack: ack_r.as_raw_fd(),
        exit: keep.exit_record.as_raw_fd(),
        log: keep.log.map_or(-1, |fd| fd.as_raw_fd()),
        cgroup: cgroup_dir.map_or(-1, |fd| fd.as_raw_fd()),
        state_dir: keep.state_dir.as_raw_fd(),
        runtime: std::process::id() as i32,
    };

    if plan.joins.len() > MAX_JOINS {
        return Err(os("join the bundle's namespaces")(
            std::io::Error::from_raw_os_error(libc::E2BIG),
        ));
    }
    let stack = KeeperStack::new()?;
    let start = KeeperStart {
        plan,
        fds,
        k: keeper_fds,
    };
    let mut pidfd: libc::c_int = -1;
    // SAFETY: glibc's clone runs `keeper_main(&start)` on `stack`, in a new process that
    // shares our memory. `start` and `plan` outlive its use of them: we block below until
    // it reports, and it copies what it needs before reporting. The stack stays mapped
    // until the keeper is reaped (see KeeperStack).
    let ret = unsafe {
        libc::clone(
            keeper_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_PIDFD | libc::SIGCHLD,
            (&start as *const KeeperStart<'_>).cast_mut().cast(),
            &mut pidfd as *mut libc::c_int,
        )
    };
    if ret < 0 {
        return Err(os("clone the container's keeper process")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: clone stored a new pidfd that nothing else owns.
    let keeper_pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut stack = stack;
    stack.keeper = keeper_pidfd.try_clone().ok();
    let keeper_pid = ret as u32;
    // The child's ends close here, in the parent only, so that the init sees the end of
    // `go` and the keeper the end of `ack` if we die.
    drop((go_r, err_w, null, info_w, ack_r));

    let init = read_init_pid(&info_r).and_then(|pid| {
        let pidfd = pidfd_open(pid).map_err(os(format!("open a pidfd for init {pid}")))?;
        Ok((pid, pidfd))
    });
    let (pid, pidfd) = match init {
        Ok(init) => init,
        Err(e) => {
            // Without `go` the init (if any) exits at once, and the keeper after it.
            drop(go_w);
            reap_blocking(&keeper_pidfd);
            return Err(e);
        }
    };
    // Only now may the keeper reap the init: its pid cannot have been reused before our
    // pidfd pinned it.
    drop(ack_w);
    Ok(Child {
        pid,
        pidfd,
        keeper_pid,
        keeper: keeper_pidfd,
        keeper_stack: Some(stack),
        errors: err_r,
        go: go_w,
    })
}

/// What a direct init needs besides its plan (see [`spawn_direct`]).
#[derive(Debug, Clone, Copy)]
pub struct Direct<'a> {
    /// The exec FIFO, opened `O_PATH`: the init opens it for writing once its setup is
    /// done, which blocks until `start` opens it for reading.
    pub exec_fifo: BorrowedFd<'a>,
    /// Descriptors 3 and up passed to the container as they are (runc's `--preserve-fds`
    /// and `LISTEN_FDS`).
    pub preserve_fds: u32,
    /// A connected socket (runc's `--console-socket`): the init makes a terminal in the
    /// container's /dev/pts, sends its master there, and takes the other end as its stdio
    /// and controlling terminal.
    pub console: Option<BorrowedFd<'a>>,
    /// Stop once more when the mounts are done, before the root is switched (for the
    /// createContainer hooks).
    pub hold_before_pivot: bool,
}

/// How far a direct init got when [`Created::go_on`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Its mounts are done and it waits to switch its root (with `hold_before_pivot`).
    Mounted,
    /// Its setup is done and it waits on the exec FIFO.
    Ready,
}

/// An init cloned by [`spawn_direct`], waiting for [`Created::go_on`].
#[derive(Debug)]
pub struct Created {
    pub pid: u32,
    pub pidfd: OwnedFd,
    go: OwnedFd,
    ready: OwnedFd,
    errors: OwnedFd,
}

impl Created {
    /// Lets the init go on with its setup, and waits until it stops at the next stage. On a
    /// failed setup, the child's report (if it wrote one); the child is reaped then.
    pub fn go_on(&self) -> std::result::Result<Stage, Option<Report>> {
        // SAFETY: writes one byte from a live stack variable to a pipe we own.
        let n = unsafe { libc::write(self.go.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        if n != 1 {
            return Err(None);
        }
        let mut byte = [0u8; 1];
        let n = loop {
            match nix::unistd::read(&self.ready, &mut byte) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        };
        match (n, byte[0]) {
            (Ok(1), MOUNTED) => return Ok(Stage::Mounted),
            (Ok(1), _) => return Ok(Stage::Ready),
            _ => {}
        }
        // The ready pipe ended without a byte: the child failed, and wrote its report
        // before exiting. Reap it, as its parent.
        let report = Report::read(self.errors.as_fd());
        reap_blocking(&self.pidfd);
        Err(report)
    }
}

/// Clones the init as a child of the calling process, with no keeper, inheriting its
/// stdio: runc's `create`, whose caller reaps the init after we exit. The init waits first
/// for [`Created::go_on`] (for the caller to put it in its cgroup on v1), then sets up
/// the container and waits on `direct.exec_fifo` before its exec.
///
/// The caller must be single-threaded or otherwise hold no lock the child could need:
/// the child allocates nothing, as the module comment says. A pid namespace the bundle
/// names by path becomes the caller's namespace for its later children too.
pub fn spawn_direct(
    plan: &Plan,
    cgroup_dir: Option<BorrowedFd<'_>>,
    direct: &Direct<'_>,
) -> Result<Created> {
    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    nix::fcntl::fcntl(
        &err_r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| os("configure the error pipe")(e.into()))?;
    let fds = ChildFds {
        go: go_r.as_raw_fd(),
        err: err_w.as_raw_fd(),
        stdin: -1,
        out: -1,
        ready: ready_w.as_raw_fd(),
        fifo: direct.exec_fifo.as_raw_fd(),
        preserve: direct.preserve_fds,
        console: direct.console.map_or(-1, |fd| fd.as_raw_fd()),
        hold_before_pivot: direct.hold_before_pivot,
    };
    // Joining a pid namespace places the joiner's later children in it, not the joiner:
    // so the caller (about to exit) joins it, and the init is born inside.
    for (fd, _) in plan.joins.iter().filter(|(_, t)| *t == libc::CLONE_NEWPID) {
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWPID)
            .map_err(|e| os("join the pid namespace given by path")(e.into()))?;
    }
    let mut pidfd: libc::c_int = -1;
    let cgroup = cgroup_dir.map_or(-1, |fd| fd.as_raw_fd());
    // SAFETY: the child runs only `child`, under the discipline the caller upholds.
    let pid = unsafe { clone_init(plan, &fds, cgroup, &mut pidfd) }.map_err(|errno| {
        os("clone the container's init process")(std::io::Error::from_raw_os_error(errno))
    })?;
    // The child's ends close here, so that the init sees the end of `go` if we die, and we
    // the end of `ready` if it does.
    drop((go_r, err_w, ready_w));
    Ok(Created {
        pid,
        // SAFETY: clone3 stored a new pidfd that nothing else owns.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        go: go_w,
        ready: ready_r,
        errors: err_r,
    })
}

/// A process cloned by [`spawn_exec`] into a running container, waiting for
/// [`Joined::release`].
#[derive(Debug)]
pub struct Joined {
    pub pid: u32,
    pub pidfd: OwnedFd,
    go: OwnedFd,
    errors: OwnedFd,
}

impl Joined {
    /// Lets the process exec, and returns once it has, or with its report once it failed.
    pub fn release(self) -> std::result::Result<OwnedFd, Option<Report>> {
        // SAFETY: writes one byte from a live stack variable to a pipe we own.
        let n = unsafe { libc::write(self.go.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        if n != 1 {
            return Err(None);
        }
        // The error pipe is close-on-exec and blocking: it ends empty at the exec, or
        // holds the report of the step that failed.
        match Report::read(self.errors.as_fd()) {
            None => Ok(self.pidfd),
            Some(report) => {
                reap_blocking(&self.pidfd);
                Err(Some(report))
            }
        }
    }
}

/// Clones a process into the namespaces `namespaces` (CLONE_NEW* flags) of the running
/// init behind `init` and into its cgroup, to exec `plan`'s process there with the
/// caller's stdio, or on a new terminal whose master goes to `console`: runc's `exec`.
///
/// Joining a pid namespace takes effect for children only, so a short-lived *joiner*
/// clone joins, then clones the process with CLONE_PARENT, which makes it the caller's
/// child: the caller can wait for it, or exit and leave it to its subreaper.
pub fn spawn_exec(
    plan: &Plan,
    init: BorrowedFd<'_>,
    namespaces: libc::c_int,
    cgroup_dir: Option<BorrowedFd<'_>>,
    preserve_fds: u32,
    console: Option<BorrowedFd<'_>>,
) -> Result<Joined> {
    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (info_r, info_w) = pipe()?;
    let fds = ChildFds {
        go: go_r.as_raw_fd(),
        err: err_w.as_raw_fd(),
        stdin: -1,
        out: -1,
        ready: -1,
        fifo: -1,
        preserve: preserve_fds,
        console: console.map_or(-1, |fd| fd.as_raw_fd()),
        hold_before_pivot: false,
    };
    let join = JoinFds {
        init: init.as_raw_fd(),
        namespaces,
        cgroup: cgroup_dir.map_or(-1, |fd| fd.as_raw_fd()),
        info: info_w.as_raw_fd(),
    };
    let mut pidfd: libc::c_int = -1;
    // SAFETY: clone_args is a plain C struct; all-zero is its documented default.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = libc::CLONE_PIDFD as u64;
    args.pidfd = &mut pidfd as *mut libc::c_int as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    // SAFETY: as in `spawn`; the joiner runs only `joiner`, which never returns.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if ret == 0 {
        // SAFETY: we are the freshly cloned joiner.
        unsafe { joiner(plan, &fds, &join) }
    }
    if ret < 0 {
        return Err(os("clone a process to join the container")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: clone3 stored a new pidfd that nothing else owns.
    let joiner_pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((go_r, err_w, info_w));
    let pid = read_init_pid(&info_r);
    reap_blocking(&joiner_pidfd);
    let pid = pid.map_err(|e| match e {
        Error::Os { source, .. } => os("join the container's namespaces")(source),
        other => other,
    })?;
    // Our child, waiting for `go`: its pid cannot be reused before we reap it.
    let pidfd = pidfd_open(pid).map_err(os(format!("open a pidfd for process {pid}")))?;
    Ok(Joined {
        pid,
        pidfd,
        go: go_w,
        errors: err_r,
    })
}

/// What the joiner of [`spawn_exec`] needs besides the process's descriptors.
struct JoinFds {
    init: RawFd,
    namespaces: libc::c_int,
    cgroup: RawFd,
    info: RawFd,
}

/// The joiner: joins the container's namespaces, clones the process as its parent's
/// child, reports its pid (or the failing errno, negated) and exits.
///
/// # Safety
/// Must only run in the joiner cloned by [`spawn_exec`], once.
unsafe fn joiner(plan: &Plan, fds: &ChildFds, j: &JoinFds) -> ! {
    // SAFETY: raw syscalls on the plan, the descriptors and the stack only.
    unsafe {
        close_all_but(plan, fds, &[j.init, j.cgroup, j.info]);
        let word: i32 = if libc::setns(j.init, j.namespaces) != 0 {
            -*libc::__errno_location()
        } else {
            let mut args: libc::clone_args = std::mem::zeroed();
            args.flags = libc::CLONE_PARENT as u64;
            if j.cgroup >= 0 {
                args.flags |= CLONE_INTO_CGROUP;
                args.cgroup = j.cgroup as u64;
            }
            let ret = libc::syscall(
                libc::SYS_clone3,
                &args as *const libc::clone_args,
                std::mem::size_of::<libc::clone_args>(),
            );
            if ret == 0 {
                libc::close(j.info);
                libc::close(j.init);
                let mut byte = 0u8;
                if libc::read(fds.go, (&mut byte as *mut u8).cast(), 1) != 1 {
                    libc::_exit(127);
                }
                enter(plan, fds)
            }
            if ret < 0 {
                -*libc::__errno_location()
            } else {
                ret as i32
            }
        };
        libc::write(j.info, (&word as *const i32).cast(), 4);
        libc::_exit(0)
    }
}

/// What the keeper reports right after cloning the init: its pid, or the clone's errno.
fn read_init_pid(info: &OwnedFd) -> Result<u32> {
    let mut word = [0u8; 4];
    // SAFETY: reads at most 4 bytes into a live stack buffer.
    let n = unsafe { libc::read(info.as_raw_fd(), word.as_mut_ptr().cast(), word.len()) };
    if n != 4 {
        return Err(os("hear from the container's keeper process")(
            std::io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    match i32::from_ne_bytes(word) {
        pid if pid > 0 => Ok(pid as u32),
        errno => Err(os("clone the container's init process")(
            std::io::Error::from_raw_os_error(-errno),
        )),
    }
}

/// A pidfd for `pid`, which must be a process that cannot be reaped meanwhile.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Waits for a child of ours that is about to exit, and reaps it.
fn reap_blocking(pidfd: &OwnedFd) {
    let _ = crate::monitor::wait_blocking(pidfd.as_fd());
}

/// One of each kind of namespace at most.
const MAX_JOINS: usize = 8;

/// Not in every libc release yet; the value is fixed by the kernel ABI.
const CLONE_INTO_CGROUP: u64 = 0x200000000;

#[derive(Clone, Copy)]
struct ChildFds {
    go: RawFd,
    err: RawFd,
    /// -1 to keep the inherited stdin.
    stdin: RawFd,
    /// -1 to keep the inherited stdout and stderr.
    out: RawFd,
    /// Where a direct init says its setup is done (-1: not a direct init).
    ready: RawFd,
    /// The exec FIFO, opened `O_PATH`, that a direct init waits on (-1: none).
    fifo: RawFd,
    /// Descriptors 3 to 3+preserve-1 go to the container as they are.
    preserve: u32,
    /// A socket to send the master of a new terminal to, which becomes the process's
    /// stdio and controlling terminal (-1: none).
    console: RawFd,
    /// Say [`MOUNTED`] on `ready` and wait on `go` once more before the root is switched.
    hold_before_pivot: bool,
}

/// What a direct init says on its ready pipe: its mounts are done (when held there).
const MOUNTED: u8 = 2;
/// Its whole setup is done; it waits on the exec FIFO.
const READY: u8 = 1;

/// The keeper's own descriptors (-1: none).
#[derive(Clone, Copy)]
struct KeeperFds {
    /// Where it reports the init's pid.
    info: RawFd,
    /// Ends (closed by the runtime) once the runtime holds the init's pidfd.
    ack: RawFd,
    exit: RawFd,
    log: RawFd,
    cgroup: RawFd,
    state_dir: RawFd,
    /// The runtime's pid: while it is the keeper's parent, the runtime reads the log pipe.
    runtime: i32,
}

/// A fixed buffer for "/proc/self/fd/N", formatted without allocating.
struct FdPath([u8; 32]);

impl FdPath {
    fn new(fd: RawFd) -> FdPath {
        let mut buf = [0u8; 32];
        let prefix = b"/proc/self/fd/";
        buf[..prefix.len()].copy_from_slice(prefix);
        let mut digits = [0u8; 12];
        let mut n = fd.max(0) as u32;
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for i in 0..len {
            buf[prefix.len() + i] = digits[len - 1 - i];
        }
        FdPath(buf)
    }

    fn as_ptr(&self) -> *const libc::c_char {
        self.0.as_ptr().cast()
    }
}

/// Fails the child: reports `step` to the parent and exits.
///
/// # Safety
/// Only for the cloned child.
unsafe fn fail(fds: &ChildFds, step: Step, index: usize) -> ! {
    let report = Report {
        step: step as u32,
        index: index as u32,
        // SAFETY: __errno_location returns the calling thread's errno slot.
        errno: unsafe { *libc::__errno_location() },
    };
    // SAFETY: writes a plain struct to our error pipe, then exits without running any of
    // the parent's atexit handlers or destructors.
    unsafe {
        libc::write(fds.err, (&report as *const Report).cast(), Report::SIZE);
        libc::_exit(127)
    }
}

/// Opens `rel` inside the root filesystem `root`, never resolving a path outside it: `..`
/// and symlinks (absolute ones included) resolve as if `root` were `/`.
///
/// # Safety
/// `rel` must be a valid C string.
unsafe fn open_in_root(root: RawFd, rel: &CString, flags: u64) -> RawFd {
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags | libc::O_CLOEXEC as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid C string and a properly sized open_how.
    unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        ) as RawFd
    }
}

/// Opens the mount point of `op`, making it (and its missing parents) first if needed.
///
/// # Safety
/// Only for the cloned child.
unsafe fn mount_target(root: RawFd, op: &MountOp) -> RawFd {
    // Symlinks are followed, but only ever inside the root (see open_in_root).
    let path_flags = libc::O_PATH as u64;
    // SAFETY: every C string comes from the plan; the fds are ours.
    unsafe {
        let fd = open_in_root(root, &op.rel, path_flags);
        if fd >= 0 {
            return fd;
        }
        for (i, (parent, name)) in op.parents.iter().enumerate() {
            let last = i + 1 == op.parents.len();
            let dir = if parent.as_bytes().is_empty() {
                libc::dup(root)
            } else {
                open_in_root(root, parent, (libc::O_PATH | libc::O_DIRECTORY) as u64)
            };
            if dir < 0 {
                return -1;
            }
            let made = if last && op.file_target {
                let f = libc::openat(
                    dir,
                    name.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o644,
                );
                if f >= 0 {
                    libc::close(f);
                }
                f
            } else {
                libc::mkdirat(dir, name.as_ptr(), 0o755)
            };
            let errno = *libc::__errno_location();
            libc::close(dir);
            if made < 0 && errno != libc::EEXIST {
                *libc::__errno_location() = errno;
                return -1;
            }
        }
        open_in_root(root, &op.rel, path_flags)
    }
}

fn opt_ptr(s: &Option<CString>) -> *const libc::c_char {
    s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// The cloned child: sets up the container and execs its entrypoint, or reports the step
/// that failed. Allocation-free by design (see the module comment).
///
/// # Safety
/// Must only run in the child of `clone3`, once.
unsafe fn child(plan: &Plan, fds: &ChildFds) -> ! {
    // SAFETY: everything below is a raw syscall on memory the plan owns or on the stack.
    unsafe {
        // We hold a copy of every descriptor the runtime had at the clone, including pipes
        // other threads are reading to their end (a helper command's output, say). Keeping
        // those while we wait below would stall their readers, and they may be what our
        // release waits for. So drop all but our own at once.
        close_all_but(plan, fds, &[]);

        // Wait for the parent: it puts us in our cgroup and wires our network meanwhile.
        let mut byte = 0u8;
        if libc::read(fds.go, (&mut byte as *mut u8).cast(), 1) != 1 {
            // The parent gave up (or died) before releasing us.
            libc::_exit(127);
        }

        for (i, (fd, nstype)) in plan.joins.iter().enumerate() {
            // A pid namespace was joined for us before the clone (see spawn_direct).
            if *nstype == libc::CLONE_NEWPID {
                continue;
            }
            if libc::setns(fd.as_raw_fd(), *nstype) != 0 {
                fail(fds, Step::Join, i);
            }
        }
        // Only now, inside its own cgroup, so that the namespace's root is that cgroup.
        if plan.unshare_cgroup && libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            fail(fds, Step::CgroupNs, 0);
        }
        if let Some(h) = &plan.hostname
            && libc::sethostname(h.as_ptr(), h.as_bytes().len()) != 0
        {
            fail(fds, Step::Hostname, 0);
        }

        // Nothing we mount may propagate back to the host.
        let none = std::ptr::null();
        if libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            none.cast(),
        ) != 0
        {
            fail(fds, Step::Propagation, 0);
        }
        // pivot_root needs the new root to be a mount point.
        if libc::mount(
            plan.rootfs.as_ptr(),
            plan.rootfs.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            none.cast(),
        ) != 0
        {
            fail(fds, Step::BindRoot, 0);
        }
        // Opened after the bind, so that it refers to the new mount and not the directory
        // beneath it.
        let root = libc::open(
            plan.rootfs.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if root < 0 {
            fail(fds, Step::OpenRoot, 0);
        }
        // No device nodes on the rootfs, nor on anything already mounted below it: the
        // container could make one there (see Device).
        if set_nodev(root) != 0 {
            fail(fds, Step::BindRoot, 1);
        }

        // Device nodes are created with exactly the modes the plan gives.
        libc::umask(0);
        for (i, op) in plan.mounts.iter().enumerate() {
            let target = mount_target(root, op);
            if target < 0 {
                fail(fds, Step::MountTarget, i);
            }
            // The fd pins the resolved location, so a symlink swapped in meanwhile cannot
            // redirect the mount.
            let path = FdPath::new(target);
            if libc::mount(
                opt_ptr(&op.source),
                path.as_ptr(),
                opt_ptr(&op.fstype),
                op.flags,
                opt_ptr(&op.data).cast(),
            ) != 0
            {
                fail(fds, Step::Mount, i);
            }
            libc::close(target);
            if op.remount_flags.is_some() || op.propagation != 0 || op.nodev {
                // Reopen: the old fd names the directory under the new mount, this one the
                // mount itself.
                let mounted = open_in_root(root, &op.rel, libc::O_PATH as u64);
                if mounted < 0 {
                    fail(fds, Step::Mount, i);
                }
                let path = FdPath::new(mounted);
                if let Some(flags) = op.remount_flags
                    && libc::mount(none, path.as_ptr(), none, flags, none.cast()) != 0
                {
                    fail(fds, Step::Mount, i);
                }
                if op.propagation != 0
                    && libc::mount(none, path.as_ptr(), none, op.propagation, none.cast()) != 0
                {
                    fail(fds, Step::Mount, i);
                }
                if op.nodev && set_nodev(mounted) != 0 {
                    fail(fds, Step::Mount, i);
                }
                libc::close(mounted);
            }
        }
        if !plan.devices.is_empty() {
            // /dev resolved inside the root: the tmpfs mounted above. The nodes are made
            // by name in that directory, so no symlink in the rootfs can redirect them.
            let dev_dir = open_in_root(
                root,
                &plan.dev_dir,
                (libc::O_PATH | libc::O_DIRECTORY) as u64,
            );
            if dev_dir < 0 {
                fail(fds, Step::Device, 0);
            }
            for (i, dev) in plan.devices.iter().enumerate() {
                let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC;
                let file =
                    libc::openat(dev_dir, dev.name.as_ptr(), flags | libc::O_NOFOLLOW, 0o666);
                if file < 0 {
                    // A bundle mount already put something there; it is checked where
                    // silo relies on it.
                    if *libc::__errno_location() == libc::EEXIST {
                        continue;
                    }
                    fail(fds, Step::Device, i);
                }
                let target = FdPath::new(file);
                let bind = libc::MS_BIND;
                if libc::mount(
                    dev.source.as_ptr(),
                    target.as_ptr(),
                    none,
                    bind,
                    none.cast(),
                ) != 0
                {
                    fail(fds, Step::Device, i);
                }
                libc::close(file);
            }
            for (target, link) in &plan.dev_links {
                let r = libc::symlinkat(target.as_ptr(), dev_dir, link.as_ptr());
                if r != 0 && *libc::__errno_location() != libc::EEXIST {
                    fail(fds, Step::Device, plan.devices.len());
                }
            }
            libc::close(dev_dir);
        }

        if fds.hold_before_pivot {
            // The mounts are in place: `create` runs the createContainer hooks in our mount
            // namespace now, and lets us go on when they are done.
            let mut byte = 0u8;
            if libc::write(fds.ready, [MOUNTED].as_ptr().cast(), 1) != 1
                || libc::read(fds.go, (&mut byte as *mut u8).cast(), 1) != 1
            {
                libc::_exit(127);
            }
        }

        // Swap roots: the old root ends up stacked on the new one and is then detached,
        // which avoids needing a writable directory in the rootfs to hold it.
        if libc::fchdir(root) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            fail(fds, Step::PivotRoot, 0);
        }
        libc::close(root);

        if let Some(adj) = &plan.oom_score_adj {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            let bytes = adj.as_bytes();
            if fd < 0 || libc::write(fd, bytes.as_ptr().cast(), bytes.len()) < 0 {
                fail(fds, Step::OomScoreAdj, 0);
            }
            libc::close(fd);
        }
        // Before the read-only paths, which usually include /proc/sys.
        for (i, (path, value)) in plan.sysctls.iter().enumerate() {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            let bytes = value.as_bytes();
            if fd < 0 || libc::write(fd, bytes.as_ptr().cast(), bytes.len()) < 0 {
                fail(fds, Step::Sysctl, i);
            }
            libc::close(fd);
        }
        // Masking binds the container's /dev/null over files; the bundle could have put
        // anything there, so check it is the null device before relying on it.
        let null = if plan.masked.is_empty() {
            -1
        } else {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
            let mut st: libc::stat = std::mem::zeroed();
            if fd < 0 || libc::fstat(fd, &mut st) != 0 {
                fail(fds, Step::NullDevice, 0);
            }
            if st.st_mode & libc::S_IFMT != libc::S_IFCHR || st.st_rdev != libc::makedev(1, 3) {
                *libc::__errno_location() = libc::ENODEV;
                fail(fds, Step::NullDevice, 0);
            }
            fd
        };
        let null_path = FdPath::new(null);
        for (i, path) in plan.masked.iter().enumerate() {
            // A file is hidden under /dev/null, a directory under an empty read-only tmpfs.
            let mut st: libc::stat = std::mem::zeroed();
            if libc::lstat(path.as_ptr(), &mut st) != 0 {
                continue;
            }
            let r = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY,
                    none.cast(),
                )
            } else {
                libc::mount(
                    null_path.as_ptr(),
                    path.as_ptr(),
                    none,
                    libc::MS_BIND,
                    none.cast(),
                )
            };
            if r != 0 {
                fail(fds, Step::Mask, i);
            }
        }
        for (i, path) in plan.readonly.iter().enumerate() {
            if libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                none.cast(),
            ) != 0
            {
                if *libc::__errno_location() == libc::ENOENT {
                    continue;
                }
                fail(fds, Step::ReadOnly, i);
            }
            let flags = libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC;
            if libc::mount(path.as_ptr(), path.as_ptr(), none, flags, none.cast()) != 0 {
                fail(fds, Step::ReadOnly, i);
            }
        }
        if plan.readonly_root
            && libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NODEV,
                none.cast(),
            ) != 0
        {
            fail(fds, Step::RemountRoot, 0);
        }

        enter(plan, fds)
    }
}

/// The end of the init's setup, and all of an exec'd process's: from its own session and
/// limits to the exec, in the container's namespaces and root.
///
/// # Safety
/// Only for the cloned init or exec'd process, once.
unsafe fn enter(plan: &Plan, fds: &ChildFds) -> ! {
    // SAFETY: everything below is a raw syscall on memory the plan owns or on the stack.
    unsafe {
        // Its own session, so no terminal of the host's is its controlling terminal.
        if libc::setsid() < 0 {
            fail(fds, Step::Setsid, 0);
        }
        if fds.console >= 0 {
            open_terminal(fds);
        }
        for (i, (resource, limit)) in plan.rlimits.iter().enumerate() {
            if libc::setrlimit(*resource as libc::__rlimit_resource_t, limit) != 0 {
                fail(fds, Step::Rlimit, i);
            }
        }

        if fds.fifo >= 0 {
            // The setup is done: `create` may return. Then wait for `start`, which opens
            // the FIFO for reading and reads the byte written here, as runc's init does.
            // Through /proc/self/fd because the FIFO's path is outside our root now, and
            // before the change of user, after which /proc/self/fd is no longer ours.
            libc::write(fds.ready, [READY].as_ptr().cast(), 1);
            libc::close(fds.ready);
            let fifo = libc::open(
                FdPath::new(fds.fifo).as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fifo < 0 || libc::write(fifo, [0u8].as_ptr().cast(), 1) != 1 {
                fail(fds, Step::ExecFifo, 0);
            }
            libc::close(fifo);
            libc::close(fds.fifo);
        }

        // Drop bounding capabilities while we still hold CAP_SETPCAP.
        for cap in 0..=plan.last_cap {
            if plan.caps.bounding & (1u64 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
            {
                fail(fds, Step::Capabilities, cap as usize);
            }
        }
        // Without no_new_privs the kernel takes a filter only from a holder of
        // CAP_SYS_ADMIN, which is about to be dropped: install it now.
        if !plan.no_new_privs {
            install_seccomp(plan, fds);
        }
        // Keep the permitted set across the change of user; it is narrowed below.
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        // Raw syscalls, not libc's wrappers: glibc applies credential changes to every
        // thread it believes the process has, and its list is the parent's. Waiting for
        // threads that do not exist here (one being created at the clone, say) hangs.
        let (g, u) = (plan.gid as libc::c_long, plan.uid as libc::c_long);
        let groups = (plan.groups.len(), plan.groups.as_ptr());
        if libc::syscall(libc::SYS_setgroups, groups.0, groups.1) != 0 {
            fail(fds, Step::Groups, 0);
        }
        if libc::syscall(libc::SYS_setresgid, g, g, g) != 0 {
            fail(fds, Step::Gid, 0);
        }
        if libc::syscall(libc::SYS_setresuid, u, u, u) != 0 {
            fail(fds, Step::Uid, 0);
        }
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        set_capabilities(&plan.caps, plan.last_cap, fds);

        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            fail(fds, Step::Chdir, 0);
        }
        if plan.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(fds, Step::NoNewPrivs, 0);
        }
        libc::umask(plan.umask);

        // The runtime may block or ignore signals (Rust ignores SIGPIPE); exec keeps both,
        // and an entrypoint expects neither.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }

        if fds.stdin >= 0 && libc::dup2(fds.stdin, 0) < 0 {
            fail(fds, Step::Stdio, 0);
        }
        if fds.out >= 0 && (libc::dup2(fds.out, 1) < 0 || libc::dup2(fds.out, 2) < 0) {
            fail(fds, Step::Stdio, 1);
        }
        // Every descriptor of the runtime beyond stdio and those passed on closes at exec,
        // whatever its flags; those passed on stay open, whatever theirs.
        libc::close_range(
            3 + fds.preserve,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        );
        for fd in 3..3 + fds.preserve as RawFd {
            libc::fcntl(fd, libc::F_SETFD, 0);
        }

        // As late as possible, so the profile need not allow what the runtime does.
        if plan.no_new_privs {
            install_seccomp(plan, fds);
        }

        let argv = plan.argv_ptrs.as_ptr() as *const *const libc::c_char;
        let envp = plan.envp_ptrs.as_ptr() as *const *const libc::c_char;
        // A PATH search like execvp's: skip entries that do not exist, remember EACCES.
        let mut saw_eacces = false;
        for path in &plan.exec_candidates {
            if runs_runtime(path.as_ptr(), plan.runtime_exe, 0) {
                // Running the runtime's own binary inside the container (through
                // /proc/self/exe, which still names it here) would let the container
                // reopen that binary for writing once it exits.
                *libc::__errno_location() = libc::EACCES;
                fail(fds, Step::RuntimeExe, 0);
            }
            libc::execve(path.as_ptr(), argv, envp);
            match *libc::__errno_location() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => saw_eacces = true,
                _ => fail(fds, Step::Exec, 0),
            }
        }
        if saw_eacces {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(fds, Step::Exec, 0)
    }
}

/// Whether exec'ing `path` would run the binary `(dev, ino)`: the file itself, or the
/// interpreter its `#!` line names, following more levels than the kernel does.
///
/// # Safety
/// Only for the cloned child; `path` must be a valid C string.
unsafe fn runs_runtime(path: *const libc::c_char, exe: (u64, u64), depth: u32) -> bool {
    // SAFETY: stat, open, read and close on our own stack buffers.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(path, &mut st) != 0 {
            return false;
        }
        if (st.st_dev, st.st_ino) == exe {
            return true;
        }
        if depth >= 8 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return false;
        }
        // Non-blocking: the tenant's file could be anything, and must not stall us.
        let fd = libc::open(path, libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK);
        if fd < 0 {
            return false;
        }
        let mut buf = [0u8; 256];
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len() - 1);
        libc::close(fd);
        if n < 3 || buf[0] != b'#' || buf[1] != b'!' {
            return false;
        }
        let line = &mut buf[2..n as usize + 1];
        let start = line.iter().position(|b| *b != b' ' && *b != b'\t');
        let Some(start) = start else { return false };
        let len = line[start..]
            .iter()
            .position(|b| matches!(*b, b' ' | b'\t' | b'\n' | 0))
            .unwrap_or(line.len() - start - 1);
        line[start + len] = 0;
        runs_runtime(line[start..].as_ptr().cast(), exe, depth + 1)
    }
}

/// Closes every descriptor above stdio (and those passed on) except the child's, those of
/// the namespaces it joins, and `extra`. Raw syscalls and no allocation, so that the init,
/// the keeper and the joiner may all use it.
///
/// # Safety
/// Only for the cloned init, keeper or joiner.
unsafe fn close_all_but(plan: &Plan, fds: &ChildFds, extra: &[RawFd]) {
    let mut keep = [0 as RawFd; 24];
    let mut n = 0;
    let joined = plan.joins.iter().map(|(fd, _)| fd.as_raw_fd());
    for fd in [
        fds.go,
        fds.err,
        fds.stdin,
        fds.out,
        fds.ready,
        fds.fifo,
        fds.console,
    ]
    .into_iter()
    .chain(joined)
    .chain(extra.iter().copied())
    {
        if fd > 2 && n < keep.len() {
            keep[n] = fd;
            n += 1;
        }
    }
    let keep = &mut keep[..n];
    keep.sort_unstable();
    // Descriptors passed on to the process (--preserve-fds) follow stdio.
    let mut first: u32 = 3 + fds.preserve;
    for &fd in keep.iter() {
        let fd = fd as u32;
        if fd > first {
            // SAFETY: closing descriptors of our own table.
            let _ = unsafe { raw!(syscalls::Sysno::close_range, first, fd - 1, 0) };
        }
        first = first.max(fd + 1);
    }
    // SAFETY: as above.
    let _ = unsafe { raw!(syscalls::Sysno::close_range, first, u32::MAX, 0) };
}

/// What [`spawn`] hands the keeper, on the runtime's stack.
struct KeeperStart<'a> {
    plan: &'a Plan,
    fds: ChildFds,
    k: KeeperFds,
}

/// The keeper's entry point, called by glibc's clone on the keeper's own stack.
extern "C" fn keeper_main(start: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `start` is the KeeperStart that spawn passed, alive until we report below.
    unsafe {
        let start = &*start.cast::<KeeperStart<'_>>();
        keeper(start.plan, start.fds, start.k)
    }
}

/// The keeper: clones the init, reports its pid, waits for it to exit and records how.
///
/// # Safety
/// Must only run in the keeper cloned by [`spawn`], once. Raw syscalls only: see the module
/// comment.
unsafe fn keeper(plan: &Plan, fds: ChildFds, k: KeeperFds) -> ! {
    use syscalls::Sysno;
    // Copied now: once the runtime hears from us, `plan` may be gone.
    let mut joins = [-1 as RawFd; MAX_JOINS];
    for (slot, (fd, _)) in joins.iter_mut().zip(&plan.joins) {
        *slot = fd.as_raw_fd();
    }

    // SAFETY: raw syscalls on descriptors, the stack and (until the report) the plan.
    unsafe {
        close_all_but(
            plan,
            &fds,
            &[k.info, k.ack, k.exit, k.log, k.cgroup, k.state_dir],
        );
        // Out of the runtime's session and process group, and deaf to every signal but
        // SIGKILL: a terminal's ^C, or a signal to the supervisor's group, must not take
        // the keeper (and with it the exit status) along. SIGCHLD is left at its default:
        // ignoring it would let the kernel reap the init for us, and a handler of the
        // runtime's must not run here.
        let _ = raw!(Sysno::setsid);
        for sig in 1..=64usize {
            if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
                continue;
            }
            let action = KernelSigaction {
                handler: if sig == libc::SIGCHLD as usize {
                    libc::SIG_DFL
                } else {
                    libc::SIG_IGN
                },
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            let _ = raw!(
                Sysno::rt_sigaction,
                sig,
                &action as *const KernelSigaction,
                0,
                8
            );
        }
        let _ = raw!(Sysno::prctl, libc::PR_SET_NAME, c"silo-keeper".as_ptr());

        // The init is an ordinary fork-like child: it gets a copy of the memory we share,
        // taken now, while the runtime waits for our report.
        let mut pidfd: libc::c_int = -1;
        let word: i32 = match clone_init(plan, &fds, k.cgroup, &mut pidfd) {
            Ok(pid) => pid as i32,
            Err(errno) => -errno,
        };
        // From here on the plan is not ours to read.
        let _ = raw!(Sysno::write, k.info, &word as *const i32, 4);
        if word < 0 {
            libc::_exit(1);
        }
        // What is the init's alone. Our own stdio becomes /dev/null too: we may outlive the
        // runtime, and must not hold a terminal or a caller's pipe open.
        for target in 0..3 {
            let _ = raw!(Sysno::dup2, fds.stdin, target);
        }
        for fd in [fds.go, fds.err, fds.stdin, fds.out, k.cgroup, k.info]
            .into_iter()
            .chain(joins)
        {
            if fd >= 0 {
                let _ = raw!(Sysno::close, fd);
            }
        }

        // Reaping the init frees its pid, so not before the runtime has pinned it with a
        // pidfd of its own (or has died, ending `ack` all the same).
        let mut byte = 0u8;
        let _ = raw!(Sysno::read, k.ack, &mut byte as *mut u8, 1);
        let _ = raw!(Sysno::close, k.ack);

        let mut record = crate::monitor::ExitRecord::PENDING;
        let mut info: libc::siginfo_t = std::mem::zeroed();
        loop {
            let waited = raw!(
                Sysno::waitid,
                libc::P_PIDFD,
                pidfd,
                &mut info as *mut libc::siginfo_t,
                libc::WEXITED,
                0
            );
            match waited {
                Ok(_) => {
                    record = crate::monitor::ExitRecord::new(info.si_code, info.si_status());
                    break;
                }
                Err(syscalls::Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        if k.log >= 0 && raw!(Sysno::getppid) != Ok(k.runtime as usize) {
            save_log(&k);
        }
        let _ = raw!(
            Sysno::pwrite64,
            k.exit,
            &record as *const crate::monitor::ExitRecord,
            crate::monitor::ExitRecord::SIZE,
            0
        );
        // _exit makes one syscall and writes no errno.
        libc::_exit(0)
    }
}

/// Appends what is left in the log pipe to the log file, once the init has exited while its
/// runtime is gone: the pipe, and what the container wrote into it, ends with the keeper.
/// (A runtime that adopted the container meanwhile reads the pipe too; whatever either
/// reads goes to the same file.)
///
/// # Safety
/// Only for the keeper.
unsafe fn save_log(k: &KeeperFds) {
    use syscalls::Sysno;
    // SAFETY: raw syscalls on our descriptors and a stack buffer.
    unsafe {
        let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC;
        let Ok(file) = raw!(
            Sysno::openat,
            k.state_dir,
            crate::logs::FILE_C.as_ptr(),
            flags,
            0o644
        ) else {
            return;
        };
        // Only what is there now: another process of the container may still hold the pipe.
        let _ = raw!(Sysno::fcntl, k.log, libc::F_SETFL, libc::O_NONBLOCK);
        let mut buf = [0u8; 16 << 10];
        while let Ok(n) = raw!(Sysno::read, k.log, buf.as_mut_ptr(), buf.len()) {
            if n == 0 || raw!(Sysno::write, file, buf.as_ptr(), n) != Ok(n) {
                break;
            }
        }
        let _ = raw!(Sysno::close, file);
    }
}

/// The kernel's struct sigaction for rt_sigaction (not libc's, which differs in layout).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Clones the init into its new namespaces (and into the cgroup `cgroup` unless it is -1),
/// storing its pidfd in `pidfd`. Returns the init's pid, or the clone's errno. The init runs
/// [`child`] and never returns here. A raw syscall, so that the keeper may use it.
///
/// # Safety
/// The caller must be a process whose other threads' locks the init will never need: the
/// keeper, or a runtime that allocates nothing between this and its own use of `plan`.
unsafe fn clone_init(
    plan: &Plan,
    fds: &ChildFds,
    cgroup: RawFd,
    pidfd: &mut libc::c_int,
) -> std::result::Result<u32, i32> {
    // SAFETY: clone_args is a plain C struct; all-zero is its documented default.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = plan.clone_flags | libc::CLONE_PIDFD as u64;
    args.pidfd = pidfd as *mut libc::c_int as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    if cgroup >= 0 {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = cgroup as u64;
    }
    // SAFETY: clone3 without CLONE_VM gives the child a copy of our memory, like fork; the
    // child runs only `child`, which never returns.
    let cloned = unsafe {
        raw!(
            syscalls::Sysno::clone3,
            &args as *const libc::clone_args,
            std::mem::size_of::<libc::clone_args>()
        )
    };
    match cloned {
        // SAFETY: we are the freshly cloned init.
        Ok(0) => unsafe { child(plan, fds) },
        Ok(pid) => Ok(pid as u32),
        Err(errno) => Err(errno.into_raw()),
    }
}

/// Makes a terminal in the container's /dev/pts, sends its master over the console socket
/// (with a name, as runc does: receivers expect a payload) and makes the other end the
/// process's stdio and controlling terminal.
///
/// # Safety
/// Only for the cloned init or exec'd process, in its own new session.
unsafe fn open_terminal(fds: &ChildFds) {
    // SAFETY: raw syscalls on our descriptors and on buffers on the stack.
    unsafe {
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        let master = libc::open(c"/dev/ptmx".as_ptr(), flags);
        let unlock: libc::c_int = 0;
        if master < 0 || libc::ioctl(master, libc::TIOCSPTLCK, &unlock) != 0 {
            fail(fds, Step::Terminal, 0);
        }
        let peer = libc::ioctl(master, libc::TIOCGPTPEER, flags);
        if peer < 0 {
            fail(fds, Step::Terminal, 1);
        }
        let name = b"/dev/ptmx";
        let mut iov = libc::iovec {
            iov_base: name.as_ptr() as *mut libc::c_void,
            iov_len: name.len(),
        };
        // Room for one descriptor's control message, aligned as cmsghdr needs.
        let mut control = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::copy_nonoverlapping(
            (&master as *const libc::c_int).cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            4,
        );
        if libc::sendmsg(fds.console, &msg, 0) < 0 {
            fail(fds, Step::Terminal, 2);
        }
        libc::close(master);
        libc::close(fds.console);
        if libc::ioctl(peer, libc::TIOCSCTTY, 0) != 0 {
            fail(fds, Step::Terminal, 3);
        }
        for target in 0..3 {
            if libc::dup2(peer, target) < 0 {
                fail(fds, Step::Terminal, 4);
            }
        }
        if peer > 2 {
            libc::close(peer);
        }
    }
}

/// Sets `nodev` on the mount `fd` refers to and on every mount below it.
///
/// # Safety
/// Only for the cloned child.
unsafe fn set_nodev(fd: RawFd) -> libc::c_long {
    /// The kernel's struct mount_attr.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    const AT_RECURSIVE: libc::c_int = 0x8000;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr on a descriptor we own, with a properly sized mount_attr.
    unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    }
}

/// Hands the seccomp filters to the kernel, in order.
///
/// # Safety
/// Only for the cloned child.
unsafe fn install_seccomp(plan: &Plan, fds: &ChildFds) {
    for (i, program) in plan.seccomp.programs.iter().enumerate() {
        let prog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points into a BPF program that the plan owns; the kernel copies it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                plan.seccomp.flags,
                &prog as *const libc::sock_fprog,
            )
        };
        if r != 0 {
            // SAFETY: only for the cloned child, as this function is.
            unsafe { fail(fds, Step::Seccomp, i) };
        }
    }
}

/// Sets the effective, permitted and inheritable sets, then raises the ambient ones.
///
/// # Safety
/// Only for the cloned child.
unsafe fn set_capabilities(caps: &Caps, last_cap: u8, fds: &ChildFds) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: caps.effective as u32,
            permitted: caps.permitted as u32,
            inheritable: caps.inheritable as u32,
        },
        Data {
            effective: (caps.effective >> 32) as u32,
            permitted: (caps.permitted >> 32) as u32,
            inheritable: (caps.inheritable >> 32) as u32,
        },
    ];
    // SAFETY: capset with a version-3 header and the two data words it requires.
    unsafe {
        if libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) != 0 {
            fail(fds, Step::Capabilities, 64);
        }
        for cap in 0..=last_cap {
            if caps.ambient & (1u64 << cap) != 0
                && libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                ) != 0
            {
                fail(fds, Step::Capabilities, 100 + cap as usize);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_path_formats_numbers() {
        let p = FdPath::new(1234);
        let s = std::ffi::CStr::from_bytes_until_nul(&p.0).unwrap();
        assert_eq!(s.to_str().unwrap(), "/proc/self/fd/1234");
        let p = FdPath::new(0);
        let s = std::ffi::CStr::from_bytes_until_nul(&p.0).unwrap();
        assert_eq!(s.to_str().unwrap(), "/proc/self/fd/0");
    }

    #[test]
    fn relative_refuses_climbing_out() {
        assert_eq!(relative(Path::new("/a/../b")), Some(PathBuf::from("b")));
        assert_eq!(relative(Path::new("/../etc")), None);
        assert_eq!(relative(Path::new("/")), None);
    }

    #[test]
    fn steps_round_trip() {
        for n in 0..32u32 {
            assert_eq!(Step::from(n) as u32, n);
        }
    }

    #[test]
    fn only_namespaced_sysctls() {
        assert!(is_namespaced_sysctl("net.ipv4.ping_group_range"));
        assert!(is_namespaced_sysctl("kernel.shmmax"));
        assert!(!is_namespaced_sysctl("kernel.panic"));
        assert!(!is_namespaced_sysctl("vm.swappiness"));
    }
}
