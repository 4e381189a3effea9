//! `probe`: calls that a confined container must not be able to make, each tried with
//! arguments that would do no harm even if it were allowed, reporting the errno it got.

/// A call to try: its name, and the call returning the raw syscall result.
type Probe = (&'static str, fn() -> libc::c_long);

/// Runs the probes named in `argv` after `probe` (every probe when none is named) and
/// returns `NAME=ok` or `NAME=ERRNO` lines.
pub fn run(argv: &[String]) -> String {
    let wanted: Vec<&str> = argv
        .iter()
        .skip_while(|a| *a != "probe")
        .skip(1)
        .map(String::as_str)
        .collect();
    let probes: &[Probe] = &[
        // SAFETY (all below): raw syscalls with null pointers, invalid descriptors or
        // zero lengths; the kernel validates them and touches no memory of ours.
        ("mount", || unsafe {
            let none = std::ptr::null::<libc::c_char>();
            libc::syscall(libc::SYS_mount, none, c"/tmp".as_ptr(), none, 0, none)
        }),
        ("umount2", || unsafe {
            libc::syscall(libc::SYS_umount2, c"/nonexistent".as_ptr(), 0)
        }),
        ("pivot_root", || unsafe {
            libc::syscall(
                libc::SYS_pivot_root,
                c"/nonexistent".as_ptr(),
                c"/x".as_ptr(),
            )
        }),
        ("unshare", || unsafe {
            libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS)
        }),
        ("setns", || unsafe { libc::syscall(libc::SYS_setns, -1, 0) }),
        ("clone_newns", || unsafe {
            // Namespace flags on clone; refused before a child could exist.
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_NEWNS | libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
                0,
                0,
                0,
                0,
            )
        }),
        ("init_module", || unsafe {
            libc::syscall(
                libc::SYS_init_module,
                std::ptr::null::<u8>(),
                0,
                c"".as_ptr(),
            )
        }),
        ("finit_module", || unsafe {
            libc::syscall(libc::SYS_finit_module, -1, c"".as_ptr(), 0)
        }),
        ("delete_module", || unsafe {
            libc::syscall(libc::SYS_delete_module, c"nonexistent".as_ptr(), 0)
        }),
        ("kexec_load", || unsafe {
            libc::syscall(libc::SYS_kexec_load, 0, 0, 0, 0)
        }),
        ("reboot", || unsafe {
            // Bad magic numbers: EINVAL at worst, never a reboot.
            libc::syscall(libc::SYS_reboot, 0, 0, 0, 0)
        }),
        ("swapon", || unsafe {
            libc::syscall(libc::SYS_swapon, c"/nonexistent".as_ptr(), 0)
        }),
        ("swapoff", || unsafe {
            libc::syscall(libc::SYS_swapoff, c"/nonexistent".as_ptr())
        }),
        ("bpf", || unsafe { libc::syscall(libc::SYS_bpf, -1, 0, 0) }),
        ("perf_event_open", || unsafe {
            libc::syscall(libc::SYS_perf_event_open, 0, 0, -1, -1, 0)
        }),
        ("keyctl", || unsafe {
            libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0)
        }),
        ("add_key", || unsafe {
            libc::syscall(libc::SYS_add_key, 0, 0, 0, 0, 0)
        }),
        ("userfaultfd", || unsafe {
            let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC);
            if fd >= 0 {
                libc::close(fd as libc::c_int);
            }
            fd
        }),
        ("clock_settime", || unsafe {
            libc::syscall(libc::SYS_clock_settime, libc::CLOCK_REALTIME, 0)
        }),
        ("settimeofday", || unsafe {
            libc::syscall(libc::SYS_settimeofday, 0, 0)
        }),
        ("open_by_handle_at", || unsafe {
            libc::syscall(libc::SYS_open_by_handle_at, -1, 0, 0)
        }),
        ("io_uring_setup", || unsafe {
            libc::syscall(libc::SYS_io_uring_setup, 0, 0)
        }),
        ("ioctl_tiocsti", || unsafe {
            libc::syscall(libc::SYS_ioctl, 0, libc::TIOCSTI, c"x".as_ptr())
        }),
        ("ioctl_tiocsti_high", || unsafe {
            // The kernel ignores the upper 32 bits of the request; a filter must too.
            libc::syscall(libc::SYS_ioctl, 0, (1u64 << 32) | libc::TIOCSTI, c"x".as_ptr())
        }),
        ("ioctl_tioclinux", || unsafe {
            libc::syscall(libc::SYS_ioctl, 0, libc::TIOCLINUX, 0)
        }),
    ];
    let mut out = String::new();
    for (name, call) in probes {
        if !wanted.is_empty() && !wanted.contains(name) {
            continue;
        }
        let r = call();
        let result = if r >= 0 {
            "ok".to_string()
        } else {
            errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        };
        out.push_str(&format!("{name}={result}\n"));
    }
    out
}

fn errno_name(e: i32) -> String {
    match e {
        libc::EPERM => "EPERM".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::EBADF => "EBADF".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::ENOTTY => "ENOTTY".into(),
        libc::EACCES => "EACCES".into(),
        other => format!("errno{other}"),
    }
}
