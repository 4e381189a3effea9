//! Seccomp filters: silo's default allow list, or the bundle's `linux.seccomp` profile.
//!
//! Filters are compiled to BPF here, in the parent, with seccompiler; the child only hands
//! the finished programs to the kernel. seccompiler builds filters with one action for
//! matching calls and one for the rest, while an OCI profile gives each rule an action of its
//! own. A profile therefore becomes a stack of filters: one that applies the default action
//! to every call no rule names, and one per other action that applies it where its rules
//! match. The kernel runs every filter in the stack and keeps the most restrictive verdict,
//! which is what the profile means.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use syscalls::Sysno;

/// Errors from building the filters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("field {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("failed to compile the seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// BPF programs, in the order they are installed, and the flags for seccomp(2).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub programs: Vec<BpfProgram>,
    pub flags: libc::c_ulong,
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// What a container may call when its bundle names no profile: ordinary work (files,
/// sockets, processes, threads, timers, memory), in the spirit of the defaults Docker and
/// Podman ship. Left out, so refused with EPERM: loading kernel modules, kexec, reboot,
/// mount and the new mount API, pivot_root, new namespaces (unshare, setns), bpf,
/// perf_event_open, the key store, userfaultfd, setting clocks, swap, open_by_handle_at,
/// io_uring, and other calls that reach beyond the container.
const DEFAULT_ALLOW: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chroot",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_waitv",
    "futimesat",
    "get_mempolicy",
    "get_robust_list",
    "get_thread_area",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_setup",
    "io_submit",
    "ioprio_get",
    "ioprio_set",
    "kcmp",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "membarrier",
    "memfd_create",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "process_vm_readv",
    "process_vm_writev",
    "pselect6",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "setsid",
    "setsockopt",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socket",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "wait4",
    "waitid",
    "write",
    "writev",
];

/// The namespace flags that `clone` may not carry: a new namespace is a new attack surface.
const CLONE_NEW_MASK: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWTIME) as u64;

fn sysno(name: &str) -> Option<i64> {
    Sysno::from_str(name).ok().map(|s| s.id() as i64)
}

fn cond(index: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .expect("argument indexes below 6 are valid")
}

/// silo's default filters.
pub fn default_filters() -> Result<Filters> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in DEFAULT_ALLOW {
        if let Some(nr) = sysno(name) {
            rules.insert(nr, Vec::new());
        }
    }
    let rule = |conds| SeccompRule::new(conds).expect("rules have conditions");
    // clone without namespace flags.
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(CLONE_NEW_MASK),
            0,
        )])],
    );
    // clone3 passes its flags in memory a filter cannot read; it is allowed here and made
    // to fail with ENOSYS by the next filter, so that libc falls back to clone.
    rules.insert(libc::SYS_clone3, Vec::new());
    // ioctl, except faking terminal input (TIOCSTI) and the console's TIOCLINUX.
    let (sti, linux) = (libc::TIOCSTI, libc::TIOCLINUX);
    // The kernel reads ioctl's request as 32 bits, so compare only those: with 64, high
    // bits set by the caller would slip past.
    let low32 = |op, value| {
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value)
            .expect("argument index 1 is valid")
    };
    rules.insert(
        libc::SYS_ioctl,
        vec![rule(vec![
            low32(SeccompCmpOp::Ne, sti),
            low32(SeccompCmpOp::Ne, linux),
        ])],
    );
    // personality, only to the harmless personas.
    rules.insert(
        libc::SYS_personality,
        [0u64, 0x0008, 0x20000, 0x20008, 0xffff_ffff]
            .iter()
            .map(|p| rule(vec![cond(0, SeccompCmpOp::Eq, *p)]))
            .collect(),
    );
    let allow = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        ARCH,
    )?;
    let no_clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )?;
    Ok(Filters {
        programs: vec![allow.try_into()?, no_clone3.try_into()?],
        flags: 0,
    })
}

fn action(a: LinuxSeccompAction, errno: Option<u32>, field: &str) -> Result<SeccompAction> {
    use LinuxSeccompAction as A;
    Ok(match a {
        A::ScmpActAllow => SeccompAction::Allow,
        A::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32)),
        A::ScmpActKill | A::ScmpActKillThread => SeccompAction::KillThread,
        A::ScmpActKillProcess => SeccompAction::KillProcess,
        A::ScmpActTrap => SeccompAction::Trap,
        A::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(0)),
        A::ScmpActLog => SeccompAction::Log,
        A::ScmpActNotify => {
            return Err(Error::Invalid {
                field: field.to_string(),
                reason: "SCMP_ACT_NOTIFY is not supported".into(),
            });
        }
    })
}

