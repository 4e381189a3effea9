//! The soak: many start -> fetch -> destroy cycles of the demo bundle's HTTP server, a few
//! at a time, then a check that neither the host nor the runtime's own process holds more
//! than before. tests/soak.rs runs a short one; examples/soak.rs (scripts/soak) a long one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Harness, get};

/// How long one cycle may take before the soak counts it as hung.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The port the demo bundle's server listens on.
const PORT: u32 = 8080;

/// What to run.
#[derive(Debug, Clone)]
pub struct Soak {
    pub cycles: usize,
    pub parallel: usize,
    /// No cycle starts after this much time; the report says how many ran.
    pub time_limit: Duration,
}

/// What a soak measured, and every leak it found (empty when clean).
#[derive(Debug)]
pub struct Report {
    pub cycles: usize,
    pub elapsed: Duration,
    /// The runtime process's resident set in KiB: before the first cycle, after it (the
    /// runtime's threads and buffers are there by then), after half of them, and at the end.
    pub rss_kib: [u64; 4],
    /// Open descriptors of the runtime process: before the first cycle, after it (once
    /// whatever the runtime opens on first use is open) and at the end.
    pub fds: [usize; 3],
    pub leaks: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [rss_start, rss_warm, rss_mid, rss_end] = self.rss_kib;
        let [fd_start, fd_warm, fd_end] = self.fds;
        writeln!(
            f,
            "{} cycles in {:.1} s ({:.1} ms a cycle of wall time)",
            self.cycles,
            self.elapsed.as_secs_f64(),
            self.elapsed.as_secs_f64() * 1e3 / self.cycles.max(1) as f64
        )?;
        writeln!(
            f,
            "RSS: {rss_start} KiB at start, {rss_warm} KiB after the first cycle, \
             {rss_mid} KiB at the middle, {rss_end} KiB at the end"
        )?;
        writeln!(
            f,
            "open fds: {fd_start} at start, {fd_warm} after the first cycle, {fd_end} at the end"
        )?;
        match self.leaks.len() {
            0 => write!(f, "no leaks"),
            n => write!(f, "{n} leaks:\n  {}", self.leaks.join("\n  ")),
        }
    }
}

/// Runs the soak in `h`'s runtime. Each of `parallel` workers owns one container and
/// cycles it, so the runtime's own table of containers stays the same size throughout.
pub async fn soak(h: &Arc<Harness>, soak: &Soak) -> Report {
    assert!(soak.cycles > 0 && soak.parallel > 0, "{soak:?}");
    let veths_before = veths();
    let rss_start = rss_kib();
    let fd_start = open_fds();
    let started = Instant::now();
    let deadline = started + soak.time_limit;

    let workers: Vec<_> = (0..soak.parallel)
        .map(|w| h.container(&format!("w{w}")))
        .collect();
    cycle(h, &workers[0], 0).await;
    let fd_warm = open_fds();
    let rss_warm = rss_kib();

    let next = Arc::new(AtomicUsize::new(1));
    let done = Arc::new(AtomicUsize::new(1));
    let rss_mid = Arc::new(Mutex::new(None));
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|c| {
            let (h, next, done) = (h.clone(), next.clone(), done.clone());
            let rss_mid = rss_mid.clone();
            let cycles = soak.cycles;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= cycles || Instant::now() >= deadline {
                        return;
                    }
                    cycle(&h, &c, i).await;
                    done.fetch_add(1, Ordering::SeqCst);
                    if i == cycles / 2 {
                        *rss_mid.lock().unwrap() = Some(rss_kib());
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a soak worker panicked");
    }
    let elapsed = started.elapsed();
    let cycles = done.load(Ordering::SeqCst);
    let rss_end = rss_kib();
    let fd_end = open_fds();
    let rss_mid = rss_mid.lock().unwrap().unwrap_or(rss_end);

    let mut leaks = host_leaks(h, &veths_before);
    for (fd, target) in &fd_end {
        if fd_warm.get(fd) != Some(target) {
            leaks.push(format!(
                "fd {fd} ({target}), not open after the first cycle"
            ));
        }
    }
    Report {
        cycles,
        elapsed,
        rss_kib: [rss_start, rss_warm, rss_mid, rss_end],
        fds: [fd_start.len(), fd_warm.len(), fd_end.len()],
        leaks,
    }
}

/// One start -> fetch -> destroy of `c`; panics with what went wrong.
async fn cycle(h: &Harness, c: &silo::Container, i: usize) {
    let run = async {
        let mut opts = h.opts(&["/bin/testprog", "serve", "8080"]);
        opts.env.insert("GREETING".into(), format!("cycle {i}"));
        c.start(opts).await.expect("start");
        h.record(c).await;
        let (status, body) = get(c, PORT, "/").await;
        assert_eq!(status, 200, "cycle {i}: {body}");
        c.destroy(None).await.expect("destroy");
        h.check_destroyed(c);
    };
    tokio::time::timeout(CYCLE_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("cycle {i} of {} took over {CYCLE_TIMEOUT:?}", c.id()));
}

/// Whatever of the soak's containers is still on the host, with nothing running.
fn host_leaks(h: &Harness, veths_before: &BTreeSet<String>) -> Vec<String> {
    let mut leaks = Vec::new();
    let prefix = h.prefix();
    let config = h.runtime.config();

    let parent = config.cgroup_parent.trim_matches('/');
    let cgroup_root = Path::new("/sys/fs/cgroup");
    let hierarchies = std::fs::read_dir(cgroup_root)
        .unwrap()
        .flatten()
        .map(|d| d.path());
    for dir in std::iter::once(cgroup_root.to_path_buf()).chain(hierarchies) {
        for entry in std::fs::read_dir(dir.join(parent))
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                leaks.push(format!("cgroup {}", entry.path().display()));
            }
        }
    }

    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state_dir = config.state_dir.to_string_lossy();
    for line in mounts.lines() {
        if line.contains("rootfs/build/bundle") || line.contains(&*state_dir) {
            leaks.push(format!("mount {line}"));
        }
    }

    for name in veths().difference(veths_before) {
        leaks.push(format!("veth {name}"));
    }
    if let Some(table) = nft_table() {
        for host_if in h.host_ifs() {
            if table.contains(&format!("\"{host_if}\"")) {
                leaks.push(format!("nftables rules for {host_if} in table inet silo"));
            }
        }
    }

    for entry in std::fs::read_dir(&config.state_dir).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            leaks.push(format!("state {}", entry.path().display()));
        }
    }

    for (pid, state) in children() {
        leaks.push(match state {
            'Z' => format!("zombie child {pid}"),
            _ => format!("child process {pid} (state {state})"),
        });
    }
    leaks
}

/// Host ends of veth pairs in this network namespace.
fn veths() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(silo::firewall::HOST_IF_PREFIX))
        .collect()
}

/// `nft list table inet silo`, or None when the table (or nft) is not there.
fn nft_table() -> Option<String> {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "inet", "silo"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// This process's children, with their state letter (Z for a zombie).
fn children() -> Vec<(u32, char)> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split(' ');
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if fields.next() == Some(me.as_str()) {
            found.push((pid, state));
        }
    }
    found
}

/// This process's open descriptors, with what each one is. The one read_dir holds while
/// it lists them is among them, the same one each time.
pub fn open_fds() -> BTreeMap<String, String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            let fd = e.file_name().to_string_lossy().into_owned();
            (fd, target.to_string_lossy().into_owned())
        })
        .collect()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}
