//! The `silo` command line.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use silo::image::Store;
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
        /// The OCI bundle directory, or the name of an image in the store (unpacked for
        /// this run into the state directory, and removed after it).
        bundle: PathBuf,
        /// Replaces the bundle's process.args.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Import, unpack and list images (the store is the state directory's images/).
    Image {
        #[command(subcommand)]
        command: ImageCommand,
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

#[derive(Subcommand)]
enum ImageCommand {
    /// Import an OCI image layout directory, or a `docker save` or `podman save` archive
    /// (tar, tar.gz or tar.zst), into the store.
    Import {
        path: PathBuf,
        /// The image's name in the store (default: the name the source gives it); with
        /// a source holding several images, also which one to import.
        #[arg(long)]
        name: Option<String>,
    },
    /// Unpack an image into a new bundle directory (config.json + rootfs/).
    Unpack {
        /// An image name in the store, or the path of a layout directory or an archive.
        image: String,
        /// The bundle directory to make (missing or empty).
        dir: PathBuf,
    },
    /// Pull an image from a registry into the store, for this machine's platform.
    Pull {
        /// registry/repository:tag or registry/repository@sha256:HEX; stored under this
        /// name.
        reference: String,
        /// Plain HTTP to the registry instead of HTTPS.
        #[arg(long)]
        insecure: bool,
        /// Log in with this user name; the password comes from SILO_REGISTRY_PASSWORD.
        #[arg(long)]
        user: Option<String>,
    },
    /// List the images in the store.
    Ls,
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
            say(format_args!("silo: {}", describe(&e)));
            ExitCode::from(125)
        }
    }
}

/// One line per blob on the terminal, rewritten as its bytes arrive.
fn show_progress(p: silo::image::pull::Progress<'_>) {
    const MIB: f64 = (1 << 20) as f64;
    let short = p.digest.strip_prefix("sha256:").unwrap_or(p.digest);
    let end = if p.done >= p.total { "\n" } else { "" };
    let _ = write!(
        std::io::stderr(),
        "\r{} {:.1} / {:.1} MiB{end}",
        &short[..short.len().min(12)],
        p.done as f64 / MIB,
        p.total as f64 / MIB,
    );
}

/// The error and its causes, each once: silo's errors already name their cause in their
/// message, and anyhow's context does not.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    // Images need no runtime (which would recover the firewall state of dead containers).
    let command = match cli.command {
        Command::Image { command } => {
            let store = open_store(&cli.state_dir)?;
            if let ImageCommand::Pull {
                reference,
                insecure,
                user,
            } = command
            {
                let password = std::env::var("SILO_REGISTRY_PASSWORD").unwrap_or_default();
                let opts = silo::image::pull::PullOptions {
                    insecure,
                    credentials: user.map(|u| (u, password)),
                    progress: std::io::stderr()
                        .is_terminal()
                        .then(|| std::sync::Arc::new(show_progress) as _),
                };
                let r = silo::image::pull::pull(&store, &reference, &opts).await?;
                writeln!(std::io::stdout(), "{} {}", r.name, r.manifest.digest())?;
                return Ok(0);
            }
            return tokio::task::spawn_blocking(move || image(&store, command)).await?;
        }
        command => command,
    };
    let config = RuntimeConfig {
        state_dir: cli.state_dir,
        cgroup_parent: cli.cgroup_parent,
        uplink: cli.uplink,
        resolvers: (!cli.resolvers.is_empty()).then_some(cli.resolvers),
        ..RuntimeConfig::default()
    };
    match command {
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
            // The handle checks the id before it names a directory below.
            let runtime = Runtime::new(config)?;
            // Nobody is left to ask how the runs of `silo run`s that were killed ended: the
            // runtime found them stopped, and they go.
            for stale in runtime.containers() {
                if stale.id().starts_with("run-") && stale.outcome().is_some() {
                    let _ = stale.destroy(None).await;
                }
            }
            let container = runtime.container(&id)?;
            let image = image_bundle(&bundle, &id, &runtime.config().state_dir).await?;
            let bundle = image.as_ref().map_or(bundle, |i| i.0.clone());
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
        Command::Image { .. } => unreachable!("handled before the runtime is made"),
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

fn open_store(state_dir: &Path) -> anyhow::Result<Store> {
    let dir = state_dir.join(silo::image::STORE_DIR);
    Store::open(&dir).with_context(|| format!("open the image store {}", dir.display()))
}

fn image(store: &Store, command: ImageCommand) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    match command {
        ImageCommand::Import { path, name } => {
            let r = silo::image::import(store, &path, name.as_deref())?;
            writeln!(out, "{} {}", r.name, r.manifest.digest())?;
        }
        ImageCommand::Unpack { image, dir } => {
            let (blobs, manifest) = silo::image::locate(store, &image)?;
            silo::image::unpack(&blobs, &manifest, &dir)?;
        }
        ImageCommand::Pull { .. } => unreachable!("pulls run on the async runtime"),
        ImageCommand::Ls => {
            writeln!(out, "{:<40} {:<19} {:>10}", "NAME", "MANIFEST", "SIZE")?;
            for r in store.list()? {
                let manifest: oci_spec::image::ImageManifest =
                    store.blobs().json(&r.manifest, "image manifest")?;
                let size: u64 = std::iter::once(manifest.config())
                    .chain(manifest.layers())
                    .map(|d| d.size())
                    .sum();
                let digest = r.manifest.digest().digest();
                let short = format!("sha256:{}", &digest[..12.min(digest.len())]);
                writeln!(out, "{:<40} {short:<19} {:>10}", r.name, human_size(size))?;
            }
        }
    }
    Ok(0)
}

/// `12.3 MiB`: a size in binary units, for people.
fn human_size(bytes: u64) -> String {
    let mut size = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if size < 1024.0 || unit == "GiB" {
            return if unit == "B" {
                format!("{bytes} B")
            } else {
                format!("{size:.1} {unit}")
            };
        }
        size /= 1024.0;
    }
    unreachable!()
}

/// A bundle unpacked from an image for one `silo run`, removed when dropped.
struct ImageBundle(PathBuf);

impl Drop for ImageBundle {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            say(format_args!(
                "silo: failed to remove the unpacked image {}: {e}",
                self.0.display()
            ));
        }
    }
}

/// When `arg` is no directory but names an image in the store, unpacks that image into a
/// bundle of this container's own under the store.
async fn image_bundle(
    arg: &Path,
    id: &str,
    state_dir: &Path,
) -> anyhow::Result<Option<ImageBundle>> {
    let name = arg.to_string_lossy().into_owned();
    // A path is a bundle, even a missing one: its error names the directory.
    if arg.is_dir() || name.starts_with('/') || name.starts_with('.') {
        return Ok(None);
    }
    let store = open_store(state_dir)?;
    let r = match store.get(&name) {
        Ok(r) => r,
        Err(silo::image::store::Error::NoSuchImage(_)) => {
            bail!("{name}: no bundle directory and no image of this name in the store")
        }
        Err(e) => return Err(e.into()),
    };
    let dir = silo::image::bundle_dir(&store, "run", id);
    std::fs::create_dir_all(dir.parent().expect("has a parent"))?;
    let unpacked = dir.clone();
    tokio::task::spawn_blocking(move || silo::image::unpack(store.blobs(), &r.manifest, &unpacked))
        .await??;
    Ok(Some(ImageBundle(dir)))
}

/// Writes a line to stderr. Unlike `eprintln!`, it does not panic when stderr is gone (a
/// closed pipe): silo must still forward signals and clean up after its container.
fn say(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{args}");
}
