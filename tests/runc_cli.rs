//! runc's command line: the OCI lifecycle driven command by command against the demo
//! bundle, as containerd's shim and Podman's conmon drive it.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A root of runc state and a bundle of the test's own; deletes its containers on drop and
/// checks that their cgroups went with them.
struct Runc {
    dir: tempfile::TempDir,
    ids: Vec<String>,
}

impl Runc {
    fn new() -> Runc {
        let dir = tempfile::tempdir().unwrap();
        let r = Runc {
            dir,
            ids: Vec::new(),
        };
        std::fs::create_dir(r.bundle()).unwrap();
        r.set_process(&["/bin/sh", "-c", "sleep 30"]);
        r
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    /// The demo bundle's config with `args` as its process, and `edit` applied.
    fn config(&self, args: &[&str], edit: impl FnOnce(&mut serde_json::Value)) {
        let demo = common::bundle();
        let text = std::fs::read_to_string(demo.join("config.json")).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
        cfg["root"]["path"] = demo.join("rootfs").to_string_lossy().into();
        cfg["process"]["args"] = serde_json::json!(args);
        edit(&mut cfg);
        std::fs::write(self.bundle().join("config.json"), cfg.to_string()).unwrap();
    }

    fn set_process(&self, args: &[&str]) {
        self.config(args, |_| {});
    }

    /// An id unique to this process, deleted at the end.
    fn id(&mut self, name: &str) -> String {
        let id = format!("runc-{name}-{}", std::process::id());
        self.ids.push(id.clone());
        id
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_silo"));
        cmd.arg("--root").arg(self.root());
        cmd
    }

    fn silo(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run silo")
    }

    /// Runs a command that must succeed and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        // The container inherits stdio from `create` (as from a shim) and holds it open: a
        // captured stdout would not end before the container does.
        let leaves_running = args
            .iter()
            .any(|a| matches!(*a, "create" | "--detach" | "-d"));
        if leaves_running {
            let stderr = self.dir.path().join("stderr");
            let out = self
                .cmd()
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .status()
                .expect("run silo");
            let err = std::fs::read_to_string(&stderr).unwrap_or_default();
            assert!(out.success(), "silo {args:?}: {err}");
            return String::new();
        }
        let out = self.silo(args);
        assert!(
            out.status.success(),
            "silo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that must fail and returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.silo(args);
        assert!(!out.status.success(), "silo {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn state(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["state", id])).unwrap()
    }

    fn status(&self, id: &str) -> String {
        self.state(id)["status"].as_str().unwrap().to_string()
    }

    fn create(&self, id: &str) {
        let bundle = self.bundle();
        self.ok(&["create", "--bundle", bundle.to_str().unwrap(), id]);
    }

    fn wait_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.status(id) != want {
            assert!(Instant::now() < deadline, "{id} never became {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = self.silo(&["delete", "--force", id]);
            assert_no_cgroup(id);
        }
    }
}

fn assert_no_cgroup(id: &str) {
    for dir in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let leaf = dir.path().join("silo").join(id);
        assert!(!leaf.exists(), "cgroup {} was left behind", leaf.display());
    }
}

fn pid_of(state: &serde_json::Value) -> u32 {
    state["pid"].as_u64().unwrap() as u32
}

#[test]
fn create_start_kill_delete() {
    let mut r = Runc::new();
    r.set_process(&["/bin/sh", "-c", "echo started; exec sleep 30"]);
    let id = r.id("life");
    let pid_file = r.dir.path().join("pid");
    let bundle = r.bundle();
    let out = r.ok(&[
        "create",
        "--bundle",
        bundle.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id,
    ]);
    assert_eq!(
        out, "",
        "create prints nothing; the process has not run yet"
    );
    let state = r.state(&id);
    assert_eq!(state["status"], "created");
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["bundle"], bundle.to_str().unwrap());
    assert!(state["ociVersion"].is_string());
    let pid = pid_of(&state);
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), pid.to_string());
    // Set up and waiting: already in its own root and cgroup, not yet the user's process.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("/silo/{id}")), "{cgroup}");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        !cmdline.starts_with(b"/bin/sh"),
        "the process ran before start"
    );
    let list = r.ok(&["list", "--format", "json"]);
    assert!(list.contains(&id), "{list}");

    r.ok(&["start", &id]);
    assert_eq!(r.status(&id), "running");
    let err = r.fails(&["start", &id]);
    assert!(err.contains("it is running"), "{err}");
    let err = r.fails(&["delete", &id]);
    assert!(err.contains("not stopped"), "{err}");
    assert_eq!(r.status(&id), "running", "a failed command changes nothing");

    r.ok(&["pause", &id]);
    assert_eq!(r.status(&id), "paused");
    r.ok(&["resume", &id]);
    assert_eq!(r.status(&id), "running");
    let pids: Vec<u32> = serde_json::from_str(&r.ok(&["ps", "--format", "json", &id])).unwrap();
    assert_eq!(pids, vec![pid]);
    let table = r.ok(&["ps", &id]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("PID"), "{table}");
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[1].contains(&pid.to_string()), "{table}");

    r.ok(&["kill", &id, "KILL"]);
    r.wait_status(&id, "stopped");
    assert_eq!(pid_of(&r.state(&id)), 0);
    let err = r.fails(&["kill", &id, "TERM"]);
    assert!(err.contains("container not running"), "{err}");
    r.ok(&["delete", &id]);
    assert_no_cgroup(&id);
    let err = r.fails(&["state", &id]);
    assert!(err.contains("does not exist"), "{err}");
    let err = r.fails(&["delete", &id]);
    assert!(err.contains("does not exist"), "{err}");
    r.ok(&["delete", "--force", &id]);
}

