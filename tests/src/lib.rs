//! Shared harness for the integration and end-to-end tests: locating the built
//! binaries and the micro image, and running a throwaway agentlabd.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A harness fails loudly by design.

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace's top directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A binary built by `cargo build --workspace` (which `make test` runs first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap(); // target/debug/deps -> target/debug
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace` first (make test does)", path.display());
    path
}

/// The micro image built by `make image`.
pub fn image_dir() -> PathBuf {
    let dir = image_dir_or_missing();
    assert!(
        dir.join("vmlinux").is_file() && dir.join("initrd.img").is_file(),
        "the micro image is not built in {}: run `make image` (make test does)",
        dir.display()
    );
    dir
}

/// The host's `uname -r`, to tell guest output from host output.
pub fn host_kernel() -> String {
    let out = Command::new("uname").arg("-r").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A throwaway agentlabd with its own state directory, killed on drop.
pub struct Daemon {
    pub state: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
}

/// Starts agentlabd on `state` and waits until it serves its socket.
fn spawn_daemon(state: &Path, extra: &[&str]) -> Child {
    let socket = state.join("agentlabd.sock");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(state.join("agentlabd.log")).unwrap();
    let mut child = Command::new(bin("agentlabd"))
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .env("AGENTLAB_IMAGE_DIR", image_dir_or_missing())
        .env("AGENTLAB_PROFILES_DIR", workspace_root().join("profiles"))
        .env("AGENTLAB_LOG", "info,agentlab_host=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        let exited = child.try_wait().unwrap().is_some();
        assert!(
            !exited && Instant::now() < deadline,
            "agentlabd did not come up: {}",
            std::fs::read_to_string(state.join("agentlabd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        let state = tempfile::Builder::new().prefix("agentlab-test-").tempdir().unwrap();
        let socket = state.path().join("agentlabd.sock");
        let child = spawn_daemon(state.path(), extra);
        Daemon { state, socket, child }
    }

    /// SIGKILLs the daemon (no clean-up of any kind) and starts a new one on the same state.
    pub fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = spawn_daemon(self.state.path(), &[]);
    }

    /// Processes other than agentlabd whose command line names this daemon's state
    /// directory: its VMs and their devices.
    pub fn processes_using_state(&self) -> Vec<String> {
        let needle = self.state.path().to_str().unwrap().to_owned();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && !cmdline.contains("agentlabd") {
                found.push(cmdline);
            }
        }
        found
    }

    /// Runs `agentlab ARGS` against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("agentlab")).arg("--socket").arg(&self.socket).args(args).output().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("agentlabd.log")).unwrap_or_default()
    }

    pub fn job_json(&self, id: &str) -> serde_json::Value {
        let out = self.cli(&["--json", "job", "show", id]);
        assert!(out.status.success(), "job show failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Sandbox directories still present (each holds a VM's sockets while it lives).
    pub fn live_sandbox_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.state.path().join("sandboxes")) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn image_dir_or_missing() -> PathBuf {
    std::env::var_os("AGENTLAB_IMAGE_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("build/image"))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Everything a host session saw from an agent during one job.
#[derive(Default)]
pub struct SessionRecord {
    pub hello: Option<agentlab_protocol::Hello>,
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub chunks: u64,
}

impl agentlab_host::channel::SessionObserver for SessionRecord {
    fn handshake_done(&mut self, hello: &agentlab_protocol::Hello, _ack: &agentlab_protocol::HelloAck) {
        self.hello = Some(hello.clone());
    }
    fn job_started(&mut self, pid: u32) {
        self.pid = Some(pid);
    }
    fn output(&mut self, chunk: &agentlab_protocol::OutputChunk) -> std::io::Result<()> {
        self.chunks += 1;
        match chunk.stream {
            agentlab_protocol::OutputStream::Stdout => self.stdout.extend_from_slice(&chunk.data),
            agentlab_protocol::OutputStream::Stderr => self.stderr.extend_from_slice(&chunk.data),
        }
        Ok(())
    }
}

/// Runs the real agent binary on this host, dialing a Unix socket in `dir` (its status
/// socket is `dir/status.sock`), and drives one job through the real host session.
/// Returns the session's result, what it saw, and how the agent process exited.
pub async fn run_agent_job(
    dir: &Path,
    spec: agentlab_protocol::JobSpec,
    upload: Option<&Path>,
) -> (Result<agentlab_protocol::JobResult, agentlab_host::channel::SessionError>, SessionRecord, std::process::ExitStatus)
{
    let sock = dir.join("agent.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let mut agent = tokio::process::Command::new(bin("agentlab-agent"))
        .arg("run")
        .arg("--unix")
        .arg(&sock)
        .arg("--status-socket")
        .arg(dir.join("status.sock"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.unwrap().unwrap();
    let mut session = agentlab_host::channel::HostSession::new(stream);
    let mut seen = SessionRecord::default();
    let result = session.run("sb-test", spec, upload, &mut seen).await;
    session.shutdown().await;
    drop(session);
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await.unwrap().unwrap();
    (result, seen, status)
}
