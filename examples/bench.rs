//! The measurements behind `scripts/bench` that need the library or the daemon: start
//! latency, monitor latency, destroy time, the cost of each part of a start, start+destroy
//! rate, density, and traffic through a container's ports and through the daemon.
//!
//! Each subcommand prints a markdown section on stdout and appends one row per goal it
//! checks to the `--goals` file. Run as root, with a state directory and a cgroup parent of
//! its own so that nothing it makes can be confused with anyone else's containers:
//!
//! ```sh
//! bench --bundle B --state-dir /tmp/x/state --cgroup-parent /silo/bench-1 --goals g.md lifecycle
//! ```
//!
//! Every loop is bounded in count and in time, and traffic goes only to the containers'
//! own addresses and to the daemon's unix socket.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use silo::cgroup::{Cgroup, Limits};
use silo::firewall::Egress;
use silo::{Container, Runtime, RuntimeConfig, StartOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// The program every idle container runs: it blocks until a signal ends it.
const SLEEP: &[&str] = &["/bin/testprog", "sleep"];
/// Prints the time its `main` began, then blocks like `SLEEP`.
const STAMP_SLEEP: &[&str] = &["/bin/testprog", "stamp", "sleep"];
/// An HTTP server on 8080 and a TCP echo server on 7000.
const SERVERS: &[&str] = &["/bin/testprog", "serve", "8080", "echo", "7000"];
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;

#[derive(Parser)]
#[command(about = "silo's benchmarks that need the library (see scripts/bench)")]
struct Cli {
    /// The OCI bundle the containers run (rootfs/build/bundle), with testprog inside.
    #[arg(long)]
    bundle: PathBuf,
    /// The runtime's state directory: a fresh one, not /run/silo.
    #[arg(long)]
    state_dir: PathBuf,
    /// The cgroup parent of every container made here: a fresh one below /silo.
    #[arg(long)]
    cgroup_parent: String,
    /// Where to append a `| goal | measured | met |` row for each goal checked.
    #[arg(long)]
    goals: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start to first instruction, start() itself, monitor latency and destroy time.
    Lifecycle {
        #[arg(long, default_value_t = 40)]
        runs: usize,
        /// Names the bundle in the output, and prefixes the container ids.
        #[arg(long, default_value = "net")]
        label: String,
        /// Whether this run's results are held against the goals.
        #[arg(long)]
        check_goals: bool,
    },
    /// What each part of a start and a destroy costs on its own.
    Parts {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Containers started and destroyed per second, sustained.
    Rate {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Start+destroy loops running at once.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Names the run in the output (say, `1 core`), and checks the goal when it is
        /// the machine's full size.
        #[arg(long, default_value = "all cores")]
        label: String,
        #[arg(long)]
        check_goals: bool,
    },
    /// N idle containers at once, held by this process: its memory per container, and the
    /// time to start and destroy them all.
    Density {
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Starting stops here, whatever the count reached.
        #[arg(long, default_value_t = 180)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
    /// The same through `silo serve`: the daemon's memory per container.
    DaemonDensity {
        /// The silo binary to run the daemon from.
        #[arg(long)]
        silo: PathBuf,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 180)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
    /// Takes back what a crashed run left: the runtime's recovery (veths and firewall state
    /// of containers whose init is gone) and the firewall's garbage collection.
    Recover,
    /// HTTP requests and echoed bytes per second, through silo and directly.
    Traffic {
        /// The silo binary to run the daemon from.
        #[arg(long)]
        silo: PathBuf,
        /// Length of each measurement, in one-second windows.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Requests in flight at once; one measurement per value.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        concurrency: Vec<usize>,
        /// Bytes echoed per throughput run, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Throughput runs per path.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds of sustained load on one container, without `Connection: close`.
        #[arg(long, default_value_t = 10)]
        sustain: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(silo::log_filter())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    raise_fd_limit();
    let rt = tokio::runtime::Runtime::new().context("start a tokio runtime")?;
    let section = rt.block_on(run(&cli))?;
    print!("{section}");
    Ok(())
}

/// Density needs several descriptors per container: take the whole hard limit (never more:
/// raising the hard limit needs CAP_SYS_RESOURCE, which root lacks here).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

async fn run(cli: &Cli) -> anyhow::Result<String> {
    let mut goals = Goals::default();
    let section = match &cli.command {
        Command::Lifecycle {
            runs,
            label,
            check_goals,
        } => {
            let runtime = runtime(cli)?;
            let goals = check_goals.then_some(&mut goals);
            lifecycle(&runtime, &cli.bundle, *runs, label, goals).await?
        }
        Command::Parts { runs } => parts(cli, *runs).await?,
        Command::Recover => {
            runtime(cli)?;
            silo::firewall::collect_garbage()?;
            String::new()
        }
        Command::Rate {
            seconds,
            workers,
            label,
            check_goals,
        } => {
            let runtime = Arc::new(runtime(cli)?);
            let goals = check_goals.then_some(&mut goals);
            rate(runtime, &cli.bundle, *seconds, *workers, label, goals).await?
        }
        Command::Density {
            count,
            seconds,
            workers,
        } => {
            let runtime = Arc::new(runtime(cli)?);
            density(cli, runtime, *count, *seconds, *workers, &mut goals).await?
        }
        Command::DaemonDensity {
            silo,
            count,
            seconds,
            workers,
        } => daemon_density(cli, silo, *count, *seconds, *workers, &mut goals).await?,
        Command::Traffic {
            silo,
            seconds,
            concurrency,
            mib,
            runs,
            sustain,
        } => {
            let runtime = runtime(cli)?;
            let opts = TrafficOpts {
                seconds: *seconds,
                concurrency: concurrency.clone(),
                bytes: mib << 20,
                runs: *runs,
                sustain: *sustain,
            };
            traffic(cli, &runtime, silo, &opts, &mut goals).await?
        }
    };
    goals.append_to(&cli.goals)?;
    Ok(section)
}

fn runtime(cli: &Cli) -> anyhow::Result<Runtime> {
    Ok(Runtime::new(RuntimeConfig {
        state_dir: cli.state_dir.clone(),
        cgroup_parent: cli.cgroup_parent.clone(),
        ..RuntimeConfig::default()
    })?)
}

fn start_opts(bundle: &Path, args: &[&str]) -> StartOptions {
    StartOptions {
        bundle: bundle.to_path_buf(),
        entrypoint: Some(args.iter().map(|a| a.to_string()).collect()),
        ..StartOptions::default()
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and output

/// Median, min and max of a set of samples.
#[derive(Clone, Copy, Debug)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Stats {
    fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }

    fn of_durations(samples: &[Duration]) -> Option<Stats> {
        Stats::of(
            &samples
                .iter()
                .map(Duration::as_secs_f64)
                .collect::<Vec<_>>(),
        )
    }
}

/// A duration given in seconds, in the unit that suits it.
fn dur(secs: f64) -> String {
    if secs >= 1.0 {
        format!("{secs:.2} s")
    } else if secs >= 1e-3 {
        format!("{:.2} ms", secs * 1e3)
    } else {
        format!("{:.0} µs", secs * 1e6)
    }
}

fn bytes_per_sec(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB/s", b / 1e9)
    } else {
        format!("{:.0} MB/s", b / 1e6)
    }
}

fn per_sec(x: f64) -> String {
    format!("{x:.0}/s")
}

fn kib(bytes: f64) -> String {
    format!("{:.0} KiB", bytes / 1024.0)
}

/// A markdown table with a header row.
struct Table {
    text: String,
}

impl Table {
    fn new(columns: &[&str]) -> Table {
        let mut text = format!("| {} |\n", columns.join(" | "));
        text.push_str(&format!("|{}\n", " --- |".repeat(columns.len())));
        Table { text }
    }

    fn row(&mut self, cells: &[String]) {
        let _ = writeln!(self.text, "| {} |", cells.join(" | "));
    }

    /// A `what | median | min | max | n | note` row.
    fn stats(&mut self, what: &str, s: Option<Stats>, fmt: fn(f64) -> String, note: &str) {
        match s {
            Some(s) => self.row(&[
                what.to_string(),
                fmt(s.median),
                fmt(s.min),
                fmt(s.max),
                s.n.to_string(),
                note.to_string(),
            ]),
            None => self.row(&[
                what.to_string(),
                "n/a".into(),
                "n/a".into(),
                "n/a".into(),
                "0".into(),
                note.to_string(),
            ]),
        }
    }
}

const STATS_COLUMNS: &[&str] = &["measure", "median", "min", "max", "n", "note"];

/// Rows for the summary of goals, appended to the `--goals` file.
#[derive(Default)]
struct Goals {
    rows: Vec<String>,
}

impl Goals {
    fn check(&mut self, goal: &str, measured: String, met: bool) {
        let verdict = if met { "yes" } else { "**no**" };
        self.rows
            .push(format!("| {goal} | {measured} | {verdict} |"));
    }

    fn append_to(&self, path: &Path) -> anyhow::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        for r in &self.rows {
            writeln!(f, "{r}").with_context(|| format!("write {}", path.display()))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// What is left behind

/// Containers' resources found after they were all destroyed: cgroups below `parent` in
/// any hierarchy and state directories whose names start with `prefix`, and host ends of
/// veths that still exist.
fn leftovers(parent: &str, prefix: &str, veths: &[String], state_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let parent = parent.trim_matches('/');
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let dir = h.path().join(parent);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir())
                    && e.file_name().to_string_lossy().starts_with(prefix)
                {
                    found.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    for v in veths {
        if Path::new("/sys/class/net").join(v).exists() {
            found.push(format!("veth {v}"));
        }
    }
    if let Ok(entries) = std::fs::read_dir(state_dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir())
                && e.file_name().to_string_lossy().starts_with(prefix)
            {
                found.push(format!("state {}", e.path().display()));
            }
        }
    }
    found
}

fn leftover_note(found: &[String]) -> String {
    if found.is_empty() {
        "nothing left behind (no cgroup below the parent, no veth, no state directory)".into()
    } else {
        let shown: Vec<&str> = found.iter().take(5).map(String::as_str).collect();
        format!("**{} left behind**: {}", found.len(), shown.join(", "))
    }
}

/// The data behind a mutex. No task panics while holding one of the benchmark's locks, so
/// a poisoned lock cannot happen.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("a benchmark lock is never poisoned")
}

/// This process's or another's resident set size, in bytes.
fn rss(pid: Option<u32>) -> anyhow::Result<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))?;
    Ok(kb * 1024.0)
}

