//! The `silo` command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use silo::{Runtime, RuntimeConfig, StartOptions, Stdio};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "silo", version, about = "A Linux-native container runtime")]
struct Cli {
    /// Where container state and logs live.
    #[arg(
        long,
        global = true,
        default_value = "/run/silo",
        env = "SILO_STATE_DIR"
    )]
    state_dir: PathBuf,
    /// The cgroup under which containers' cgroups are made.
    #[arg(
        long,
        global = true,
        default_value = "/silo",
        env = "SILO_CGROUP_PARENT"
    )]
    cgroup_parent: String,
    /// The interface containers with internet go out of (default: the default route's).
    #[arg(long, global = true, env = "SILO_UPLINK")]
    uplink: Option<String>,
    /// A nameserver for containers with internet; repeat for more (default: the host's
    /// reachable ones).
    #[arg(long = "resolver", global = true, value_name = "IPV4")]
    resolvers: Vec<std::net::Ipv4Addr>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a container in the foreground and exit with its exit code (128+n after signal
    /// n). SIGINT, SIGTERM and SIGHUP are forwarded to it; a second SIGINT or SIGTERM
    /// destroys it.
    Run {
        /// Container id (default: run-PID).
        #[arg(long)]
        id: Option<String>,
        /// Set an environment variable, over the bundle's.
        #[arg(long = "env", short = 'e', value_name = "K=V")]
        env: Vec<String>,
        /// lite, basic, standard-1..4, or cpu=N,memory=SIZE.
        #[arg(long)]
        instance: Option<String>,
        /// Let the container out to the internet through the uplink.
        #[arg(long)]
        internet: bool,
        /// With --internet, allow only this destination (CIDR[:PORT[-PORT]]); repeatable.
        #[arg(long, value_name = "CIDR[:PORTS]", requires = "internet")]
        egress: Vec<silo::EgressRule>,
        /// The OCI bundle directory.
        bundle: PathBuf,
        /// Replaces the bundle's process.args.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Serve the HTTP API (docs/api.md) until SIGTERM or SIGINT, which destroy the
    /// containers.
    Serve {
        /// unix:PATH, or HOST:PORT (beyond loopback only with --token-file).
        #[arg(long, default_value = silo::daemon::DEFAULT_LISTEN)]
        listen: silo::daemon::Listen,
        /// A file holding the bearer token that every request must carry.
        #[arg(long)]
        token_file: Option<std::path::PathBuf>,
        /// On SIGTERM or SIGINT, leave the containers running for the next daemon to adopt
        /// instead of destroying them.
        #[arg(long)]
        leave_running: bool,
    },
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The form runc prints, which the shims parse, for both modes.
    if args.len() == 2 && matches!(args[1].to_str(), Some("--version" | "-v")) {
        print!("{}", silo::runc::version());
        return ExitCode::SUCCESS;
    }
    // Before anything starts a thread: runc mode clones the container's init from this
    // very process.
    if silo::runc::wanted(&args) {
        return ExitCode::from(silo::runc::main(args));
    }
    tracing_subscriber::fmt()
        .with_env_filter(silo::log_filter())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            say(format_args!("silo: {e:#}"));
            ExitCode::from(125)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let config = RuntimeConfig {
        state_dir: cli.state_dir,
        cgroup_parent: cli.cgroup_parent,
        uplink: cli.uplink,
        resolvers: (!cli.resolvers.is_empty()).then_some(cli.resolvers),
        ..RuntimeConfig::default()
    };
    match cli.command {
        Command::Run {
            id,
            env,
            instance,
            internet,
            egress,
            bundle,
            args,
        } => {
            let id = id.unwrap_or_else(|| format!("run-{}", std::process::id()));
            let mut vars = BTreeMap::new();
            for kv in env {
                let Some((k, v)) = kv.split_once('=') else {
                    bail!("--env {kv:?}: expected NAME=VALUE");
                };
                vars.insert(k.to_string(), v.to_string());
            }
            let opts = StartOptions {
                bundle,
                env: vars,
                entrypoint: (!args.is_empty()).then_some(args),
                instance: instance.map(|i| i.parse()).transpose()?,
                enable_internet: internet,
                egress,
                stdio: Stdio::Inherit,
            };
            // Watch the signals before the container exists, so that none that arrives
            // once it runs can end silo instead of reaching the container.
            let mut term = signal(SignalKind::terminate()).context("watch SIGTERM")?;
            let mut int = signal(SignalKind::interrupt()).context("watch SIGINT")?;
            let mut hup = signal(SignalKind::hangup()).context("watch SIGHUP")?;
            let runtime = Runtime::new(config)?;
            let container = runtime.container(&id)?;
            container.start(opts).await?;
            // The first SIGINT or SIGTERM is the container's to handle; it may ignore it
            // (a PID 1 without a handler does), so a second one destroys it.
            let mut asked = false;
            let result = loop {
                let sig = tokio::select! {
                    r = container.monitor() => break r,
                    _ = term.recv() => libc::SIGTERM,
                    _ = int.recv() => libc::SIGINT,
                    _ = hup.recv() => libc::SIGHUP,
                };
                if asked && sig != libc::SIGHUP {
                    say(format_args!(
                        "silo: signal {sig} again: destroying container {id}"
                    ));
                    let reason = format!("destroyed after signal {sig} was sent twice");
                    container.destroy(Some(reason)).await?;
                } else {
                    asked |= sig != libc::SIGHUP;
                    let _ = container.signal(sig).await;
                }
            };
            let outcome = container.outcome();
            tracing::debug!(?outcome, "run finished");
            container.destroy(None).await?;
            match result {
                Ok(()) => Ok(0),
                Err(silo::Error::Exit(exit)) if exit.boot_error.is_some() => {
                    say(format_args!("silo: {exit}"));
                    Ok(127)
                }
                Err(silo::Error::Exit(exit)) => Ok(exit.code.clamp(0, 255) as u8),
                Err(e) => Err(e.into()),
            }
        }
        Command::Serve {
            listen,
            token_file,
            leave_running,
        } => {
            let config = silo::daemon::Config {
                listen,
                state_dir: config.state_dir,
                cgroup_parent: config.cgroup_parent,
                token_file,
                leave_running,
            };
            silo::daemon::run(config).await?;
            Ok(0)
        }
    }
}

/// Writes a line to stderr. Unlike `eprintln!`, it does not panic when stderr is gone (a
/// closed pipe): silo must still forward signals and clean up after its container.
fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{args}");
}
