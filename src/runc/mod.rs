//! runc's command line, so that orchestrators that drive runtimes through it (containerd's
//! runc shim, CRI-O, Podman's conmon) can run silo as their OCI runtime.
//!
//! Every command is a short-lived process; what a container is between commands lives in
//! its directory below `--root` (see [`state`]). Unlike silo's own start, `create` clones
//! the init as its own child without a keeper (see [`crate::spawn::spawn_direct`]) and
//! exits, so that the caller, which made itself a subreaper, inherits and reaps it. The init
//! does its whole setup, then waits on an exec FIFO until `start` reads it.
//!
//! This module is the command line's: unlike the rest of the library it writes its output
//! (`state`'s JSON, `list`'s table) to stdout, because that output is runc's interface.
//! Errors go to the log (`--log`, `--log-format json` for the shims) and to stderr.

mod cgroups;
mod exec;
mod hooks;
mod info;
mod lifecycle;
mod log;
mod state;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where runc mode keeps container state unless `--root` says otherwise. Not silo's own
/// `/run/silo`: a silo runtime there would take these directories for its own.
pub const DEFAULT_ROOT: &str = "/run/silo-runc";

/// Errors of runc mode's commands. The messages hold the words the shims match on:
/// "does not exist" and "container not running".
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bundle(#[from] crate::bundle::Error),
    #[error(transparent)]
    Spawn(#[from] crate::spawn::Error),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::Error),
    #[error(transparent)]
    Silo(#[from] Box<crate::Error>),
    #[error("invalid container id {0:?}: use 1 to 64 of A-Z a-z 0-9 _ . - (not first)")]
    InvalidId(String),
    #[error("container \"{0}\" does not exist")]
    NotExist(String),
    #[error("container with id {0} already exists")]
    Exists(String),
    #[error("cannot signal container {0}: container not running")]
    NotRunning(String),
    #[error("cannot {what} container {id}: it is {status}")]
    WrongStatus {
        what: &'static str,
        id: String,
        status: state::Status,
    },
    #[error("cannot delete container {id} that is not stopped: {status}")]
    NotStopped { id: String, status: state::Status },
    #[error("unknown signal {0:?}: use a name (TERM, SIGTERM) or a number from 1 to 64")]
    Signal(String),
    #[error("container {id} failed to start: {reason}")]
    Boot { id: String, reason: String },
    #[error("exec in container {id} failed: {reason}")]
    Exec { id: String, reason: String },
    #[error("{kind} hook {path} failed: {reason}")]
    Hook {
        kind: String,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("failed to {what} for container {id}: {source}")]
    Io {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// runc's global options.
#[derive(Parser, Debug)]
#[command(
    name = "silo",
    about = "silo as a runc-compatible OCI runtime",
    disable_version_flag = true
)]
struct Cli {
    /// Where container state lives.
    #[arg(long, default_value = DEFAULT_ROOT, global = true)]
    root: PathBuf,
    /// Where log lines go (default: stderr).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: log::Format,
    /// Log at debug level.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for the orchestrators that pass it. silo does not talk to systemd: a
    /// `slice:prefix:name` cgroupsPath becomes the cgroup `slice/prefix-name.scope` below
    /// silo's cgroup parent.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// The cgroup below which every container's cgroup is made (see the README).
    #[arg(
        long,
        default_value = "/silo",
        env = "SILO_CGROUP_PARENT",
        global = true
    )]
    cgroup_parent: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a container: its init is set up and waits for `start`.
    Create(lifecycle::CreateArgs),
    /// Let a created container's init exec its process.
    Start { id: String },
    /// Print a container's state as JSON.
    State { id: String },
    /// Send a signal (default SIGTERM) to a container's init, or with --all to all of it.
    Kill {
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
        #[arg(long, short)]
        all: bool,
    },
    /// Delete a stopped (or, with --force, any) container and its cgroup.
    Delete {
        id: String,
        #[arg(long, short)]
        force: bool,
    },
    /// Create and start a container; without --detach, wait for it and delete it.
    Run(lifecycle::RunArgs),
    /// Run another process in a running container.
    Exec(exec::ExecArgs),
    /// List the processes of a container.
    Ps {
        id: String,
        #[arg(long, short, default_value = "table")]
        format: info::ListFormat,
        /// Arguments for ps(1) (default: -ef).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// List the containers below the root.
    List {
        #[arg(long, short, default_value = "table")]
        format: info::ListFormat,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Print what this runtime supports, as JSON (the OCI features document).
    Features,
    /// Write a starter config.json into the bundle directory.
    Spec {
        #[arg(long, short, default_value = ".")]
        bundle: PathBuf,
        #[arg(long)]
        rootless: bool,
    },
}

/// The runc global options and the commands that only runc mode has; either makes a
/// command line runc's. `run` is silo's own unless one of these comes first.
const GLOBAL_OPTIONS: &[&str] = &[
    "--root",
    "--log",
    "--log-format",
    "--debug",
    "--systemd-cgroup",
];
const COMMANDS: &[&str] = &[
    "create", "start", "state", "kill", "delete", "exec", "ps", "list", "pause", "resume",
    "features", "spec",
];

/// Whether `args` (with the program name first) are a runc command line: when silo is run
/// as `runc` (a symlink of that name), or when the first argument is one of runc's global
/// options or of the commands only runc mode has.
pub fn wanted(args: &[OsString]) -> bool {
    let name = args
        .first()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str());
    if name == Some("runc") {
        return true;
    }
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return false;
    };
    let option = first.split('=').next().unwrap_or(first);
    GLOBAL_OPTIONS.contains(&option) || COMMANDS.contains(&first)
}

