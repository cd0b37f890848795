//! One session with the host: dial, handshake, receive the job, run it, report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentlab_protocol::transport::vsock;
use agentlab_protocol::{
    AGENT_VSOCK_PORT, Capabilities, GUEST_SECRETS_DIR, GuestConnection, GuestMessage, HOST_CID, Hello, HelloAck,
    HostMessage, JobOutcome, JobResult, JobSpec, MIN_PROTOCOL_VERSION, MessageKind, PROTOCOL_VERSION, ProtocolError,
    guest_handshake,
};
use agentlab_redact::Redactor;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::AgentError;
use crate::link::{Event, Link};
use crate::secrets::{self, SecretsDir};
use crate::status::{JobStatus, Phase, StatusBoard};
use crate::{STATUS_SOCKET, agentlog, artifacts, job, sysinfo, upload};

/// How long the agent waits for the host to accept its connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_RETRY: Duration = Duration::from_millis(10);

#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Host CID to dial.
    #[arg(long, default_value_t = HOST_CID)]
    pub cid: u32,
    /// Host vsock port to dial.
    #[arg(long, default_value_t = AGENT_VSOCK_PORT)]
    pub port: u32,
    /// Dial this Unix socket instead of vsock (development and tests on a host).
    #[arg(long, conflicts_with = "cid")]
    pub unix: Option<PathBuf>,
    /// Where to answer `agentlab-agent status`.
    #[arg(long, default_value = STATUS_SOCKET)]
    pub status_socket: PathBuf,
    /// Where to mount the job's secrets tmpfs.
    #[arg(long, default_value = GUEST_SECRETS_DIR)]
    pub secrets_dir: PathBuf,
}

impl Default for RunArgs {
    fn default() -> Self {
        Self {
            cid: HOST_CID,
            port: AGENT_VSOCK_PORT,
            unix: None,
            status_socket: PathBuf::from(STATUS_SOCKET),
            secrets_dir: PathBuf::from(GUEST_SECRETS_DIR),
        }
    }
}

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub fn run_blocking(args: RunArgs) -> Result<(), AgentError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AgentError::Runtime)?.block_on(run(args))
}

/// The agent's connection as a boxed stream, vsock or Unix.
pub type BoxStream = Box<dyn Stream>;

/// Dials the host and says Hello; also how a dropped link re-dials.
pub struct Dialer {
    args: RunArgs,
    target: String,
}

impl Dialer {
    fn hello() -> Hello {
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            capabilities: Capabilities::ALL,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel_release: sysinfo::kernel_release(),
            landlock_abi: sysinfo::landlock_abi(),
        }
    }

    /// The first connection: retried until [`CONNECT_TIMEOUT`] (the host may not be
    /// listening yet).
    async fn dial_first(&self) -> Result<(GuestConnection<BoxStream>, HelloAck), AgentError> {
        let stream = connect(&self.args, &self.target).await?;
        let mut conn = GuestConnection::new(stream);
        let ack = guest_handshake(&mut conn, Self::hello()).await?;
        Ok((conn, ack))
    }

    /// One attempt, for re-dialing after the host went away.
    pub async fn dial_once(&self) -> Result<GuestConnection<BoxStream>, AgentError> {
        let stream = connect_once(&self.args).await?;
        let mut conn = GuestConnection::new(stream);
        guest_handshake(&mut conn, Self::hello()).await?;
        Ok(conn)
    }
}