/// The filters for a bundle's `linux.seccomp`.
pub fn from_profile(profile: &LinuxSeccomp) -> Result<Filters> {
    let invalid = |field: &str, reason: &str| Error::Invalid {
        field: field.to_string(),
        reason: reason.to_string(),
    };
    if profile.listener_path().is_some() {
        return Err(invalid(
            "linux.seccomp.listenerPath",
            "notification is not supported",
        ));
    }
    let default = action(
        profile.default_action(),
        profile.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;
    let mut flags = 0;
    for flag in profile.flags().iter().flatten() {
        use oci_spec::runtime::LinuxSeccompFilterFlag as F;
        flags |= match flag {
            F::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            F::SeccompFilterFlagSpecAllow => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            F::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            F::SeccompFilterFlagWaitKillableRecv => {
                return Err(invalid(
                    "linux.seccomp.flags",
                    "notification is not supported",
                ));
            }
        };
    }

    // `passes` is what the default filter lets through; `groups` holds one rule set per
    // other action.
    let mut passes = Rules::default();
    let mut groups: Vec<(SeccompAction, Rules)> = Vec::new();
    for (i, sc) in profile.syscalls().iter().flatten().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let act = action(sc.action(), sc.errno_ret(), &format!("{field}.action"))?;
        if act == default {
            continue;
        }
        let mut conds = Vec::new();
        for (j, arg) in sc.args().iter().flatten().enumerate() {
            let field = format!("{field}.args[{j}]");
            let index = u8::try_from(arg.index())
                .ok()
                .filter(|i| *i < 6)
                .ok_or_else(|| invalid(&field, "index must be 0 to 5"))?;
            use LinuxSeccompOperator as O;
            let (op, value) = match arg.op() {
                O::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
                O::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
                O::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
                O::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
                O::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
                O::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
                O::ScmpCmpMaskedEq => (
                    SeccompCmpOp::MaskedEq(arg.value()),
                    arg.value_two().unwrap_or(0),
                ),
            };
            conds.push(cond(index, op, value));
        }
        for name in sc.names() {
            // Names of other architectures (or newer kernels) cannot be called here.
            let Some(nr) = sysno(name) else {
                tracing::debug!(syscall = %name, "seccomp rule for an unknown syscall skipped");
                continue;
            };
            passes.add(nr, &conds);
            if act == SeccompAction::Allow {
                continue;
            }
            match groups.iter_mut().find(|(a, _)| *a == act) {
                Some((_, rules)) => rules.add(nr, &conds),
                None => {
                    let mut rules = Rules::default();
                    rules.add(nr, &conds);
                    groups.push((act.clone(), rules));
                }
            }
        }
    }

    let mut programs = Vec::new();
    if default != SeccompAction::Allow {
        let filter = SeccompFilter::new(passes.build(), default, SeccompAction::Allow, ARCH)?;
        programs.push(filter.try_into()?);
    }
    for (act, rules) in groups {
        let filter = SeccompFilter::new(rules.build(), SeccompAction::Allow, act, ARCH)?;
        programs.push(filter.try_into()?);
    }
    Ok(Filters { programs, flags })
}

/// The rules of one filter, per syscall: either always matching, or matching when any of
/// a list of condition sets holds.
#[derive(Default)]
struct Rules(BTreeMap<i64, Option<Vec<Vec<SeccompCondition>>>>);

impl Rules {
    fn add(&mut self, nr: i64, conds: &[SeccompCondition]) {
        let entry = self.0.entry(nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), conds.is_empty()) {
            (Some(_), true) => *entry = None,
            (Some(sets), false) => sets.push(conds.to_vec()),
            (None, _) => {}
        }
    }

    /// seccompiler's form: an empty chain matches every call of that syscall.
    fn build(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
            .into_iter()
            .map(|(nr, sets)| {
                let chain = sets
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| SeccompRule::new(c).expect("condition sets are not empty"))
                    .collect();
                (nr, chain)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filters_compile() {
        let f = default_filters().unwrap();
        assert_eq!(f.programs.len(), 2);
        assert!(f.programs[0].len() > 100);
    }

    #[test]
    fn syscall_names_resolve() {
        assert_eq!(sysno("read"), Some(libc::SYS_read));
        assert_eq!(sysno("no_such_call"), None);
        let known = DEFAULT_ALLOW.iter().filter(|n| sysno(n).is_some()).count();
        assert!(
            known + 5 >= DEFAULT_ALLOW.len(),
            "most default names resolve"
        );
    }
}