#[test]
fn deleting_a_created_container_or_a_half_made_one() {
    let mut r = Runc::new();
    let id = r.id("created");
    r.create(&id);
    let pid = pid_of(&r.state(&id));
    // Never started, so nothing of the user's ran: delete needs no --force.
    r.ok(&["delete", &id]);
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_or(true, |c| !c.contains(&format!("/silo/{id}")))
    );
    assert_no_cgroup(&id);

    // A create killed after making its cgroup: a forced delete removes what it left.
    r.create(&id);
    std::fs::remove_file(r.root().join(&id).join("state.json")).unwrap();
    let err = r.fails(&["delete", &id]);
    assert!(err.contains("does not exist"), "{err}");
    r.ok(&["delete", "--force", &id]);
    assert!(!r.root().join(&id).exists());
    assert_no_cgroup(&id);
}

#[test]
fn errors_go_to_a_json_log_last() {
    let mut r = Runc::new();
    let id = r.id("log");
    let log = r.dir.path().join("log.json");
    let out = r
        .cmd()
        .arg("--log")
        .arg(&log)
        .args(["--log-format", "json", "kill", &id, "TERM"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    let msg = last["msg"].as_str().unwrap();
    assert!(msg.contains("does not exist"), "{msg}");

    // A bundle silo refuses leaves nothing: no state, no cgroup.
    r.config(&["/bin/true"], |cfg| {
        cfg["linux"]["intelRdt"] = serde_json::json!({})
    });
    let bundle = r.bundle();
    let err = r.fails(&["create", "--bundle", bundle.to_str().unwrap(), &id]);
    assert!(err.contains("linux.intelRdt"), "{err}");
    assert!(!r.root().join(&id).exists());
    assert_no_cgroup(&id);
}

#[test]
fn run_waits_and_exits_with_the_code_and_exec_joins() {
    let mut r = Runc::new();
    r.set_process(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]);
    let id = r.id("run");
    let bundle = r.bundle();
    let out = r.silo(&["run", "--bundle", bundle.to_str().unwrap(), &id]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert!(!r.root().join(&id).exists(), "run deletes the container");

    r.set_process(&["/bin/sleep", "30"]);
    r.ok(&["run", "--detach", "--bundle", bundle.to_str().unwrap(), &id]);
    assert_eq!(r.status(&id), "running");
    let out = r.silo(&[
        "exec",
        &id,
        "/bin/sh",
        "-c",
        "echo $$ $(cat /proc/1/cmdline); exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("2 /bin/sleep"), "{stdout}");

    let pid_file = r.dir.path().join("exec.pid");
    let process = r.dir.path().join("process.json");
    let spec = serde_json::json!({"cwd": "/tmp", "args": ["/bin/sleep", "30"],
        "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}});
    std::fs::write(&process, spec.to_string()).unwrap();
    r.ok(&[
        "exec",
        "--detach",
        "--process",
        process.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id,
    ]);
    let exec_pid: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{exec_pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("/silo/{id}")), "{cgroup}");
    let init_pid = pid_of(&r.state(&id));
    for ns in ["mnt", "pid", "net", "ipc", "uts", "cgroup"] {
        let of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let want = if ns == "pid" {
            // Its pid namespace is the one the init made for its children.
            std::fs::read_link(format!("/proc/{init_pid}/ns/pid_for_children")).unwrap()
        } else {
            of(init_pid)
        };
        assert_eq!(of(exec_pid), want, "{ns} namespace");
    }
    let cwd = std::fs::read_link(format!("/proc/{exec_pid}/cwd")).unwrap();
    assert_eq!(cwd, PathBuf::from("/tmp"));
    let pids: Vec<u32> = serde_json::from_str(&r.ok(&["ps", "--format", "json", &id])).unwrap();
    assert!(pids.contains(&exec_pid), "{pids:?}");

    let err = r.fails(&["exec", &id, "/no/such/program"]);
    assert!(err.contains("/no/such/program"), "{err}");
    r.ok(&["kill", "--all", &id, "9"]);
    r.wait_status(&id, "stopped");
    r.ok(&["delete", &id]);
}

#[test]
fn preserved_descriptors_reach_the_container() {
    let mut r = Runc::new();
    r.set_process(&["/bin/sh", "-c", "echo through-fd-3 >&3"]);
    let id = r.id("fds");
    let out = r.dir.path().join("fd3");
    let silo = env!("CARGO_BIN_EXE_silo");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 3>{} && exec {silo} --root {} run --preserve-fds 1 --bundle {} {id}",
            out.display(),
            r.root().display(),
            r.bundle().display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "through-fd-3\n");

    // Socket activation: what systemd passed goes on, with the variables for PID 1.
    r.set_process(&["/bin/sh", "-c", "echo $LISTEN_FDS $LISTEN_PID >&3"]);
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 3>{} && LISTEN_FDS=1 exec {silo} --root {} run --bundle {} {id}",
            out.display(),
            r.root().display(),
            r.bundle().display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "1 1\n");

    // Descriptors that are not there cannot be passed on.
    let bundle = r.bundle();
    let err = r.fails(&[
        "run",
        "--preserve-fds",
        "40",
        "--bundle",
        bundle.to_str().unwrap(),
        &id,
    ]);
    assert!(err.contains("is not open"), "{err}");
}

#[test]
fn hooks_run_at_their_points_with_the_state() {
    let mut r = Runc::new();
    let id = r.id("hooks");
    let seen = r.dir.path().join("seen");
    std::fs::create_dir(&seen).unwrap();
    let host_hook = |name: &str| {
        let file = seen.join(name);
        serde_json::json!({"path": "/bin/sh",
            "args": ["sh", "-c", format!("cat > {}", file.display())]})
    };
    // createContainer runs in the container's mount namespace once its mounts are in place
    // (its /dev, below the rootfs) and before its root switch (the host's /bin/sh).
    let rootfs = common::bundle().join("rootfs");
    let mounts = seen.join("mounts");
    let create_container = serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c",
        format!("cat > {}; grep ' {}/dev ' /proc/self/mountinfo > {}",
            seen.join("createContainer").display(), rootfs.display(), mounts.display())]});
    let hooks = serde_json::json!({
        "createRuntime": [host_hook("createRuntime")],
        "createContainer": [create_container],
        "poststart": [host_hook("poststart")],
        "poststop": [host_hook("poststop")],
    });
    r.config(&["/bin/sleep", "30"], |cfg| cfg["hooks"] = hooks);
    r.create(&id);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seen.join("createRuntime")).unwrap()).unwrap();
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["status"], "creating");
    assert!(pid_of(&state) > 0);
    assert!(seen.join("createContainer").exists());
    let dev = std::fs::read_to_string(&mounts).unwrap();
    assert!(
        dev.contains("tmpfs"),
        "the hook did not see the container's /dev: {dev}"
    );
    assert!(!seen.join("poststart").exists());
    r.ok(&["start", &id]);
    let poststart: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seen.join("poststart")).unwrap()).unwrap();
    assert_eq!(poststart["status"], "running");
    r.ok(&["delete", "--force", &id]);
    let poststop: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seen.join("poststop")).unwrap()).unwrap();
    assert_eq!(poststop["status"], "stopped");

    // A failing hook fails the create, in its own words.
    let broken = serde_json::json!({"createRuntime": [
        {"path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 2"]}]});
    r.config(&["/bin/true"], |cfg| cfg["hooks"] = broken);
    let bundle = r.bundle();
    let err = r.fails(&["create", "--bundle", bundle.to_str().unwrap(), &id]);
    assert!(err.contains("createRuntime hook /bin/sh failed"), "{err}");
    assert!(err.contains("broken"), "{err}");
    assert!(!r.root().join(&id).exists());

    // A hook past its timeout fails the create, which leaves nothing behind.
    let slow = serde_json::json!({"createRuntime": [
        {"path": "/bin/sleep", "args": ["sleep", "10"], "timeout": 1}]});
    r.config(&["/bin/true"], |cfg| cfg["hooks"] = slow);
    let bundle = r.bundle();
    let started = Instant::now();
    let err = r.fails(&["create", "--bundle", bundle.to_str().unwrap(), &id]);
    assert!(
        err.contains("createRuntime hook /bin/sleep failed: timed out"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!r.root().join(&id).exists());
    assert_no_cgroup(&id);
}