// ---------------------------------------------------------------------------------------
// Lifecycle

/// The start time `testprog stamp` printed into the container's log, in ns since the epoch.
async fn wait_stamp(c: &Container, within: Duration) -> anyhow::Result<u128> {
    let path = c.log_path();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Some(ns) = text
                .lines()
                .find_map(|l| l.strip_prefix("start_ns="))
                .and_then(|v| v.trim().parse().ok())
        {
            return Ok(ns);
        }
        if Instant::now() > deadline {
            bail!("container {} printed no start_ns within {within:?}", c.id());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn epoch_ns(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

fn pidfd_open(pid: u32) -> anyhow::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it
    // touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("pidfd_open {pid}"));
    }
    // SAFETY: the descriptor was just returned to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// From the kernel reporting the init's exit to `monitor()` completing. A thread of our own
/// blocks on a pidfd of the init, so the exit is timed by the same kind of wake-up that
/// silo's monitor gets, independently of silo.
async fn monitor_latency(c: &Container) -> anyhow::Result<Duration> {
    let pid = c.pid().context("the container is not running")?;
    let pidfd = pidfd_open(pid)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        let _ = ready_tx.send(());
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and the pidfd outlives the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        (n == 1).then(Instant::now)
    });
    ready_rx.recv().context("the exit watcher thread died")?;
    // Let the watcher get into poll before the exit can happen.
    tokio::time::sleep(Duration::from_millis(2)).await;
    c.signal(libc::SIGTERM).await?;
    // testprog exits 143 on SIGTERM, which monitor reports as an error: expected.
    let _ = c.monitor().await;
    let done = Instant::now();
    let exited = tokio::task::spawn_blocking(move || watcher.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the exit watcher thread panicked"))?
        .context("the init did not exit within 10 s of SIGTERM")?;
    Ok(done.saturating_duration_since(exited))
}

async fn lifecycle(
    runtime: &Runtime,
    bundle: &Path,
    runs: usize,
    label: &str,
    goals: Option<&mut Goals>,
) -> anyhow::Result<String> {
    const WARMUP: usize = 2;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut returned, mut first, mut monitor, mut destroy) = (vec![], vec![], vec![], vec![]);
    let mut veths = Vec::new();
    for i in 0..runs + WARMUP {
        if Instant::now() > deadline {
            break;
        }
        let c = runtime.container(&format!("lat-{label}-{i}"))?;
        let wall = SystemTime::now();
        let t0 = Instant::now();
        c.start(start_opts(bundle, STAMP_SLEEP)).await?;
        let ret = t0.elapsed();
        if let Some(link) = c.network_link().await {
            veths.push(link.host_if);
        }
        let stamp = match wait_stamp(&c, Duration::from_secs(5)).await {
            Ok(s) => s,
            Err(e) => {
                c.destroy(None).await?;
                return Err(e);
            }
        };
        let first_ns = stamp.saturating_sub(epoch_ns(wall));
        if i % 2 == 0 {
            let m = monitor_latency(&c).await;
            c.destroy(None).await?;
            if i >= WARMUP {
                monitor.push(m?);
            }
        } else {
            let t = Instant::now();
            c.destroy(None).await?;
            if i >= WARMUP {
                destroy.push(t.elapsed());
            }
        }
        if i >= WARMUP {
            returned.push(ret);
            first.push(Duration::from_nanos(first_ns as u64));
        }
    }

    let s_first = Stats::of_durations(&first);
    let s_ret = Stats::of_durations(&returned);
    let s_mon = Stats::of_durations(&monitor);
    let s_destroy = Stats::of_durations(&destroy);
    let mut t = Table::new(STATS_COLUMNS);
    t.stats(
        "start() to the entrypoint's first instruction",
        s_first,
        dur,
        "goal < 3 ms (with networking)",
    );
    t.stats("start() returns", s_ret, dur, "");
    t.stats(
        "init exits to monitor() completing",
        s_mon,
        dur,
        "goal < 1 ms",
    );
    t.stats(
        "destroy() of a running idle container",
        s_destroy,
        dur,
        "goal < 5 ms",
    );
    let left = leftovers(
        &runtime.config().cgroup_parent,
        "",
        &veths,
        &runtime.config().state_dir,
    );
    if let Some(goals) = goals {
        if let Some(s) = s_first {
            goals.check(
                "start to first instruction under 3 ms, with networking",
                format!("{} median", dur(s.median)),
                s.median < 3e-3,
            );
        }
        if let Some(s) = s_mon {
            goals.check(
                "monitor latency under 1 ms",
                format!("{} median", dur(s.median)),
                s.median < 1e-3,
            );
        }
        if let Some(s) = s_destroy {
            goals.check(
                "destroy under 5 ms",
                format!("{} median", dur(s.median)),
                s.median < 5e-3,
            );
        }
    }
    Ok(format!(
        "{}\nBundle: {label}. Entrypoint `testprog stamp sleep`; {WARMUP} warm-up runs not \
         counted; monitor latency on even runs, destroy on odd runs; {}.\n",
        t.text,
        leftover_note(&left)
    ))
}

