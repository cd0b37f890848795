//! The in-guest diagnostic: the running agent publishes its state on a local Unix
//! socket, and `agentlab-agent status` prints it. Names and phases only, never
//! secrets or output.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::secrets::SecretsStatus;
use crate::sysinfo;

const MAX_STATUS_BYTES: u64 = 64 * 1024;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentStatus {
    pub agent_version: String,
    /// Whether an agent process answered on the status socket.
    pub agent_running: bool,
    pub kernel_release: String,
    pub landlock_abi: u32,
    pub channel: ChannelStatus,
    pub job: Option<JobStatus>,
    /// The secrets tmpfs: names and state, never values.
    #[serde(default)]
    pub secrets: SecretsStatus,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelStatus {
    pub up: bool,
    /// `vsock:2:52000` or `unix:PATH`.
    pub target: String,
    pub protocol_version: Option<u16>,
    pub sandbox_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobStatus {
    pub id: String,
    pub phase: Phase,
    pub pid: Option<u32>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    ReceivingWorkdir,
    Running,
    Reporting,
    PushingArtifacts,
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::ReceivingWorkdir => "receiving-workdir",
            Phase::Running => "running",
            Phase::Reporting => "reporting",
            Phase::PushingArtifacts => "pushing-artifacts",
            Phase::Done => "done",
        }
    }
}

/// The agent's live state, shared between the session and the status server.
#[derive(Clone)]
pub struct StatusBoard(Arc<Mutex<AgentStatus>>);

impl StatusBoard {
    pub fn new(target: String) -> Self {
        Self(Arc::new(Mutex::new(AgentStatus {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            agent_running: true,
            kernel_release: sysinfo::kernel_release(),
            landlock_abi: sysinfo::landlock_abi(),
            channel: ChannelStatus { target, ..ChannelStatus::default() },
            job: None,
            secrets: SecretsStatus::default(),
        })))
    }

    pub fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn snapshot(&self) -> AgentStatus {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn set_phase(&self, phase: Phase) {
        self.update(|s| {
            if let Some(job) = s.job.as_mut() {
                job.phase = phase;
            }
        });
    }
}

/// Serves the status socket until the process exits. Failures only disable status.
pub async fn serve(path: PathBuf, board: StatusBoard) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("status socket {} unavailable: {e}", path.display());
            return;
        }
    };
    // Readable by the job's user too: it holds names and phases only.
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let body = serde_json::to_vec(&board.snapshot()).unwrap_or_default();
        tokio::spawn(async move {
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Asks the running agent; without one, reports what this process can see itself.
pub fn query(socket: &Path) -> AgentStatus {
    let answer = std::os::unix::net::UnixStream::connect(socket).and_then(|stream| {
        let mut body = Vec::new();
        stream.take(MAX_STATUS_BYTES).read_to_end(&mut body)?;
        serde_json::from_slice::<AgentStatus>(&body).map_err(std::io::Error::other)
    });
    answer.unwrap_or_else(|_| {
        let mut local = StatusBoard::new(String::new()).snapshot();
        local.agent_running = false;
        local
    })
}

pub fn print_status(socket: &Path, json: bool) -> ExitCode {
    let status = query(socket);
    if json {
        println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
    } else {
        print!("{}", render(&status, socket));
    }
    if status.agent_running { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn render(s: &AgentStatus, socket: &Path) -> String {
    let running =
        if s.agent_running { "yes".to_owned() } else { format!("no (nothing answers on {})", socket.display()) };
    let channel = match (s.channel.up, s.channel.protocol_version) {
        (true, Some(v)) => format!("up ({}, protocol v{v})", s.channel.target),
        _ if s.agent_running => format!("down (dialing {})", s.channel.target),
        _ => "down".to_owned(),
    };
    let job = match &s.job {
        Some(j) => {
            format!("{} ({}{})", j.id, j.phase.as_str(), j.pid.map(|p| format!(", pid {p}")).unwrap_or_default())
        }
        None => "none".to_owned(),
    };
    let landlock = if s.landlock_abi == 0 { "not supported".to_owned() } else { format!("ABI {}", s.landlock_abi) };
    let secrets = render_secrets(&s.secrets);
    format!(
        "agent version:  {}\nagent running:  {running}\nkernel:         {}\nhost channel:   {channel}\nsandbox:        {}\ncurrent job:    {job}\nlandlock:       {landlock}\nsecrets:        {secrets}\n",
        s.agent_version,
        s.kernel_release,
        s.channel.sandbox_id.as_deref().unwrap_or("-"),
    )
}

fn render_secrets(s: &SecretsStatus) -> String {
    match s.state.as_str() {
        "" => "-".to_owned(),
        "none" => format!("none (no tmpfs on {})", s.dir),
        "mounted" => format!(
            "tmpfs on {} ({}; swap {}): {}",
            s.dir,
            s.options,
            if s.noswap { "off" } else { "possible, kernel < 6.4 has no noswap" },
            s.names.join(", ")
        ),
        state => format!("{state} ({}): {}", s.dir, s.names.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_round_trips_through_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let board = StatusBoard::new("unix:/x".into());
        board.update(|s| {
            s.channel.up = true;
            s.channel.protocol_version = Some(1);
            s.job = Some(JobStatus { id: "job-1".into(), phase: Phase::Running, pid: Some(7) });
        });
        tokio::spawn(serve(path.clone(), board.clone()));
        let mut got = None;
        for _ in 0..100 {
            let p = path.clone();
            let s = tokio::task::spawn_blocking(move || query(&p)).await.unwrap();
            if s.agent_running {
                got = Some(s);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let got = got.unwrap();
        assert_eq!(got, board.snapshot());
        let text = render(&got, &path);
        assert!(text.contains("host channel:   up (unix:/x, protocol v1)\n"), "{text}");
        assert!(text.contains("current job:    job-1 (running, pid 7)\n"), "{text}");
    }

    #[test]
    fn no_agent_is_reported_as_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let s = query(&path);
        assert!(!s.agent_running);
        assert_eq!(s.landlock_abi, sysinfo::landlock_abi());
        assert!(render(&s, &path).contains("agent running:  no (nothing answers on"));
    }
}