async fn run(args: RunArgs) -> Result<(), AgentError> {
    let target = match &args.unix {
        Some(path) => format!("unix:{}", path.display()),
        None => format!("vsock:{}:{}", args.cid, args.port),
    };
    let board = StatusBoard::new(target.clone());
    board.update(|s| s.secrets = secrets::none_status(&args.secrets_dir));
    tokio::spawn(crate::status::serve(args.status_socket.clone(), board.clone()));
    // Installed before anything else can fail, so a stop request always finds it.
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(AgentError::Signal)?;

    let dialer = Arc::new(Dialer { args: args.clone(), target: target.clone() });
    let (mut conn, ack) = dialer.dial_first().await?;
    tracing::info!("connected to {target} as {} (protocol v{})", ack.sandbox_id, ack.version);
    board.update(|s| {
        s.channel.up = true;
        s.channel.protocol_version = Some(ack.version);
        s.channel.sandbox_id = Some(ack.sandbox_id.clone());
    });

    let spec = match conn.recv_required("a job").await? {
        HostMessage::Job(spec) => spec,
        HostMessage::Shutdown => return Ok(()),
        other => {
            return Err(ProtocolError::Unexpected { expected: "Job", got: other.kind().to_owned() }.into());
        }
    };
    board.update(|s| s.job = Some(JobStatus { id: spec.job_id.clone(), phase: Phase::ReceivingWorkdir, pid: None }));

    let (mut installed, redactor) = match take_secrets(&mut conn, &ack, &args.secrets_dir, &spec).await {
        Ok(taken) => taken,
        Err(err) => {
            let _ = conn.send(GuestMessage::AgentError { reason: err.to_string() }).await;
            return Err(err);
        }
    };
    if let Some(dir) = &installed {
        board.update(|s| s.secrets = dir.status.clone());
    }
    let env_dir = installed.as_ref().map(SecretsDir::env_dir);

    let workdir = Path::new(&spec.workdir);
    if let Err(err) = prepare_workdir(&mut conn, workdir, spec.workdir_upload_bytes).await {
        let _ = conn.send(GuestMessage::AgentError { reason: err.to_string() }).await;
        return Err(err);
    }
    board.set_phase(Phase::Running);
    let resumable = ack.capabilities.contains(Capabilities::RESUME);
    let mut link = Link::new(conn, dialer.clone(), &spec.job_id, resumable);
    let secrets = job::JobSecrets { env_dir, redactor: redactor.clone() };
    let ran = tokio::select! {
        ran = job::run(&mut link, &spec, &board, &args.status_socket, &secrets) => ran,
        _ = terminate.recv() => {
            // The job's future (and its main process, kill_on_drop) is gone;
            // whatever else the job started goes with its group.
            if let Some(pid) = board.snapshot().job.and_then(|j| j.pid) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)), nix::sys::signal::Signal::SIGKILL);
            }
            Err(AgentError::Terminated)
        }
    };
    // Job over (or stopped): the secrets go before anything is reported.
    if let Some(dir) = installed.as_mut() {
        dir.wipe();
        board.update(|s| s.secrets = dir.status.clone());
    }
    let result = ran?;
    board.set_phase(Phase::Reporting);
    let report = report_json(&spec, &result);
    finish(&mut link, result, report, workdir, &redactor, &board).await?;
    board.set_phase(Phase::Done);
    Ok(())
}

/// After the job: the rest of its output, its result, the artifacts when asked, until
/// the host says the result is stored. Through the host going away, too: once it is
/// back, whatever it has not stored goes again. No time limit while the host is there:
/// a sandbox kept after its job (`--keepalive`) waits here until the host ends it.
async fn finish(
    link: &mut Link,
    result: JobResult,
    report: Vec<u8>,
    workdir: &Path,
    redactor: &Redactor,
    board: &StatusBoard,
) -> Result<(), AgentError> {
    let mut result_sent = false;
    loop {
        link.pump().await;
        if !result_sent && link.is_up() && link.sent_everything() {
            result_sent = link.send(GuestMessage::JobFinished(result.clone())).await;
        }
        match link.next().await? {
            Event::Message(HostMessage::OutputAck { seq }) => link.ack(seq),
            Event::Message(HostMessage::CollectArtifacts(request)) => {
                board.set_phase(Phase::PushingArtifacts);
                let files = artifacts::AgentFiles { report_json: report.clone(), agent_log: agentlog::snapshot() };
                if let Some(conn) = link.conn() {
                    match artifacts::push(conn, &request, workdir, files, redactor).await {
                        Ok(summary) => tracing::info!(
                            "artifacts pushed: {} bytes{}",
                            summary.bytes,
                            if summary.skipped.is_empty() {
                                String::new()
                            } else {
                                format!(", {} left out", summary.skipped.len())
                            }
                        ),
                        Err(e) => link.lose(&format!("pushing the artifacts: {e}")),
                    }
                }
                board.set_phase(Phase::Reporting);
            }
            Event::Message(HostMessage::Shutdown) => return Ok(()),
            Event::Message(_) => {}
            Event::Resumed => result_sent = false,
        }
    }
}