// ---------------------------------------------------------------------------------------
// Parts of a start

/// A fresh network namespace, alive as long as the returned descriptor.
fn new_netns() -> anyhow::Result<std::fs::File> {
    // unshare(CLONE_NEWNET) moves only the calling thread, so a throwaway thread makes the
    // namespace and hands back a descriptor that keeps it alive after the thread is gone.
    std::thread::spawn(|| -> anyhow::Result<std::fs::File> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare a netns")?;
        std::fs::File::open("/proc/thread-self/ns/net").context("open the new netns")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the netns thread panicked"))?
}

/// Times each piece of a start and a destroy that the library exposes, `runs` times, with
/// whatever other containers exist at the moment.
async fn time_parts(cli: &Cli, runs: usize, tag: &str) -> anyhow::Result<Table> {
    use std::os::fd::AsFd;
    let pool = silo::network::AddressPool::default();
    let parent = cli.cgroup_parent.trim_matches('/').to_string();
    let limits = Limits {
        pids: Some(4096),
        pids_is_default: true,
        ..Limits::default()
    };
    let mut m: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut veths = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        silo::bundle::Bundle::load(&cli.bundle)?;
        m.entry("a. read and check the bundle")
            .or_default()
            .push(t.elapsed());

        let t = Instant::now();
        let cg = Cgroup::create(&parent, &format!("parts-{tag}-{i}"), &limits)?;
        m.entry("b. create the cgroup (pids limit)")
            .or_default()
            .push(t.elapsed());

        let mut sleeper = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .context("spawn sleep")?;
        let t = Instant::now();
        let added = cg.add(sleeper.id());
        let took = t.elapsed();
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        added?;
        m.entry("b2. move a process into the cgroup")
            .or_default()
            .push(took);

        let ns = new_netns()?;
        let t = Instant::now();
        let link = silo::network::attach(&pool, ns.as_fd()).await?;
        m.entry("c. veth pair: create, address, up")
            .or_default()
            .push(t.elapsed());
        veths.push(link.host_if.clone());

        let t = Instant::now();
        silo::firewall::apply(&link, &Egress::None)?;
        m.entry("d. firewall: apply the container's policy")
            .or_default()
            .push(t.elapsed());

        let t = Instant::now();
        let out = std::process::Command::new("nft")
            .args(["-j", "list", "table", "inet", "silo"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if out.is_ok() {
            m.entry("(one `nft -j list table inet silo` run)")
                .or_default()
                .push(t.elapsed());
        }

        let t = Instant::now();
        silo::firewall::remove(&link.host_if)?;
        m.entry("e. firewall: remove the container's policy")
            .or_default()
            .push(t.elapsed());

        let t = Instant::now();
        silo::network::detach(&link).await?;
        m.entry("f. veth pair: delete")
            .or_default()
            .push(t.elapsed());
        drop(ns);

        let t = Instant::now();
        cg.kill_all()?;
        cg.remove()?;
        m.entry("g. cgroup: kill all, remove")
            .or_default()
            .push(t.elapsed());
    }
    let mut t = Table::new(STATS_COLUMNS);
    for (what, v) in &m {
        t.stats(what, Stats::of_durations(v), dur, "");
    }
    let left = leftovers(
        &cli.cgroup_parent,
        &format!("parts-{tag}-"),
        &veths,
        Path::new("/nonexistent"),
    );
    if !left.is_empty() {
        bail!("the parts left {}", leftover_note(&left));
    }
    Ok(t)
}

async fn parts(cli: &Cli, runs: usize) -> anyhow::Result<String> {
    let t = time_parts(cli, runs, "idle").await?;
    Ok(format!(
        "{}\nEach step run alone through silo's public modules, in the order a start and a \
         destroy run them; the clone of the init, its mounts and pivot_root are not exposed \
         and make up the rest of start().\n",
        t.text
    ))
}

// ---------------------------------------------------------------------------------------
// Start rate

/// Counts per one-second window while `work` runs, for `seconds` windows.
async fn per_second(counter: &AtomicU64, seconds: u64) -> Vec<f64> {
    let mut windows = Vec::new();
    let mut last = counter.load(Ordering::Relaxed);
    let mut last_t = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for _ in 0..seconds {
        tick.tick().await;
        let now = counter.load(Ordering::Relaxed);
        let now_t = Instant::now();
        windows.push((now - last) as f64 / (now_t - last_t).as_secs_f64());
        last = now;
        last_t = now_t;
    }
    windows
}

async fn rate(
    runtime: Arc<Runtime>,
    bundle: &Path,
    seconds: u64,
    workers: usize,
    label: &str,
    goals: Option<&mut Goals>,
) -> anyhow::Result<String> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let veths: Arc<Mutex<Vec<String>>> = Arc::default();
    let tag: String = label
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (runtime, done, stop, errors, veths) = (
            runtime.clone(),
            done.clone(),
            stop.clone(),
            errors.clone(),
            veths.clone(),
        );
        let bundle = bundle.to_path_buf();
        let tag = tag.clone();
        tasks.push(tokio::spawn(async move {
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let result = async {
                    let c = runtime.container(&format!("rate-{tag}-{w}-{k}"))?;
                    c.start(start_opts(&bundle, SLEEP)).await?;
                    if let Some(link) = c.network_link().await {
                        locked(&veths).push(link.host_if);
                    }
                    c.destroy(None).await?;
                    anyhow::Ok(())
                }
                .await;
                match result {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let failures = {
                            let mut errors = locked(&errors);
                            errors.push(format!("{e:#}"));
                            errors.len()
                        };
                        if failures >= 20 {
                            stop.store(true, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    let t0 = Instant::now();
    let windows = per_second(&done, seconds).await;
    stop.store(true, Ordering::Relaxed);
    let counted = done.load(Ordering::Relaxed);
    let elapsed = t0.elapsed();
    for t in tasks {
        t.await?;
    }
    let total = done.load(Ordering::Relaxed);
    let s = Stats::of(&windows);
    let mut t = Table::new(STATS_COLUMNS);
    t.stats(
        &format!("start+destroy per second, {label}, {workers} loops"),
        s,
        per_sec,
        &format!(
            "{:.0}/s overall ({counted} in {:.1} s)",
            counted as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64()
        ),
    );
    let errors = locked(&errors).clone();
    let left = leftovers(
        &runtime.config().cgroup_parent,
        "",
        &locked(&veths),
        &runtime.config().state_dir,
    );
    if let (Some(goals), Some(s)) = (goals, s) {
        goals.check(
            "at least 200 start+destroy per second on 2 cores",
            format!("{} median ({label})", per_sec(s.median)),
            s.median >= 200.0,
        );
    }
    let mut text = format!(
        "{}\n{label}: {total} containers started and destroyed; {} errors; {}.\n",
        t.text,
        errors.len(),
        leftover_note(&left)
    );
    if let Some(e) = errors.first() {
        let _ = writeln!(text, "First error: `{e}`.");
    }
    Ok(text)
}

// ---------------------------------------------------------------------------------------
// Density

/// Runs `job(i)` for i in 0..count on `workers` tasks, stopping early once `deadline` passes
/// or a job fails. Returns how long each finished job took, by index, and the first error.
async fn bounded<F, Fut>(
    count: usize,
    workers: usize,
    deadline: Option<Instant>,
    job: F,
) -> (Vec<(usize, Duration)>, Option<String>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicUsize::new(0));
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let times: Arc<Mutex<Vec<(usize, Duration)>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (job, next) = (job.clone(), next.clone());
        let (failed, times) = (failed.clone(), times.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                if locked(&failed).is_some() || deadline.is_some_and(|d| Instant::now() > d) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let t = Instant::now();
                match job(i).await {
                    Ok(()) => locked(&times).push((i, t.elapsed())),
                    Err(e) => {
                        locked(&failed).get_or_insert(format!("{e:#}"));
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut times = locked(&times).clone();
    times.sort();
    let failed = locked(&failed).clone();
    (times, failed)
}

/// Median job time over the first and the last tenth of `times` (sorted by index).
fn first_and_last_tenth(times: &[(usize, Duration)]) -> (Option<Stats>, Option<Stats>) {
    let tenth = (times.len() / 10).max(1);
    let pick = |s: &[(usize, Duration)]| {
        Stats::of_durations(&s.iter().map(|(_, d)| *d).collect::<Vec<_>>())
    };
    if times.is_empty() {
        return (None, None);
    }
    (
        pick(&times[..tenth.min(times.len())]),
        pick(&times[times.len().saturating_sub(tenth)..]),
    )
}

async fn density(
    cli: &Cli,
    runtime: Arc<Runtime>,
    count: usize,
    seconds: u64,
    workers: usize,
    goals: &mut Goals,
) -> anyhow::Result<String> {
    let bundle = cli.bundle.clone();
    // One container first, so that one-time costs (threads, the firewall table) are not
    // counted against the containers.
    let warm = runtime.container("density-warmup")?;
    warm.start(start_opts(&bundle, SLEEP)).await?;
    warm.destroy(None).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss0 = rss(None)?;

    let veths: Arc<Mutex<Vec<String>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let t0 = Instant::now();
    let (times, failed) = {
        let (runtime, veths, bundle) = (runtime.clone(), veths.clone(), bundle.clone());
        bounded(count, workers, Some(deadline), move |i| {
            let (runtime, veths, bundle) = (runtime.clone(), veths.clone(), bundle.clone());
            async move {
                let c = runtime.container(&format!("idle-{i}"))?;
                c.start(start_opts(&bundle, SLEEP)).await?;
                if let Some(link) = c.network_link().await {
                    locked(&veths).push(link.host_if);
                }
                Ok(())
            }
        })
        .await
    };
    let start_all = t0.elapsed();
    let started = times.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = rss(None);
    let running = runtime.containers().iter().filter(|c| c.running()).count();
    let init_rss: Vec<f64> = runtime
        .containers()
        .iter()
        .filter_map(|c| c.pid())
        .take(20)
        .filter_map(|p| rss(Some(p)).ok())
        .collect();
    // What a start and the firewall cost with this many containers present.
    let parts = if started > 0 {
        Some(time_parts(cli, 3, "full").await)
    } else {
        None
    };

    // Every container handed out goes, whatever failed above: those whose start failed
    // too (a destroy of a stopped container only removes its state directory).
    let all = runtime.containers();
    let t1 = Instant::now();
    let (destroyed, destroy_failed) = {
        let all = all.clone();
        bounded(all.len(), workers, None, move |i| {
            let c = all[i].clone();
            async move {
                c.destroy(None).await?;
                Ok(())
            }
        })
        .await
    };
    let destroy_all = t1.elapsed();
    let left = leftovers(&cli.cgroup_parent, "", &locked(&veths), &cli.state_dir);
    let rss1 = rss1?;
    let per = (rss1 - rss0) / started.max(1) as f64;
    let parts = parts.transpose()?;

    let (early, late) = first_and_last_tenth(&times);
    let mut t = Table::new(&["measure", "value", "note"]);
    t.row(&[
        "idle containers reached".into(),
        format!("{started} of {count}"),
        format!("{running} running when counted"),
    ]);
    t.row(&[
        "time to start them all".into(),
        dur(start_all.as_secs_f64()),
        format!(
            "{workers} start loops; {:.0} starts/s",
            started as f64 / start_all.as_secs_f64()
        ),
    ]);
    t.row(&[
        "start() time, first tenth (median)".into(),
        early.map_or("n/a".into(), |s| dur(s.median)),
        format!("{workers} starts in flight"),
    ]);
    t.row(&[
        "start() time, last tenth (median)".into(),
        late.map_or("n/a".into(), |s| dur(s.median)),
        "grows with the number of containers present".into(),
    ]);
    t.row(&[
        "RSS of the process holding the Runtime, per container".into(),
        kib(per),
        format!("{} before, {} after", kib(rss0), kib(rss1)),
    ]);
    if let Some(s) = Stats::of(&init_rss) {
        t.row(&[
            "RSS of one idle init (`testprog sleep`)".into(),
            kib(s.median),
            "not counted above; median of 20".into(),
        ]);
    }
    t.row(&[
        "time to destroy them all".into(),
        dur(destroy_all.as_secs_f64()),
        format!("{} destroyed, {workers} loops", destroyed.len()),
    ]);

    goals.check(
        "1,000 concurrent idle containers (library)",
        format!("{started}"),
        started >= 1000,
    );
    let mut text = t.text;
    if let Some(e) = failed {
        let _ = writeln!(text, "\nStarting stopped at {started}: `{e}`.");
    } else if started < count {
        let _ = writeln!(
            text,
            "\nStarting stopped at {started}: the {seconds} s time bound ran out."
        );
    }
    if let Some(e) = destroy_failed {
        let _ = writeln!(text, "\nA destroy failed: `{e}`.");
    }
    let _ = writeln!(text, "\nAfterwards: {}.", leftover_note(&left));
    if let Some(p) = parts {
        let _ = write!(
            text,
            "\nThe parts of a start, timed with all {started} containers present:\n\n{}",
            p.text
        );
    }
    Ok(text)
}

// ---------------------------------------------------------------------------------------
// The daemon

/// A `silo serve` child on a unix socket of its own; stopped with SIGTERM when dropped.
struct Daemon {
    child: std::process::Child,
    socket: PathBuf,
    state_dir: PathBuf,
    cgroup_parent: String,
}

impl Daemon {
    async fn start(silo: &Path, cli: &Cli) -> anyhow::Result<Daemon> {
        let state_dir = PathBuf::from(format!("{}-daemon", cli.state_dir.display()));
        let cgroup_parent = format!("{}-daemon", cli.cgroup_parent.trim_end_matches('/'));
        let socket = state_dir.join("silo.sock");
        let child = std::process::Command::new(silo)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--cgroup-parent")
            .arg(&cgroup_parent)
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {} serve", silo.display()))?;
        let daemon = Daemon {
            child,
            socket,
            state_dir,
            cgroup_parent,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&daemon.socket).await.is_err() {
            if Instant::now() > deadline {
                bail!("silo serve did not listen on {}", daemon.socket.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn client(&self) -> anyhow::Result<Client> {
        Client::unix(&self.socket).await
    }

    /// SIGTERM (the daemon destroys its containers), then waits for it to exit.
    async fn stop(mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.signal_term();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(t.elapsed());
            }
            if Instant::now() > deadline {
                bail!("silo serve did not exit within 300 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal_term(&self) {
        // SAFETY: kill(2) on our own child, which we have not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal_term();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP/1.1 client on one kept-alive connection, to the daemon or to a container.
struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn unix(path: &Path) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("connect to {}", path.display()))?;
        Client::over(stream).await
    }

    async fn tcp(addr: SocketAddr) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Client::over(stream).await
    }

    async fn over<S>(stream: S) -> anyhow::Result<Client>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(Client { sender })
    }

    async fn call(
        &mut self,
        method: Method,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.sender.ready().await?;
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(header::HOST, "silo")
            .body(Full::new(body))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    /// Sends one request with `Connection: close`, so that the server closes first and
    /// the TIME_WAIT stays on its side, not on the host's ephemeral ports.
    async fn call_closing(
        &mut self,
        method: Method,
        uri: &str,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.sender.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "silo")
            .header(header::CONNECTION, "close")
            .body(Full::new(Bytes::new()))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    /// Calls and insists on a 2xx answer.
    async fn ok(
        &mut self,
        method: Method,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Bytes> {
        let (status, bytes) = self.call(method.clone(), uri, body).await?;
        if !status.is_success() {
            bail!(
                "{method} {uri}: {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            );
        }
        Ok(bytes)
    }
}

/// The container address the daemon reports for `id`.
async fn daemon_address(client: &mut Client, id: &str) -> anyhow::Result<Ipv4Addr> {
    let info = client
        .ok(Method::GET, &format!("/v1/containers/{id}"), None)
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&info)?;
    v["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("container {id} has no address: {v}"))
}

async fn daemon_density(
    cli: &Cli,
    silo: &Path,
    count: usize,
    seconds: u64,
    workers: usize,
    goals: &mut Goals,
) -> anyhow::Result<String> {
    let daemon = Daemon::start(silo, cli).await?;
    let put = |id: String, bundle: PathBuf| {
        (
            id,
            serde_json::json!({"bundle": bundle, "entrypoint": SLEEP}),
        )
    };
    {
        let mut c = daemon.client().await?;
        let (id, body) = put("warmup".into(), cli.bundle.clone());
        c.ok(Method::PUT, &format!("/v1/containers/{id}"), Some(body))
            .await?;
        c.ok(Method::DELETE, &format!("/v1/containers/{id}"), None)
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss0 = rss(Some(daemon.pid()))?;

    let socket = daemon.socket.clone();
    let bundle = cli.bundle.clone();
    let addrs: Arc<Mutex<Vec<Ipv4Addr>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let t0 = Instant::now();
    let (times, failed) = {
        let addrs = addrs.clone();
        bounded(count, workers, Some(deadline), move |i| {
            let (socket, bundle, addrs) = (socket.clone(), bundle.clone(), addrs.clone());
            async move {
                let mut c = Client::unix(&socket).await?;
                let (id, body) = put(format!("idle-{i}"), bundle);
                let info = c
                    .ok(Method::PUT, &format!("/v1/containers/{id}"), Some(body))
                    .await?;
                let v: serde_json::Value = serde_json::from_slice(&info)?;
                if let Some(a) = v["address"].as_str().and_then(|a| a.parse().ok()) {
                    locked(&addrs).push(a);
                }
                Ok(())
            }
        })
        .await
    };
    let start_all = t0.elapsed();
    let started = times.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = rss(Some(daemon.pid()))?;
    let per = (rss1 - rss0) / started.max(1) as f64;

    // The daemon destroys every container on SIGTERM: time that as "destroy them all".
    let cgroup_parent = daemon.cgroup_parent.clone();
    let state_dir = daemon.state_dir.join("containers");
    let stop = daemon.stop().await?;
    let veths: Vec<String> = addrs
        .lock()
        .unwrap()
        .iter()
        .map(|a| silo::network::host_if_name(*a))
        .collect();
    let left = leftovers(&cgroup_parent, "", &veths, &state_dir);

    let (early, late) = first_and_last_tenth(&times);
    let mut t = Table::new(&["measure", "value", "note"]);
    t.row(&[
        "idle containers reached".into(),
        format!("{started} of {count}"),
        "PUT /v1/containers/ID, entrypoint `testprog sleep`".into(),
    ]);
    t.row(&[
        "time to start them all".into(),
        dur(start_all.as_secs_f64()),
        format!(
            "{workers} clients; {:.0} starts/s",
            started as f64 / start_all.as_secs_f64()
        ),
    ]);
    t.row(&[
        "PUT time, first tenth (median)".into(),
        early.map_or("n/a".into(), |s| dur(s.median)),
        String::new(),
    ]);
    t.row(&[
        "PUT time, last tenth (median)".into(),
        late.map_or("n/a".into(), |s| dur(s.median)),
        String::new(),
    ]);
    t.row(&[
        "daemon RSS per container".into(),
        kib(per),
        format!("{} before, {} after; goal < 256 KiB", kib(rss0), kib(rss1)),
    ]);
    t.row(&[
        "SIGTERM to exit (destroys them all)".into(),
        dur(stop.as_secs_f64()),
        String::new(),
    ]);
    goals.check(
        "1,000 concurrent idle containers (daemon)",
        format!("{started}"),
        started >= 1000,
    );
    goals.check(
        "under 256 KiB of daemon memory per container",
        format!("{} at {started} containers", kib(per)),
        per < 256.0 * 1024.0 && started > 0,
    );
    let mut text = t.text;
    if let Some(e) = failed {
        let _ = writeln!(text, "\nStarting stopped at {started}: `{e}`.");
    } else if started < count {
        let _ = writeln!(
            text,
            "\nStarting stopped at {started}: the {seconds} s time bound ran out."
        );
    }
    let _ = writeln!(text, "\nAfterwards: {}.", leftover_note(&left));
    Ok(text)
}

// ---------------------------------------------------------------------------------------
// Traffic

struct TrafficOpts {
    seconds: u64,
    concurrency: Vec<usize>,
    bytes: usize,
    runs: usize,
    sustain: u64,
}

/// How an HTTP request reaches the container.
#[derive(Clone)]
enum HttpPath {
    /// `tcp_port(8080).fetch`: a new connection per request.
    Fetch(silo::port::TcpPort),
    /// A hyper client on a new connection per request, straight to the address.
    DirectNew(SocketAddr),
    /// A hyper client keeping one connection alive, straight to the address.
    DirectKeepAlive(SocketAddr),
    /// Through the daemon's proxy, on a kept-alive unix connection to the daemon.
    Daemon { socket: PathBuf, id: String },
}

impl HttpPath {
    /// Sends GET / over and over until `stop`, counting responses.
    async fn drive(self, count: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        match self {
            HttpPath::Fetch(port) => {
                while !stop.load(Ordering::Relaxed) {
                    let req = Request::get("/")
                        .header(header::CONNECTION, "close")
                        .body(Empty::<Bytes>::new())?;
                    let resp = port.fetch(req).await?;
                    check_hello(resp.status(), resp.into_body().collect().await?.to_bytes())?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            HttpPath::DirectNew(addr) => {
                while !stop.load(Ordering::Relaxed) {
                    let mut c = Client::tcp(addr).await?;
                    let (status, body) = c.call_closing(Method::GET, "/").await?;
                    check_hello(status, body)?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            HttpPath::DirectKeepAlive(addr) => {
                let mut c = Client::tcp(addr).await?;
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = c.call(Method::GET, "/", None).await?;
                    check_hello(status, body)?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            HttpPath::Daemon { socket, id } => {
                let mut c = Client::unix(&socket).await?;
                let uri = format!("/v1/containers/{id}/ports/{HTTP_PORT}/");
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = c.call(Method::GET, &uri, None).await?;
                    check_hello(status, body)?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}

/// TCP connections of the host in TIME_WAIT towards `peer`: each holds an ephemeral port
/// for that destination for 60 s.
fn time_wait_to(peer: std::net::IpAddr) -> usize {
    const TIME_WAIT: &str = "06";
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return 0;
    };
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // The kernel prints the address as the hex of its in-memory (network order)
            // bytes read as a native integer.
            let remote = f
                .get(2)
                .and_then(|r| r.split(':').next())
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .map(|v| Ipv4Addr::from(v.to_ne_bytes()));
            f.get(3) == Some(&TIME_WAIT) && remote.map(std::net::IpAddr::V4) == Some(peer)
        })
        .count()
}

fn check_hello(status: StatusCode, body: Bytes) -> anyhow::Result<()> {
    if status != StatusCode::OK || !body.starts_with(b"hello") {
        bail!(
            "unexpected answer {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// Requests per second over one window of `window`, with `conc` requests in flight, after
/// a short warm-up (connections, the server's threads).
async fn http_window(path: &HttpPath, conc: usize, window: Duration) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..conc)
        .map(|_| tokio::spawn(path.clone().drive(count.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(window).await;
    let (c1, t1) = (count.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok((c1 - c0) as f64 / (t1 - t0).as_secs_f64())
}

/// What the sustained measurement drives.
#[derive(Clone)]
enum Sustained {
    /// `fetch` with a plain request: the host closes first.
    Fetch(silo::port::TcpPort),
    /// The daemon's proxy, on a kept-alive unix connection (made again after a failure).
    Daemon { socket: PathBuf, id: String },
}

/// Failures seen while sustaining load: how many, and the first.
#[derive(Default)]
struct Failures {
    count: u64,
    first: Option<String>,
}

/// Requests per second over one-second windows while `conc` loops send `GET /` for
/// `seconds`. Failures are counted, not fatal: running out of ports is what this shows.
async fn sustain(target: Sustained, conc: usize, seconds: u64) -> (Vec<f64>, Failures) {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Failures>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (target, count, stop, failures) = (
            target.clone(),
            count.clone(),
            stop.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut client: Option<Client> = None;
            while !stop.load(Ordering::Relaxed) {
                let result = async {
                    match &target {
                        Sustained::Fetch(port) => {
                            let req = Request::get("/").body(Empty::<Bytes>::new())?;
                            let resp = port.fetch(req).await?;
                            let status = resp.status();
                            check_hello(status, resp.into_body().collect().await?.to_bytes())
                        }
                        Sustained::Daemon { socket, id } => {
                            if client.is_none() {
                                client = Some(Client::unix(socket).await?);
                            }
                            let c = client.as_mut().expect("set above");
                            let uri = format!("/v1/containers/{id}/ports/{HTTP_PORT}/");
                            let r = c.call(Method::GET, &uri, None).await;
                            if r.is_err() {
                                client = None;
                            }
                            let (status, body) = r?;
                            check_hello(status, body)
                        }
                    }
                }
                .await;
                match result {
                    Ok(()) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        {
                            let mut f = locked(&failures);
                            f.count += 1;
                            f.first.get_or_insert_with(|| format!("{e:#}"));
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    let windows = per_second(&count, seconds).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let failures = std::mem::take(&mut *locked(&failures));
    (windows, failures)
}

fn sustained_row(t: &mut Table, what: &str, peer: std::net::IpAddr, w: &[f64], f: &Failures) {
    let mut note = format!(
        "{} host TIME_WAIT to it after; {} failed requests",
        time_wait_to(peer),
        f.count
    );
    if let Some(e) = &f.first {
        let _ = write!(note, " (first: `{e}`)");
    }
    let series: Vec<String> = w.iter().map(|x| format!("{x:.0}")).collect();
    let _ = write!(note, "; per second: {}", series.join(", "));
    t.stats(
        &format!("sustained, 8 in flight, one container: {what}"),
        Stats::of(w),
        per_sec,
        &note,
    );
}

/// Sends `bytes` through an echo connection and reads them back; bytes per second.
async fn echo_throughput(stream: TcpStream, bytes: usize) -> anyhow::Result<f64> {
    let (rd, wr) = stream.into_split();
    throughput(rd, wr, bytes).await
}

/// Opens a raw tunnel to the echo port through the daemon (`Upgrade: tcp`).
async fn daemon_tunnel(socket: &Path, id: &str) -> anyhow::Result<hyper::upgrade::Upgraded> {
    let mut c = Client::unix(socket).await?;
    c.sender.ready().await?;
    let req = Request::get(format!("/v1/containers/{id}/ports/{ECHO_PORT}"))
        .header(header::HOST, "silo")
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "tcp")
        .body(Full::new(Bytes::new()))?;
    let resp = c.sender.send_request(req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        bail!("tunnel to {id}:{ECHO_PORT}: {}", resp.status());
    }
    Ok(hyper::upgrade::on(resp).await?)
}

/// The same as [`echo_throughput`] over a daemon tunnel.
async fn tunnel_throughput(up: hyper::upgrade::Upgraded, bytes: usize) -> anyhow::Result<f64> {
    let (rd, wr) = tokio::io::split(TokioIo::new(up));
    throughput(rd, wr, bytes).await
}

/// Writes `bytes` into `wr` while reading the echo back from `rd`; bytes per second.
async fn throughput<R, W>(mut rd: R, mut wr: W, bytes: usize) -> anyhow::Result<f64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5a_u8; 256 << 10];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            wr.write_all(&chunk[..n]).await?;
            left -= n;
        }
        wr.shutdown().await?;
        std::io::Result::Ok(())
    });
    let mut buf = vec![0_u8; 256 << 10];
    let mut got = 0;
    while got < bytes {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    writer.await??;
    if got != bytes {
        bail!("echoed {got} bytes of {bytes}");
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64())
}

async fn wait_http(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = Client::tcp(addr).await
            && let Ok((StatusCode::OK, _)) = c.call(Method::GET, "/", None).await
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing answered HTTP on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn traffic(
    cli: &Cli,
    runtime: &Runtime,
    silo: &Path,
    opts: &TrafficOpts,
    goals: &mut Goals,
) -> anyhow::Result<String> {
    let c = runtime.container("traffic")?;
    c.start(start_opts(&cli.bundle, SERVERS)).await?;
    let veth = c.network_link().await.map(|l| l.host_if);
    let result = async {
        let daemon = Daemon::start(silo, cli).await?;
        let r = traffic_with(cli, runtime, &c, &daemon, opts, goals).await;
        let stopped = daemon.stop().await;
        let text = r?;
        stopped?;
        anyhow::Ok(text)
    }
    .await;
    c.destroy(None).await?;
    let mut text = result?;
    let left = leftovers(
        &cli.cgroup_parent,
        "",
        &veth.into_iter().collect::<Vec<_>>(),
        &cli.state_dir,
    );
    let _ = writeln!(text, "\nAfterwards: {}.", leftover_note(&left));
    Ok(text)
}

/// Starts a container through the daemon, waits for its ports, and returns its address.
async fn daemon_container(daemon: &Daemon, cli: &Cli, id: &str) -> anyhow::Result<Ipv4Addr> {
    let mut dc = daemon.client().await?;
    dc.ok(
        Method::PUT,
        &format!("/v1/containers/{id}"),
        Some(serde_json::json!({
            "bundle": cli.bundle,
            "entrypoint": SERVERS,
            "waitForPorts": [HTTP_PORT, ECHO_PORT],
        })),
    )
    .await?;
    let ip = daemon_address(&mut dc, id).await?;
    wait_http(SocketAddr::new(ip.into(), HTTP_PORT)).await?;
    Ok(ip)
}

async fn daemon_delete(daemon: &Daemon, id: &str) -> anyhow::Result<()> {
    // A fresh connection: an earlier one may have been closed as idle.
    daemon
        .client()
        .await?
        .ok(Method::DELETE, &format!("/v1/containers/{id}"), None)
        .await?;
    Ok(())
}

async fn traffic_with(
    cli: &Cli,
    runtime: &Runtime,
    c: &Container,
    daemon: &Daemon,
    opts: &TrafficOpts,
    goals: &mut Goals,
) -> anyhow::Result<String> {
    let http_port = c.tcp_port(u32::from(HTTP_PORT))?;
    let echo_port = c.tcp_port(u32::from(ECHO_PORT))?;
    let addr = http_port.socket_addr().await?;
    wait_http(addr).await?;

    const FETCH: &str = "tcp_port().fetch";
    const DIRECT_NEW: &str = "direct hyper, new connection each";
    const DIRECT_KEEP: &str = "direct hyper, kept-alive connection";
    const DAEMON_DIRECT: &str = "daemon's container: direct hyper, new connection each";
    const PROXY: &str = "daemon's container: daemon proxy (kept-alive unix client)";
    let mut t = Table::new(STATS_COLUMNS);
    for &conc in &opts.concurrency {
        // One-second windows, the paths taking turns, so that drift in the machine's load
        // hits all of them alike. The daemon's proxy leaves a TIME_WAIT per request on the
        // host, which would slow later connects to the same container: each round gets a
        // fresh daemon container.
        let mut windows: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut time_waits: BTreeMap<&str, usize> = BTreeMap::new();
        for round in 0..opts.seconds {
            let did = format!("traffic-{conc}-{round}");
            let dip = daemon_container(daemon, cli, &did).await?;
            let daddr = SocketAddr::new(dip.into(), HTTP_PORT);
            let paths = [
                (FETCH, HttpPath::Fetch(http_port.clone())),
                (DIRECT_NEW, HttpPath::DirectNew(addr)),
                (DIRECT_KEEP, HttpPath::DirectKeepAlive(addr)),
                (DAEMON_DIRECT, HttpPath::DirectNew(daddr)),
                (
                    PROXY,
                    HttpPath::Daemon {
                        socket: daemon.socket.clone(),
                        id: did.clone(),
                    },
                ),
            ];
            for (name, path) in &paths {
                let peer = match path {
                    HttpPath::DirectNew(a) | HttpPath::DirectKeepAlive(a) => a.ip(),
                    HttpPath::Fetch(_) => addr.ip(),
                    HttpPath::Daemon { .. } => daddr.ip(),
                };
                let tw0 = time_wait_to(peer);
                let w = http_window(path, conc, Duration::from_secs(1)).await?;
                *time_waits.entry(name).or_default() += time_wait_to(peer).saturating_sub(tw0);
                windows.entry(name).or_default().push(w);
            }
            daemon_delete(daemon, &did).await?;
        }
        let mut medians = BTreeMap::new();
        for name in [FETCH, DIRECT_NEW, DIRECT_KEEP, DAEMON_DIRECT, PROXY] {
            let s = Stats::of(&windows[name]);
            medians.insert(name, s.map_or(0.0, |s| s.median));
            t.stats(
                &format!("GET /, {conc} in flight: {name}"),
                s,
                per_sec,
                &format!("req/s; +{} host TIME_WAIT", time_waits[name]),
            );
        }
        let ratio = |a: &str, b: &str| medians[a] / medians[b].max(1e-9);
        let fetch_new = ratio(FETCH, DIRECT_NEW);
        let fetch_keep = ratio(FETCH, DIRECT_KEEP);
        let proxy = ratio(PROXY, DAEMON_DIRECT);
        let mut ratio_row = |what: String, r: f64, note: &str| {
            t.row(&[
                what,
                format!("{r:.2}x"),
                String::new(),
                String::new(),
                String::new(),
                note.to_string(),
            ])
        };
        ratio_row(
            format!("ratio, {conc} in flight: fetch / direct, new connection each"),
            fetch_new,
            "goal ≥ 0.9x",
        );
        ratio_row(
            format!("ratio, {conc} in flight: fetch / direct, kept-alive"),
            fetch_keep,
            "fetch opens a connection per request",
        );
        ratio_row(
            format!("ratio, {conc} in flight: daemon proxy / direct, new connection each"),
            proxy,
            "",
        );
        goals.check(
            &format!("fetch at least 0.9x the direct client's rate ({conc} in flight)"),
            format!("{fetch_new:.2}x a new-connection client, {fetch_keep:.2}x a kept-alive one"),
            fetch_new >= 0.9 && fetch_keep >= 0.9,
        );
    }

    // What a client that does not ask the server to close first gets when it keeps going:
    // the host keeps a TIME_WAIT per request towards the container's port.
    let fresh = runtime.container("traffic-sustain")?;
    fresh.start(start_opts(&cli.bundle, SERVERS)).await?;
    let sustained_lib = async {
        let port = fresh.tcp_port(u32::from(HTTP_PORT))?;
        let ip = port.socket_addr().await?;
        wait_http(ip).await?;
        anyhow::Ok((
            ip.ip(),
            sustain(Sustained::Fetch(port), 8, opts.sustain).await,
        ))
    }
    .await;
    fresh.destroy(None).await?;
    let (ip, (w, errors)) = sustained_lib?;
    sustained_row(
        &mut t,
        "tcp_port().fetch, no `Connection: close`",
        ip,
        &w,
        &errors,
    );
    let did = "traffic-sustain";
    let dip = daemon_container(daemon, cli, did).await?;
    let path = Sustained::Daemon {
        socket: daemon.socket.clone(),
        id: did.into(),
    };
    let (w, errors) = sustain(path, 8, opts.sustain).await;
    sustained_row(&mut t, "daemon proxy", dip.into(), &w, &errors);
    daemon_delete(daemon, did).await?;

    // Bytes through an echo connection, alternating the paths so that drift in the
    // machine's load hits all of them alike.
    let did = "traffic-echo";
    daemon_container(daemon, cli, did).await?;
    let echo_addr = echo_port.socket_addr().await?;
    let (mut via_connect, mut direct, mut tunnel) = (vec![], vec![], vec![]);
    for _ in 0..opts.runs {
        via_connect.push(echo_throughput(echo_port.connect().await?, opts.bytes).await?);
        let s = TcpStream::connect(echo_addr).await?;
        s.set_nodelay(true)?;
        direct.push(echo_throughput(s, opts.bytes).await?);
        let up = daemon_tunnel(&daemon.socket, did).await?;
        tunnel.push(tunnel_throughput(up, opts.bytes).await?);
    }
    daemon_delete(daemon, did).await?;
    let (sc, sd, st) = (
        Stats::of(&via_connect),
        Stats::of(&direct),
        Stats::of(&tunnel),
    );
    let mib = opts.bytes >> 20;
    t.stats(
        &format!("echo {mib} MiB: tcp_port().connect()"),
        sc,
        bytes_per_sec,
        "",
    );
    t.stats(
        &format!("echo {mib} MiB: direct TcpStream"),
        sd,
        bytes_per_sec,
        "",
    );
    t.stats(
        &format!("echo {mib} MiB: daemon tunnel (Upgrade: tcp, unix socket)"),
        st,
        bytes_per_sec,
        "a daemon container running the same program",
    );
    if let (Some(sc), Some(sd)) = (sc, sd) {
        let r = sc.median / sd.median;
        t.row(&[
            "ratio: connect() / direct".into(),
            format!("{r:.2}x"),
            String::new(),
            String::new(),
            String::new(),
            "goal within 10%".into(),
        ]);
        goals.check(
            "connect within 10% of a direct stream",
            format!("{r:.2}x"),
            (0.9..=1.1).contains(&r),
        );
    }
    Ok(t.text)
}
