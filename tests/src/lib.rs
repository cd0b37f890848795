//! Shared harness for the integration and end-to-end tests: locating the built
//! binaries and the micro image, and running a throwaway agentlabd.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A harness fails loudly by design.

pub mod netns;
pub mod pve;
pub mod pve_bench;

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

/// The name of the user running the tests, from /etc/passwd.
pub fn current_user() -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").unwrap().uid().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.get(2) == Some(&uid.as_str())).then(|| f[0].to_owned())
        })
        .unwrap()
}

/// Appends one tar entry with a raw header (any path, any type byte), as a hostile
/// guest could write it; the tar crate's builder would refuse most of these.
pub fn raw_tar_entry(out: &mut Vec<u8>, path: &str, kind: u8, link: &str, data: &[u8]) {
    let mut header = [0u8; 512];
    header[..path.len()].copy_from_slice(path.as_bytes());
    header[100..107].copy_from_slice(b"0000644");
    header[108..115].copy_from_slice(b"0000000");
    header[116..123].copy_from_slice(b"0000000");
    header[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = kind;
    header[157..157 + link.len()].copy_from_slice(link.as_bytes());
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// Whether the host's kernel is at least `major.minor`.
pub fn host_kernel_at_least(major: u32, minor: u32) -> bool {
    let release = host_kernel();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let found: (u32, u32) = (
        parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
        parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
    );
    found >= (major, minor)
}

/// A throwaway agentlabd with its own state directory, killed on drop.
pub struct Daemon {
    pub state: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
    /// The arguments it was started with, which a restart repeats (not its environment,
    /// so a crash point is not).
    args: Vec<String>,
}

/// Starts agentlabd on `state` and waits until it serves its socket.
fn spawn_daemon(state: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Child {
    let socket = state.join("agentlabd.sock");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(state.join("agentlabd.log")).unwrap();
    let mut child = Command::new(bin("agentlabd"))
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .env("AGENTLAB_IMAGE_DIR", image_dir_or_missing())
        .env("AGENTLAB_PROFILES_DIR", workspace_root().join("profiles"))
        .env("AGENTLAB_LOG", "info,agentlab_host=debug")
        .envs(envs.iter().copied())
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
        Self::start_with_env(extra, &[])
    }

    /// A daemon with extra arguments and environment variables.
    pub fn start_with_env(extra: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let state = tempfile::Builder::new().prefix("agentlab-test-").tempdir().unwrap();
        let socket = state.path().join("agentlabd.sock");
        let child = spawn_daemon(state.path(), extra, envs);
        Daemon { state, socket, child, args: extra.iter().map(|a| (*a).to_owned()).collect() }
    }

    /// SIGKILLs the daemon (no clean-up of any kind) and starts a new one on the same state.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.restart();
    }

    /// `kill -9` of the daemon; [`Self::restart_with`] starts the next one.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts a daemon on the same state, with the same arguments, after [`Self::kill`].
    pub fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = spawn_daemon(self.state.path(), &args, &[]);
    }

    /// Waits (at most `within`) for the daemon to end by itself, as a crash point ends
    /// it; then starts a new one on the same state, without the crash point.
    pub fn wait_for_crash_and_restart(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "agentlabd did not reach its crash point:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        self.restart();
        status
    }

    /// Waits (at most 120 s) until job `job_id` has ended; returns its record.
    pub fn wait_for_job_end(&self, job_id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let job = self.job_json(job_id);
            if ["COMPLETED", "FAILED", "TIMEOUT"].contains(&job["state"].as_str().unwrap()) {
                return job;
            }
            assert!(Instant::now() < deadline, "job did not end: {job}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every sandbox is DESTROYED and no sandbox directory is left: a job's
    /// result is stored before its sandbox is torn down, so the teardown may still run.
    pub fn wait_for_teardowns(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list: serde_json::Value =
                serde_json::from_slice(&self.cli(&["--json", "sandbox", "list"]).stdout).unwrap();
            let all_gone = list.as_array().unwrap().iter().all(|s| s["state"] == "DESTROYED");
            if all_gone && self.live_sandbox_dirs().is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "sandboxes not torn down: {list}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pids of [`Daemon::processes_using_state`].
    pub fn pids_using_state(&self) -> Vec<u32> {
        let needle = self.state.path().to_str().unwrap().to_owned();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && !cmdline.contains("agentlabd") {
                found.push(pid);
            }
        }
        found
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

    /// Runs `agentlab ARGS` with `input` on its stdin.
    pub fn cli_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(bin("agentlab"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
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
        // Sandboxes outlive a killed daemon by design; a test's must not outlive the test.
        for pid in self.pids_using_state() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
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
    /// `kind name` of each entry of each bundle delivered.
    pub secrets_delivered: Vec<Vec<String>>,
    pub secrets_refused: Vec<String>,
}

impl agentlab_host::channel::SessionObserver for SessionRecord {
    fn handshake_done(&mut self, hello: &agentlab_protocol::Hello, _ack: &agentlab_protocol::HelloAck) {
        self.hello = Some(hello.clone());
    }
    fn secrets_delivered(&mut self, bundle: &agentlab_protocol::SecretBundle) {
        self.secrets_delivered.push(bundle.entries.iter().map(|e| format!("{} {}", e.kind.as_str(), e.name)).collect());
    }
    fn secrets_refused(&mut self, reason: &str) {
        self.secrets_refused.push(reason.to_owned());
    }
    fn job_started(&mut self, pid: u32) {
        self.pid = Some(pid);
    }
    fn output(&mut self, chunk: &agentlab_protocol::OutputChunk) -> std::io::Result<bool> {
        self.chunks += 1;
        match chunk.stream {
            agentlab_protocol::OutputStream::Stdout => self.stdout.extend_from_slice(&chunk.data),
            agentlab_protocol::OutputStream::Stderr => self.stderr.extend_from_slice(&chunk.data),
        }
        Ok(true)
    }
}

/// The messages of a job's events of one kind (from `job show --json`), in order.
pub fn event_messages<'a>(job: &'a serde_json::Value, kind: &str) -> Vec<&'a str> {
    let events = job["events"].as_array().unwrap_or_else(|| panic!("a job record without events: {job}"));
    events
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["message"].as_str().unwrap_or_else(|| panic!("a {kind} event without a message: {e}")))
        .collect()
}

impl Daemon {
    /// Submits `cmd` (`job submit --json`) and waits until the job runs; returns its job
    /// and sandbox ids.
    pub fn submit_running(&self, cmd: &str) -> (String, String) {
        let out = self.cli(&["--json", "job", "submit", "--cmd", cmd]);
        assert!(out.status.success(), "{}", describe(&out));
        let ids: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (job_id, sandbox_id) = (ids["job_id"].as_str().unwrap(), ids["sandbox_id"].as_str().unwrap());
        self.wait_for_running(job_id);
        (job_id.to_owned(), sandbox_id.to_owned())
    }

    /// Waits (at most 90 s) until job `job_id` has stored some output.
    pub fn wait_for_output(&self, job_id: &str) {
        let log_path = self.state.path().join("jobs").join(job_id).join("output.log");
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::fs::metadata(&log_path).map_or(0, |m| m.len()) == 0 {
            assert!(Instant::now() < deadline, "job {job_id} never printed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 90 s) until job `job_id` is RUNNING.
    pub fn wait_for_running(&self, job_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.job_json(job_id)["state"] != "RUNNING" {
            assert!(Instant::now() < deadline, "the job never ran: {}\n{}", self.job_json(job_id), self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A job that runs `cmd` under `/bin/sh -c` in `workdir`: no extra environment, no
/// upload, a 30 s limit and 300 ms kill grace. Callers change other fields with
/// struct-update syntax.
pub fn sh_job(
    job_id: &str,
    workdir: &Path,
    cmd: &str,
    sandbox: agentlab_protocol::SandboxSpec,
) -> agentlab_protocol::JobSpec {
    agentlab_protocol::JobSpec {
        job_id: job_id.to_owned(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), cmd.into()],
        env: Vec::new(),
        workdir: workdir.display().to_string(),
        timeout_ms: 30_000,
        kill_grace_ms: 300,
        workdir_upload_bytes: None,
        sandbox,
    }
}

/// The agent must run as root to switch users and mount the secrets tmpfs; tests that
/// need it fail loudly rather than pass without running.
pub fn require_root() {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata("/proc/self").unwrap().uid(), 0, "run the tests as root (make test does)");
}

/// What [`run_agent_job`] returns: the session's result, what it saw, how the agent exited.
pub type AgentRun = (
    Result<agentlab_protocol::JobResult, agentlab_host::channel::SessionError>,
    SessionRecord,
    std::process::ExitStatus,
);

/// Runs the real agent binary on this host, dialing a Unix socket in `dir` (its status
/// socket is `dir/status.sock`, its secrets tmpfs `dir/secrets`), and drives one job
/// through the real host session.
pub async fn run_agent_job(dir: &Path, spec: agentlab_protocol::JobSpec, upload: Option<&Path>) -> AgentRun {
    run_agent_job_with_secrets(dir, spec, agentlab_protocol::SecretBundle::default(), upload).await
}

/// Starts the real agent binary on this host, dialing `dir/agent.sock` (status socket
/// `dir/status.sock`, secrets tmpfs `dir/secrets`); returns it and the host's end of its
/// connection.
pub async fn spawn_agent(dir: &Path) -> (tokio::process::Child, tokio::net::UnixStream) {
    let sock = dir.join("agent.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let agent = tokio::process::Command::new(bin("agentlab-agent"))
        .arg("run")
        .arg("--unix")
        .arg(&sock)
        .arg("--status-socket")
        .arg(dir.join("status.sock"))
        .arg("--secrets-dir")
        .arg(dir.join("secrets"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.unwrap().unwrap();
    (agent, stream)
}

/// [`run_agent_job`] with a secrets bundle for the agent to ask for.
pub async fn run_agent_job_with_secrets(
    dir: &Path,
    spec: agentlab_protocol::JobSpec,
    secrets: agentlab_protocol::SecretBundle,
    upload: Option<&Path>,
) -> AgentRun {
    run_agent_job_full(dir, spec, secrets, upload, None).await.0
}

/// The artifact stream an agent pushed: its summary and the tar bytes.
pub type Pushed = (agentlab_protocol::ArtifactSummary, Vec<u8>);

/// [`run_agent_job`] with secrets, and after the result a request for artifacts.
pub async fn run_agent_job_full(
    dir: &Path,
    spec: agentlab_protocol::JobSpec,
    secrets: agentlab_protocol::SecretBundle,
    upload: Option<&Path>,
    artifacts: Option<agentlab_protocol::ArtifactRequest>,
) -> (AgentRun, Option<Result<Pushed, agentlab_host::channel::SessionError>>) {
    let (mut agent, stream) = spawn_agent(dir).await;
    let mut session = agentlab_host::channel::HostSession::new(stream);
    let mut seen = SessionRecord::default();
    let result = session.run("sb-test", spec, secrets, upload, &mut seen).await;
    let pushed = match (&result, artifacts) {
        (Ok(_), Some(request)) => {
            let mut tar = Vec::new();
            let collected = session.collect_artifacts(request, &mut tar, &mut seen).await;
            Some(collected.map(|summary| (summary.expect("the agent supports artifacts"), tar)))
        }
        _ => None,
    };
    session.shutdown().await;
    drop(session);
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await.unwrap().unwrap();
    ((result, seen, status), pushed)
}

/// A vhost-device-vsock for one guest started by hand (CID 3): the same plumbing as
/// agentlabd's qemu backend, which runs one per VM. Killed when dropped.
pub struct VsockDevice {
    child: tokio::process::Child,
    /// The vhost-user socket QEMU's `vhost-user-vsock-pci` connects to.
    pub vhost_sock: PathBuf,
    /// The hybrid vsock socket the host side listens and dials on.
    pub uds: PathBuf,
}

impl VsockDevice {
    pub async fn start(dir: &Path) -> VsockDevice {
        let (vhost_sock, uds) = (dir.join("vhost.sock"), dir.join("vsock.sock"));
        let child = tokio::process::Command::new("vhost-device-vsock")
            .arg("--vm")
            .arg(format!("guest-cid=3,socket={},uds-path={}", vhost_sock.display(), uds.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("vhost-device-vsock (scripts/install-deps.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vhost_sock.exists() {
            assert!(Instant::now() < deadline, "vhost-device-vsock made no {} within 10 s", vhost_sock.display());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        VsockDevice { child, vhost_sock, uds }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The last 3000 bytes of a guest's console log, for failure messages.
pub fn console_tail(console: &Path) -> String {
    let bytes = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(3000)..]).into_owned()
}

/// The guest agent's dial-in on `listener` within `within`, or a panic that shows the
/// console's tail.
pub async fn accept_dial_in(
    listener: &tokio::net::UnixListener,
    console: &Path,
    within: Duration,
) -> tokio::net::UnixStream {
    let (stream, _) = tokio::time::timeout(within, listener.accept())
        .await
        .unwrap_or_else(|_| panic!("no dial-in within {within:?}; console:\n{}", console_tail(console)))
        .unwrap();
    stream
}