/// The first lines of `--version`, in the form runc prints and the shims parse
/// (`runc version 1.1.5`, then `spec: ...`).
pub fn version() -> String {
    format!(
        "silo version {}\nspec: {}\n",
        env!("CARGO_PKG_VERSION"),
        state::OCI_VERSION
    )
}

/// Runs a runc command line and returns the process's exit code: 0, or 1 after an error,
/// which goes to the log and to stderr. Must run before any other thread starts (the
/// spawn's discipline).
pub fn main(args: Vec<OsString>) -> u8 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 1 } else { 0 };
        }
    };
    if let Err(e) = log::init(cli.log.as_deref(), cli.log_format, cli.debug) {
        let path = cli.log.as_deref().unwrap_or(std::path::Path::new("-"));
        say(format_args!(
            "silo: cannot open log {}: {e}",
            path.display()
        ));
    }
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            if cli.log.is_some() {
                say(format_args!("silo: {e}"));
            }
            1
        }
    }
}

/// What every command gets from the global options.
pub(crate) struct Global {
    pub root: PathBuf,
    pub cgroup_parent: String,
    pub systemd_cgroup: bool,
}

fn run(cli: &Cli) -> Result<u8> {
    let g = Global {
        root: cli.root.clone(),
        cgroup_parent: cli.cgroup_parent.clone(),
        systemd_cgroup: cli.systemd_cgroup,
    };
    match &cli.command {
        Command::Create(args) => lifecycle::create(&g, args).map(|()| 0),
        Command::Start { id } => lifecycle::start(&g, id).map(|()| 0),
        Command::State { id } => info::state(&g, id).map(|()| 0),
        Command::Kill { id, signal, all } => lifecycle::kill(&g, id, signal, *all).map(|()| 0),
        Command::Delete { id, force } => lifecycle::delete(&g, id, *force).map(|()| 0),
        Command::Run(args) => lifecycle::run(&g, args),
        Command::Exec(args) => exec::exec(&g, args),
        Command::Ps {
            id,
            format,
            ps_args,
        } => info::ps(&g, id, *format, ps_args).map(|()| 0),
        Command::List { format, quiet } => info::list(&g, *format, *quiet).map(|()| 0),
        Command::Pause { id } => lifecycle::pause(&g, id, true).map(|()| 0),
        Command::Resume { id } => lifecycle::pause(&g, id, false).map(|()| 0),
        Command::Features => info::features().map(|()| 0),
        Command::Spec { bundle, rootless } => info::spec(bundle, *rootless).map(|()| 0),
    }
}

/// Writes a line to stderr, ignoring a closed stderr.
fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{args}");
}

/// Writes the command's output to stdout, ignoring a closed stdout (a caller that stopped
/// reading).
fn print(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn runc_mode_is_told_from_silos_own() {
        assert!(wanted(&args("silo --root /tmp/x run id")));
        assert!(wanted(&args("silo --log-format=json create id")));
        assert!(wanted(&args("/usr/bin/runc run id")));
        assert!(wanted(&args("silo state id")));
        assert!(!wanted(&args("silo run bundle")));
        assert!(!wanted(&args("silo serve")));
        assert!(!wanted(&args("silo")));
    }

    #[test]
    fn version_starts_like_runcs() {
        let v = version();
        let first = v.lines().next().unwrap();
        assert!(first.starts_with("silo version "), "{first}");
    }
}