/// startContainer runs in the container: the container's /bin/sh, its /dev/shm.
#[test]
fn start_container_hook_runs_inside() {
    let mut r = Runc::new();
    let id = r.id("inside");
    let hooks = serde_json::json!({"startContainer": [{"path": "/bin/sh",
        "args": ["sh", "-c", "cat > /dev/shm/started"]}]});
    r.config(&["/bin/sh", "-c", "cat /dev/shm/started"], |cfg| {
        cfg["hooks"] = hooks
    });
    let bundle = r.bundle();
    let out = r.silo(&["run", "--bundle", bundle.to_str().unwrap(), &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["status"], "created");
}

#[test]
fn spec_features_and_version() {
    let r = Runc::new();
    let dir = r.dir.path().join("new");
    std::fs::create_dir(&dir).unwrap();
    r.ok(&["spec", "--bundle", dir.to_str().unwrap()]);
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(spec["root"]["path"], "rootfs");
    let err = r.fails(&["spec", "--bundle", dir.to_str().unwrap()]);
    assert!(err.contains("exists"), "{err}");

    let features: serde_json::Value = serde_json::from_str(&r.ok(&["features"])).unwrap();
    assert!(features["hooks"].as_array().unwrap().len() == 6);
    assert!(features["linux"]["namespaces"].is_array());

    let out = Command::new(env!("CARGO_BIN_EXE_silo"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("silo version "), "{text}");
}

#[test]
fn run_passes_sigterm_on_to_the_container() {
    let mut r = Runc::new();
    r.set_process(&[
        "/bin/sh",
        "-c",
        "trap 'exit 9' TERM; while :; do sleep 0.1; done",
    ]);
    let id = r.id("sigterm");
    let bundle = r.bundle();
    let mut run = r
        .cmd()
        .args(["run", "--bundle", bundle.to_str().unwrap(), &id])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.silo(&["state", &id]).stdout.is_empty() || r.status(&id) != "running" {
        assert!(Instant::now() < deadline, "the container never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The trap is set once the shell runs its loop.
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let code = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline + Duration::from_secs(10) {
            let _ = run.kill();
            let _ = run.wait();
            panic!("silo run did not end after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(9));
    assert!(!r.root().join(&id).exists(), "run deletes the container");
}

/// Receives one descriptor sent with SCM_RIGHTS on `stream`.
fn receive_fd(stream: &std::os::unix::net::UnixStream) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    for cmsg in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just gave us this descriptor.
            return unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no descriptor came over the console socket");
}

/// Reads a terminal's master until the other end closes (EIO), or for 10 s at most.
fn read_terminal(master: std::os::fd::OwnedFd) -> String {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(100u16));
        let mut buf = [0u8; 256];
        match nix::unistd::read(&master, &mut buf) {
            Ok(0) | Err(nix::errno::Errno::EIO) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_terminal_goes_to_the_console_socket() {
    let mut r = Runc::new();
    r.config(&["/bin/sh", "-c", "tty; sleep 30"], |cfg| {
        cfg["process"]["terminal"] = true.into()
    });
    let id = r.id("tty");
    let bundle = r.bundle();
    let bundle = bundle.to_str().unwrap();
    let err = r.fails(&["create", "--bundle", bundle, &id]);
    assert!(err.contains("--console-socket"), "{err}");
    assert!(!r.root().join(&id).exists());

    let socket = r.dir.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let accept = std::thread::spawn(move || receive_fd(&listener.accept().unwrap().0));
    let socket = socket.to_str().unwrap();
    r.ok(&[
        "create",
        "--bundle",
        bundle,
        "--console-socket",
        socket,
        &id,
    ]);
    let master = accept.join().unwrap();
    r.ok(&["start", &id]);
    // The shell's `tty`, then an exec'd one on a terminal of its own.
    let listener = std::os::unix::net::UnixListener::bind(r.dir.path().join("exec.sock"));
    let listener = listener.unwrap();
    let accept = std::thread::spawn(move || receive_fd(&listener.accept().unwrap().0));
    let exec_socket = r.dir.path().join("exec.sock");
    let out = r.silo(&[
        "exec",
        "--tty",
        "--console-socket",
        exec_socket.to_str().unwrap(),
        &id,
        "/bin/sh",
        "-c",
        "tty; exit 6",
    ]);
    assert_eq!(out.status.code(), Some(6));
    let exec_out = read_terminal(accept.join().unwrap());
    assert!(exec_out.contains("/dev/pts/1"), "{exec_out:?}");
    r.ok(&["kill", &id, "KILL"]);
    let init_out = read_terminal(master);
    assert!(init_out.contains("/dev/pts/0"), "{init_out:?}");
    r.wait_status(&id, "stopped");
}

#[test]
fn a_pid_namespace_is_joined_by_path() {
    let mut r = Runc::new();
    let first = r.id("pidns-a");
    r.set_process(&["/bin/sleep", "30"]);
    r.create(&first);
    r.ok(&["start", &first]);
    let pid = pid_of(&r.state(&first));
    let second = r.id("pidns-b");
    let ns = format!("/proc/{pid}/ns/pid");
    r.config(&["/bin/sh", "-c", "cat /proc/1/cmdline; echo"], |cfg| {
        let namespaces = cfg["linux"]["namespaces"].as_array_mut().unwrap();
        for n in namespaces.iter_mut() {
            if n["type"] == "pid" {
                n["path"] = ns.clone().into();
            }
        }
    });
    let bundle = r.bundle();
    let out = r.silo(&["run", "--bundle", bundle.to_str().unwrap(), &second]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("/bin/sleep"),
        "it sees the first container's init: {stdout:?}"
    );
    r.ok(&["delete", "--force", &first]);
}
