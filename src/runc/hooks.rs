//! OCI hooks: programs the bundle names, run at points of the lifecycle with the
//! container's state on their stdin, each within its timeout.
//!
//! `prestart`, `createRuntime`, `poststart` and `poststop` run in silo's own namespaces,
//! the first two (as with runc) once the init's mounts are in place and before its root is
//! switched. `createContainer` runs then too, in the container's mount namespace (so its
//! path is the host's), and `startContainer` in all of the container's namespaces once
//! its root is switched (its path is the container's): the hook process joins them
//! through the init's pidfd before it execs.

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

use super::{Error, Result};

/// Where in the lifecycle a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Prestart => "prestart",
            Kind::CreateRuntime => "createRuntime",
            Kind::CreateContainer => "createContainer",
            Kind::StartContainer => "startContainer",
            Kind::Poststart => "poststart",
            Kind::Poststop => "poststop",
        })
    }
}

/// The hooks of `kind` among `hooks` (the bundle's).
pub fn of(hooks: Option<&oci_spec::runtime::Hooks>, kind: Kind) -> Vec<Hook> {
    let Some(hooks) = hooks else {
        return Vec::new();
    };
    #[allow(deprecated)] // prestart is deprecated in the spec, and still used.
    let list = match kind {
        Kind::Prestart => hooks.prestart(),
        Kind::CreateRuntime => hooks.create_runtime(),
        Kind::CreateContainer => hooks.create_container(),
        Kind::StartContainer => hooks.start_container(),
        Kind::Poststart => hooks.poststart(),
        Kind::Poststop => hooks.poststop(),
    };
    list.clone().unwrap_or_default()
}

/// How long a hook without a timeout of its own may run.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `hooks` in order, each with `state` on its stdin; `join` is the init's pidfd and
/// the namespaces (CLONE_NEW* flags) to join first. The first failure ends the run.
pub fn run(
    kind: Kind,
    hooks: &[Hook],
    state: &[u8],
    join: Option<(BorrowedFd<'_>, libc::c_int)>,
) -> Result<()> {
    for hook in hooks {
        run_one(kind, hook, state, join)?;
    }
    Ok(())
}

fn run_one(
    kind: Kind,
    hook: &Hook,
    state: &[u8],
    join: Option<(BorrowedFd<'_>, libc::c_int)>,
) -> Result<()> {
    let path = hook.path();
    let fail = |reason: String| Error::Hook {
        kind: kind.to_string(),
        path: path.display().to_string(),
        reason,
    };
    let mut cmd = Command::new(path);
    let args = hook.args().clone().unwrap_or_default();
    if let Some((arg0, rest)) = args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((pidfd, flags)) = join {
        let fd = pidfd.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and makes one raw
        // syscall, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    // Read as it comes, so that a hook that says much never blocks on a full pipe.
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
            text
        })
    });
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state is no failure.
        let _ = stdin.write_all(state);
    }
    let timeout = hook
        .timeout()
        .filter(|t| *t > 0)
        .map_or(DEFAULT_TIMEOUT, |t| Duration::from_secs(t as u64));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("timed out after {}s", timeout.as_secs())));
            }
            Err(e) => return Err(fail(format!("cannot wait for it: {e}"))),
        }
    };
    if status.success() {
        return Ok(());
    }
    // A process the hook left behind may still hold the pipe: then its end is not awaited.
    std::thread::sleep(Duration::from_millis(10));
    let stderr = stderr
        .filter(|reader| reader.is_finished())
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    let stderr = stderr.trim();
    let said = if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    };
    Err(fail(format!("{status}{said}")))
}