/// `report.json`, pushed with the artifacts: the result as the agent saw it.
fn report_json(spec: &JobSpec, result: &JobResult) -> Vec<u8> {
    let (outcome, exit_code, signal, reason) = match &result.outcome {
        JobOutcome::Exited { code } => ("exited", Some(*code), None, None),
        JobOutcome::Signaled { signal } => ("signaled", None, Some(*signal), None),
        JobOutcome::TimedOut { signal } => ("timed-out", None, Some(*signal), None),
        JobOutcome::Cancelled { signal } => ("cancelled", None, Some(*signal), None),
        JobOutcome::SpawnFailed { reason } => ("spawn-failed", None, None, Some(reason.as_str())),
    };
    let report = serde_json::json!({
        "job_id": spec.job_id,
        "outcome": outcome,
        "exit_code": exit_code,
        "signal": signal,
        "reason": reason,
        "duration_ms": result.duration_ms,
        "output_bytes": result.output_bytes,
        "commit": artifacts::git_commit(Path::new(&spec.workdir)),
        "enforcement": result.enforcement,
        "agent_version": env!("CARGO_PKG_VERSION"),
    });
    serde_json::to_vec_pretty(&report).unwrap_or_default()
}

/// Asks the host for the job's secrets (once), mounts the tmpfs and writes them there if
/// there are any, and returns the redactor for the job's output.
async fn take_secrets<S: Stream>(
    conn: &mut GuestConnection<S>,
    ack: &HelloAck,
    dir: &Path,
    spec: &JobSpec,
) -> Result<(Option<SecretsDir>, Redactor), AgentError> {
    if !ack.capabilities.contains(Capabilities::SECRETS) {
        return Ok((None, Redactor::new(Vec::<Vec<u8>>::new())));
    }
    conn.send(GuestMessage::RequestSecrets).await?;
    let bundle = match conn.recv_required("the job's secrets").await? {
        HostMessage::Secrets(bundle) => bundle,
        HostMessage::SecretsRefused { reason } => return Err(AgentError::SecretsRefused(reason)),
        other => return Err(ProtocolError::Unexpected { expected: "Secrets", got: other.kind().to_owned() }.into()),
    };
    let redactor = Redactor::new(bundle.values());
    if bundle.entries.is_empty() {
        return Ok((None, redactor));
    }
    // The job's group may read file secrets only where its profile lets it.
    let readable_by = match &spec.sandbox.secrets_dir {
        Some(allowed) if Path::new(allowed) == dir => Some(
            crate::sandbox::passwd::lookup(Path::new(crate::sandbox::passwd::PASSWD), &spec.sandbox.user)
                .map_err(|e| AgentError::Secrets(e.to_string()))?
                .gid,
        ),
        _ => None,
    };
    let (dir, readable_by) = (dir.to_owned(), readable_by);
    let installed = tokio::task::spawn_blocking(move || SecretsDir::install(&dir, &bundle, readable_by))
        .await
        .map_err(|e| AgentError::Secrets(e.to_string()))?
        .map_err(|e| AgentError::Secrets(e.to_string()))?;
    Ok((Some(installed), redactor))
}

async fn connect(args: &RunArgs, target: &str) -> Result<BoxStream, AgentError> {
    let started = Instant::now();
    loop {
        match connect_once(args).await {
            Ok(stream) => return Ok(stream),
            Err(source) if started.elapsed() >= CONNECT_TIMEOUT => {
                return Err(AgentError::Connect { target: target.to_owned(), secs: CONNECT_TIMEOUT.as_secs(), source });
            }
            Err(_) => tokio::time::sleep(CONNECT_RETRY).await,
        }
    }
}

async fn connect_once(args: &RunArgs) -> Result<BoxStream, ProtocolError> {
    let stream = match &args.unix {
        Some(path) => tokio::net::UnixStream::connect(path)
            .await
            .map(|s| Box::new(s) as BoxStream)
            .map_err(|e| ProtocolError::io(format!("connecting to {}", path.display()), e))?,
        None => vsock::connect(args.cid, args.port).await.map(|s| Box::new(s) as BoxStream)?,
    };
    Ok(stream)
}

async fn prepare_workdir<S: Stream>(
    conn: &mut GuestConnection<S>,
    workdir: &Path,
    upload_bytes: Option<u64>,
) -> Result<(), AgentError> {
    if !workdir.is_absolute() {
        return Err(AgentError::Workdir {
            path: workdir.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the workdir must be an absolute path"),
        });
    }
    tokio::fs::create_dir_all(workdir)
        .await
        .map_err(|source| AgentError::Workdir { path: workdir.display().to_string(), source })?;
    if let Some(total) = upload_bytes {
        upload::receive(conn, total, workdir).await?;
    }
    Ok(())
}
