//! The OCI lifecycle commands: create, start, kill, delete, run, pause and resume.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tracing::{debug, info, warn};

use super::hooks::{self, Kind};
use super::state::{Creating, Dir, Saved, Status, write_atomic};
use super::{Error, Global, Result};
use crate::bundle::Bundle;
use crate::cgroup::Cgroup;
use crate::spawn::{self, Direct, Plan, Process, Stage};
use crate::state::Proc;

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    pub id: String,
    /// The bundle directory.
    #[arg(long, short, default_value = ".")]
    pub bundle: PathBuf,
    /// Where to write the init's pid.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// A unix socket to send the master of the container's terminal to, when its process
    /// has one (`process.terminal`).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted; silo always uses pivot_root, which works on every root it accepts.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted; silo never makes a session keyring.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Pass descriptors 3 to 3+N-1 on to the container (besides any from `LISTEN_FDS`).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Return once the container is started instead of waiting for it.
    #[arg(long, short)]
    pub detach: bool,
    /// Accepted, as runc does: the container is deleted when it exits either way.
    #[arg(long)]
    pub keep: bool,
}

/// What a `create` has made so far, removed again when it fails.
struct Made {
    dir: PathBuf,
    cgroup: Option<Cgroup>,
    /// The init, our child, to kill and reap.
    init: Option<OwnedFd>,
}

impl Made {
    fn undo(self) {
        if let Some(pidfd) = &self.init {
            let _ = crate::monitor::send_signal(pidfd, libc::SIGKILL);
            reap(pidfd.as_fd());
        }
        if let Some(cgroup) = &self.cgroup
            && let Err(e) = cgroup.kill_all().and_then(|()| cgroup.remove())
        {
            warn!(error = %e, "failed to remove the cgroup of a failed create");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The container namespaces a hook or an exec joins, as setns flags.
pub(super) const ALL_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWCGROUP;

pub fn create(g: &Global, args: &CreateArgs) -> Result<()> {
    create_pidfd(g, args).map(drop)
}

/// Creates the container and returns the pidfd of its init (our child until we exit).
fn create_pidfd(g: &Global, args: &CreateArgs) -> Result<OwnedFd> {
    let dir = Dir::new(&g.root, &args.id)?;
    check_preserved(args.preserve_fds + listen_fds())?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&g.root)
        .map_err(|e| dir.io(&format!("create the root {}", g.root.display()), e))?;
    // Making the directory is what claims the id: of two creates, one fails here.
    match std::fs::DirBuilder::new().mode(0o700).create(&dir.path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::Exists(args.id.clone()));
        }
        Err(e) => return Err(dir.io("create its state directory", e)),
    }
    let _lock = dir.lock()?;
    let mut made = Made {
        dir: dir.path.clone(),
        cgroup: None,
        init: None,
    };
    match create_in(g, args, &dir, &mut made) {
        Ok(pidfd) => Ok(pidfd),
        Err(e) => {
            debug!(error = %e, "create failed");
            made.undo();
            Err(e)
        }
    }
}

