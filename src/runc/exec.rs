//! `exec`: another process in a running container, in all of its namespaces and its
//! cgroup, with the bundle's process settings unless `--process` gives a whole process.

use std::os::fd::AsFd;
use std::path::PathBuf;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use oci_spec::runtime::Process as SpecProcess;

use super::lifecycle::{ALL_NAMESPACES, check_preserved, console_socket, reap};
use super::state::{Dir, Status, write_atomic};
use super::{Error, Global, Result};
use crate::bundle::Bundle;
use crate::spawn::{self, Plan, Process};

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    pub id: String,
    /// A JSON file holding the whole OCI process to run.
    #[arg(long, short)]
    pub process: Option<PathBuf>,
    /// Return once the process runs instead of waiting for it.
    #[arg(long, short)]
    pub detach: bool,
    /// Where to write the process's pid.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Give the process a terminal, whose master goes to --console-socket.
    #[arg(long, short)]
    pub tty: bool,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// The working directory, over the bundle's.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// An environment variable, over the bundle's; repeatable.
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// UID[:GID] to run as.
    #[arg(long, short)]
    pub user: Option<String>,
    /// Pass descriptors 3 to 3+N-1 on to the process.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// The command and its arguments (unless --process is given).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn exec(g: &Global, args: &ExecArgs) -> Result<u8> {
    let id = &args.id;
    let dir = Dir::new(&g.root, id)?;
    let saved = dir.load()?;
    let status = saved.status(&dir);
    if !matches!(status, Status::Running | Status::Created) {
        return Err(Error::WrongStatus {
            what: "exec in",
            id: id.clone(),
            status,
        });
    }
    check_preserved(args.preserve_fds)?;
    let bundle = Bundle::load_for_runc(&saved.bundle)?;
    let process = match &args.process {
        Some(path) => {
            let text = std::fs::read(path)
                .map_err(|e| dir.io(&format!("read the process {}", path.display()), e))?;
            serde_json::from_slice::<SpecProcess>(&text)
                .map_err(|e| Error::Usage(format!("process {}: {e}", path.display())))?
        }
        None => command_line_process(&bundle, args)?,
    };
    let bundle = bundle.with_process(process.clone())?;
    let plan = Plan::new(
        &bundle,
        &Process {
            args: process.args().clone().unwrap_or_default(),
            env: process.env().clone().unwrap_or_default(),
        },
    )?;
    let pidfd = saved
        .init
        .open()
        .ok_or_else(|| Error::NotRunning(id.clone()))?;
    let cgroup = saved.cgroup()?;
    let cgroup_dir = cgroup.dir_fd()?;
    let mut forwarded = nix::sys::signal::SigSet::empty();
    if !args.detach {
        use nix::sys::signal::Signal;
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            forwarded.add(sig);
        }
        forwarded
            .thread_block()
            .map_err(|e| Error::Usage(format!("cannot block signals: {e}")))?;
    }
    let console = console_socket(
        process.terminal() == Some(true),
        args.console_socket.as_deref(),
    )?;
    let joined = spawn::spawn_exec(
        &plan,
        pidfd.as_fd(),
        ALL_NAMESPACES,
        cgroup_dir.as_ref().map(|d| d.as_fd()),
        args.preserve_fds,
        console.as_ref().map(|c| c.as_fd()),
    )?;
    let pid = joined.pid;
    if cgroup_dir.is_none()
        && let Err(e) = cgroup.add(pid)
    {
        drop(joined);
        return Err(e.into());
    }
    let child = joined.release().map_err(|report| Error::Exec {
        id: id.clone(),
        reason: report.map_or_else(
            || "the process exited before its exec".to_string(),
            |r| plan.describe(&r),
        ),
    })?;
    if let Some(path) = &args.pid_file {
        write_atomic(path, pid.to_string().as_bytes())
            .map_err(|e| dir.io(&format!("write the pid file {}", path.display()), e))?;
    }
    if args.detach {
        return Ok(0);
    }
    let signals = nix::sys::signalfd::SignalFd::new(&forwarded)
        .map_err(|e| Error::Usage(format!("cannot watch signals: {e}")))?;
    loop {
        let mut fds = [
            PollFd::new(child.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::NONE);
        if fds[1].revents().is_some_and(|r| !r.is_empty())
            && let Ok(Some(info)) = signals.read_signal()
        {
            let _ = crate::monitor::send_signal(&child, info.ssi_signo as i32);
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(reap(child.as_fd()).clamp(0, 255) as u8);
        }
    }
}

/// The bundle's process with the command line's arguments, environment, directory and
/// user over it.
fn command_line_process(bundle: &Bundle, args: &ExecArgs) -> Result<SpecProcess> {
    if args.args.is_empty() {
        return Err(Error::Usage(
            "exec needs a command, or --process with a process file".into(),
        ));
    }
    let mut process = bundle
        .spec()
        .process()
        .clone()
        .expect("checked by Bundle::load");
    process.set_args(Some(args.args.clone()));
    process.set_terminal(Some(args.tty));
    let mut env = process.env().clone().unwrap_or_default();
    for kv in &args.env {
        let name = kv.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(name));
        env.push(kv.clone());
    }
    process.set_env(Some(env));
    if let Some(cwd) = &args.cwd {
        process.set_cwd(cwd.clone());
    }
    if let Some(user) = &args.user {
        let bad = || Error::Usage(format!("--user {user:?}: expected UID[:GID]"));
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user.as_str(), None),
        };
        let mut spec_user = process.user().clone();
        spec_user.set_uid(uid.parse().map_err(|_| bad())?);
        if let Some(gid) = gid {
            spec_user.set_gid(gid.parse().map_err(|_| bad())?);
        }
        process.set_user(spec_user);
    }
    Ok(process)
}