fn create_in(g: &Global, args: &CreateArgs, dir: &Dir, made: &mut Made) -> Result<OwnedFd> {
    let id = &args.id;
    let bundle = Bundle::load_for_runc(&args.bundle)?;
    let spec = bundle.spec();
    let proc_spec = spec.process().as_ref().expect("checked by Bundle::load");
    let mut env = proc_spec.env().clone().unwrap_or_default();
    let mut preserve = args.preserve_fds;
    // Socket activation, as runc does it: the descriptors systemd passed us go on to the
    // container, whose init is PID 1 of its namespace.
    let n = listen_fds();
    if n > 0 {
        preserve += n;
        env.retain(|kv| !kv.starts_with("LISTEN_FDS=") && !kv.starts_with("LISTEN_PID="));
        env.push(format!("LISTEN_FDS={n}"));
        env.push("LISTEN_PID=1".into());
    }
    let process = Process {
        args: proc_spec.args().clone().unwrap_or_default(),
        env,
    };
    let plan = Plan::new(&bundle, &process)?;
    let limits =
        crate::container::limits(&bundle, None).map_err(|e| Error::Usage(e.to_string()))?;
    let cgroups_path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .map(|p| p.to_string_lossy().into_owned());
    let rel = super::cgroups::below_parent(
        cgroups_path.as_deref(),
        id,
        &g.cgroup_parent,
        g.systemd_cgroup,
    )?;
    dir.creating(&Creating {
        cgroup: rel.clone(),
        cgroup_parent: g.cgroup_parent.clone(),
    })?;
    let cgroup = Cgroup::create(&g.cgroup_parent, &rel, &limits)?;
    let cgroup_dir = cgroup.dir_fd()?;
    made.cgroup = Some(cgroup);

    let fifo_path = dir.fifo();
    nix::unistd::mkfifo(&fifo_path, nix::sys::stat::Mode::from_bits_truncate(0o622))
        .map_err(|e| dir.io("make the exec FIFO", e.into()))?;
    // Writable by the container's user, whoever that is (the umask took some bits).
    std::fs::set_permissions(&fifo_path, std::fs::Permissions::from_mode(0o622))
        .map_err(|e| dir.io("set the mode of the exec FIFO", e))?;
    let fifo: OwnedFd = nix::fcntl::open(
        &fifo_path,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| dir.io("open the exec FIFO", e.into()))?;

    let prestart = hooks::of(spec.hooks().as_ref(), Kind::Prestart);
    let create_runtime = hooks::of(spec.hooks().as_ref(), Kind::CreateRuntime);
    let create_container = hooks::of(spec.hooks().as_ref(), Kind::CreateContainer);
    let console = console_socket(
        proc_spec.terminal() == Some(true),
        args.console_socket.as_deref(),
    )?;
    let direct = Direct {
        exec_fifo: fifo.as_fd(),
        preserve_fds: preserve,
        console: console.as_ref().map(|c| c.as_fd()),
        hold_before_pivot: [&prestart, &create_runtime, &create_container]
            .iter()
            .any(|h| !h.is_empty()),
    };
    let created = spawn::spawn_direct(&plan, cgroup_dir.as_ref().map(|d| d.as_fd()), &direct)?;
    let pid = created.pid;
    made.init = Some(
        created
            .pidfd
            .try_clone()
            .map_err(|e| dir.io("duplicate the init's pidfd", e))?,
    );
    debug!(pid, "init cloned");
    let cgroup = made.cgroup.as_ref().expect("set above");
    if cgroup_dir.is_none() {
        cgroup.add(pid)?;
    }
    let init = Proc::of(pid).ok_or_else(|| {
        dir.io(
            "read the start time of its init",
            std::io::ErrorKind::NotFound.into(),
        )
    })?;
    let saved = Saved {
        id: id.clone(),
        bundle: bundle.dir().to_path_buf(),
        rootfs: bundle.rootfs().to_path_buf(),
        init,
        cgroup: rel,
        cgroup_parent: g.cgroup_parent.clone(),
        created: SystemTime::now(),
        annotations: spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        hooks: spec.hooks().clone(),
    };
    let state = serde_json::to_vec(&saved.report(Status::Creating)).expect("state serializes");
    let pidfd = made.init.as_ref().expect("set above").as_fd();
    let boot = |report: Option<spawn::Report>| Error::Boot {
        id: id.clone(),
        reason: report.map_or_else(
            || "its init exited during its setup".to_string(),
            |r| plan.describe(&r),
        ),
    };
    if created.go_on().map_err(boot)? == Stage::Mounted {
        // As with runc: its namespaces and mounts are in place, its root not yet switched.
        hooks::run(Kind::Prestart, &prestart, &state, None)?;
        hooks::run(Kind::CreateRuntime, &create_runtime, &state, None)?;
        let mount_ns = Some((pidfd, libc::CLONE_NEWNS));
        hooks::run(Kind::CreateContainer, &create_container, &state, mount_ns)?;
        created.go_on().map_err(boot)?;
    }
    let pidfd = created.pidfd;
    dir.save(&saved)?;
    if let Some(path) = &args.pid_file {
        write_atomic(path, pid.to_string().as_bytes())
            .map_err(|e| dir.io(&format!("write the pid file {}", path.display()), e))?;
    }
    info!(container = %id, pid, "container created");
    made.init = None;
    made.cgroup = None;
    Ok(pidfd)
}

pub fn start(g: &Global, id: &str) -> Result<()> {
    let dir = Dir::new(&g.root, id)?;
    let _lock = dir.lock()?;
    let saved = dir.load()?;
    match saved.status(&dir) {
        Status::Created => {}
        status => {
            return Err(Error::WrongStatus {
                what: "start",
                id: id.to_string(),
                status,
            });
        }
    }
    let pidfd = saved
        .init
        .open()
        .ok_or_else(|| Error::NotRunning(id.to_string()))?;
    let hook_list = |kind| hooks::of(saved.hooks.as_ref(), kind);
    let state = serde_json::to_vec(&saved.report(Status::Created)).expect("state serializes");
    let in_container = Some((pidfd.as_fd(), ALL_NAMESPACES));
    hooks::run(
        Kind::StartContainer,
        &hook_list(Kind::StartContainer),
        &state,
        in_container,
    )?;

    let fifo = dir.fifo();
    let reader: OwnedFd = nix::fcntl::open(
        &fifo,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| dir.io("open the exec FIFO", e.into()))?;
    wait_for_fifo(&dir, reader.as_fd(), pidfd.as_fd())?;
    // Gone from now on: the container counts as running.
    std::fs::remove_file(&fifo).map_err(|e| dir.io("remove the exec FIFO", e))?;
    info!(container = %id, pid = saved.init.pid, "container started");

    let state = serde_json::to_vec(&saved.report(Status::Running)).expect("state serializes");
    if let Err(e) = hooks::run(Kind::Poststart, &hook_list(Kind::Poststart), &state, None) {
        warn!(error = %e, "a poststart hook failed");
    }
    Ok(())
}

/// Waits until the init has opened the exec FIFO and written its byte: it execs next.
/// Fails when the init dies first.
fn wait_for_fifo(dir: &Dir, fifo: BorrowedFd<'_>, pidfd: BorrowedFd<'_>) -> Result<()> {
    // Bounded so that a wedged init cannot hold `start` forever.
    for _ in 0..600 {
        let mut fds = [
            PollFd::new(fifo, PollFlags::POLLIN),
            PollFd::new(pidfd, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(dir.io("wait for the init", e.into())),
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[0]) {
            let mut byte = [0u8; 1];
            match nix::unistd::read(fifo, &mut byte) {
                Ok(1) => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(dir.io("read the exec FIFO", e.into())),
            }
        }
        if ready(&fds[1]) {
            return Err(Error::Boot {
                id: dir.id.clone(),
                reason: "its init exited before it was started".into(),
            });
        }
    }
    Err(dir.io(
        "wait for the init to take the exec FIFO",
        std::io::ErrorKind::TimedOut.into(),
    ))
}

/// How many descriptors systemd passed us for socket activation (`LISTEN_FDS`).
fn listen_fds() -> u32 {
    std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Checks that descriptors 3 to 3+n-1, which go to the container, are all open: then every
/// descriptor this command opens lands above them, and none of silo's is passed on.
pub(super) fn check_preserved(n: u32) -> Result<()> {
    for fd in 3..3 + n as i32 {
        // SAFETY: F_GETFD only reads the flags of a descriptor number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::Usage(format!(
                "descriptor {fd} is to be passed to the container but is not open"
            )));
        }
    }
    Ok(())
}

/// The connected console socket for a process with a terminal; none without one.
pub(super) fn console_socket(
    terminal: bool,
    path: Option<&std::path::Path>,
) -> Result<Option<std::os::unix::net::UnixStream>> {
    if !terminal {
        return Ok(None);
    }
    let path = path.ok_or_else(|| {
        Error::Usage("a process with a terminal needs --console-socket to send it to".into())
    })?;
    std::os::unix::net::UnixStream::connect(path)
        .map(Some)
        .map_err(|e| {
            Error::Usage(format!(
                "cannot connect to console socket {}: {e}",
                path.display()
            ))
        })
}

/// A signal by name (`KILL`, `SIGKILL`) or number.
pub(super) fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64)
            .contains(&n)
            .then_some(n)
            .ok_or_else(|| Error::Signal(s.to_string()));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| Error::Signal(s.to_string()))
}

pub fn kill(g: &Global, id: &str, signal: &str, all: bool) -> Result<()> {
    let dir = Dir::new(&g.root, id)?;
    let saved = dir.load()?;
    let sig = parse_signal(signal)?;
    let status = saved.status(&dir);
    let not_running = || Error::NotRunning(id.to_string());
    if status == Status::Stopped {
        return Err(not_running());
    }
    if all {
        let cgroup = saved.cgroup()?;
        for pid in cgroup.procs() {
            // SAFETY: kill(2) with a pid read from the container's own cgroup.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
        if sig == libc::SIGKILL && status == Status::Paused {
            // A frozen process dies only once thawed.
            cgroup.set_frozen(false)?;
        }
        return Ok(());
    }
    let pidfd = saved.init.open().ok_or_else(not_running)?;
    crate::monitor::send_signal(&pidfd, sig).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => not_running(),
        _ => dir.io(&format!("send signal {sig}"), e),
    })?;
    if sig == libc::SIGKILL && status == Status::Paused {
        saved.cgroup()?.set_frozen(false)?;
    }
    debug!(container = %id, sig, "signal sent");
    Ok(())
}

pub fn delete(g: &Global, id: &str, force: bool) -> Result<()> {
    let dir = Dir::new(&g.root, id)?;
    // Waits for a create under way, which a forced delete would otherwise cut short.
    let _lock = dir.lock()?;
    let saved = match dir.load() {
        Ok(saved) => saved,
        // As runc: a forced delete of what is not there (or half made) succeeds. A
        // create that died half-way may have left its cgroup, and its init waiting.
        Err(Error::NotExist(_)) if force => {
            if let Some(creating) = dir.unfinished() {
                let cgroup = Cgroup::open(&creating.cgroup_parent, &creating.cgroup)?;
                cgroup.kill_all()?;
                cgroup.remove()?;
            }
            let _ = std::fs::remove_dir_all(&dir.path);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let status = saved.status(&dir);
    match status {
        // A created container has not run its process: deleting it is no loss.
        Status::Stopped | Status::Created => {}
        _ if force => {}
        status => {
            return Err(Error::NotStopped {
                id: id.to_string(),
                status,
            });
        }
    }
    let cgroup = saved.cgroup()?;
    if status != Status::Stopped
        && let Some(pidfd) = saved.init.open()
    {
        let _ = crate::monitor::send_signal(&pidfd, libc::SIGKILL);
        if status == Status::Paused {
            cgroup.set_frozen(false)?;
        }
        wait_exit(pidfd.as_fd(), Duration::from_secs(10));
    }
    cgroup.kill_all()?;
    cgroup.remove()?;
    let state = serde_json::to_vec(&saved.report(Status::Stopped)).expect("state serializes");
    let poststop = hooks::of(saved.hooks.as_ref(), Kind::Poststop);
    if let Err(e) = hooks::run(Kind::Poststop, &poststop, &state, None) {
        warn!(error = %e, "a poststop hook failed");
    }
    std::fs::remove_dir_all(&dir.path).map_err(|e| dir.io("remove its state directory", e))?;
    info!(container = %id, "container deleted");
    Ok(())
}

pub fn pause(g: &Global, id: &str, frozen: bool) -> Result<()> {
    let dir = Dir::new(&g.root, id)?;
    let _lock = dir.lock()?;
    let saved = dir.load()?;
    let status = saved.status(&dir);
    let (wanted, what) = if frozen {
        (Status::Running, "pause")
    } else {
        (Status::Paused, "resume")
    };
    if status != wanted {
        return Err(Error::WrongStatus {
            what,
            id: id.to_string(),
            status,
        });
    }
    saved.cgroup()?.set_frozen(frozen)?;
    Ok(())
}

/// `create` and `start`; without `--detach`, waits for the init, deletes the container and
/// returns its exit code (128+n after signal n). SIGINT, SIGTERM and SIGHUP are passed on
/// to the init meanwhile.
pub fn run(g: &Global, args: &RunArgs) -> Result<u8> {
    use nix::sys::signal::{SigSet, Signal};
    let id = &args.create.id;
    let mut forwarded = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        forwarded.add(sig);
    }
    if !args.detach {
        // Blocked before the init exists, so that none of them ends us instead; the init
        // clears its mask before it execs.
        forwarded
            .thread_block()
            .map_err(|e| Error::Usage(format!("cannot block signals: {e}")))?;
    }
    let pidfd = create_pidfd(g, &args.create)?;
    if let Err(e) = start(g, id) {
        let _ = delete(g, id, true);
        return Err(e);
    }
    if args.detach {
        return Ok(0);
    }
    let signals = nix::sys::signalfd::SignalFd::new(&forwarded)
        .map_err(|e| Error::Usage(format!("cannot watch signals: {e}")))?;
    let status = loop {
        let mut fds = [
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::NONE);
        if fds[1].revents().is_some_and(|r| !r.is_empty())
            && let Ok(Some(info)) = signals.read_signal()
        {
            let _ = crate::monitor::send_signal(&pidfd, info.ssi_signo as i32);
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            break reap(pidfd.as_fd());
        }
    };
    delete(g, id, true)?;
    Ok(status.clamp(0, 255) as u8)
}

/// Waits up to `limit` for the process behind `pidfd` to exit (it need not be our child).
pub(super) fn wait_exit(pidfd: BorrowedFd<'_>, limit: Duration) {
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// Reaps our child behind `pidfd`, waiting for it, and returns its exit code (128+n after
/// signal n; 255 if it could not be reaped).
pub(super) fn reap(pidfd: BorrowedFd<'_>) -> i32 {
    crate::monitor::wait_blocking(pidfd).map_or(crate::monitor::UNKNOWN_CODE, |s| s.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("9").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("SIGTERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("hup").unwrap(), libc::SIGHUP);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("NOPE").is_err());
    }
}
