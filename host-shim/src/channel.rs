//! The host's end of one sandbox's session with its agent: handshake, job, workdir
//! upload, output, result. The guest is hostile: every message is checked for order,
//! sequence and size, and any violation ends the session with the reason.

use std::path::Path;
use std::time::Duration;

use agentlab_protocol::{
    ArtifactRequest, ArtifactSummary, CHUNK_WINDOW, Capabilities, GuestMessage, Hello, HelloAck, HostConnection,
    HostMessage, JobResult, JobSpec, MAX_CHUNK_LEN, MessageKind, OutputChunk, ProtocolError, SecretBundle,
    host_handshake,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

/// Longest guest-supplied string the host keeps (kernel release, agent version, errors).
pub const MAX_GUEST_TEXT: usize = 256;

/// Why a session ended without a result.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SessionError {
    /// {0}
    Protocol(#[from] ProtocolError),
    /// the guest agent disconnected {phase}
    Disconnected { phase: &'static str },
    /// the guest agent violated the protocol {phase}: {detail}
    Violation { phase: &'static str, detail: String },
    /// the guest agent reported an error {phase}: {reason}
    Agent { phase: &'static str, reason: String },
    /// cannot read the workdir upload {path}: {source}
    Upload { path: String, source: std::io::Error },
    /// cannot store the job's output: {0}
    Store(std::io::Error),
    /// the guest agent ({agent}) cannot receive secrets and this job has some: rebuild the guest image with a current agent (make image)
    SecretsUnsupported { agent: String },
}

/// What the runner learns as the session goes on.
pub trait SessionObserver: Send {
    fn handshake_done(&mut self, hello: &Hello, ack: &HelloAck);
    /// The bundle went to the guest (its names only are for the record).
    fn secrets_delivered(&mut self, bundle: &SecretBundle);
    /// The guest asked for secrets again and was refused with `reason`.
    fn secrets_refused(&mut self, reason: &str);
    fn job_started(&mut self, pid: u32);
    /// Stores a chunk; returns whether everything through it is stored now, so that
    /// it can be acknowledged (a redactor may still hold its tail back).
    fn output(&mut self, chunk: &OutputChunk) -> std::io::Result<bool>;
}

/// Cuts untrusted text to [`MAX_GUEST_TEXT`] bytes (on a char boundary) and strips controls.
pub fn sanitize_guest_text(text: &str) -> String {
    let mut end = text.len().min(MAX_GUEST_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

pub struct HostSession<S> {
    conn: HostConnection<S>,
    sandbox_id: String,
    /// What both sides support, once the handshake is done.
    capabilities: Capabilities,
    /// Holds a reason once the job is to be cancelled.
    cancel: Option<watch::Receiver<Option<String>>>,
}

/// Slack on top of the artifact cap for the tar stream's headers and padding.
const TAR_OVERHEAD: u64 = 16 * 1024 * 1024;

impl<S: AsyncRead + AsyncWrite + Unpin> HostSession<S> {
    pub fn new(stream: S) -> Self {
        Self {
            conn: HostConnection::new(stream),
            sandbox_id: String::new(),
            capabilities: Capabilities(0),
            cancel: None,
        }
    }

    /// While the job runs, a reason on `cancel` makes the agent stop it.
    #[must_use]
    pub fn with_cancel(mut self, cancel: watch::Receiver<Option<String>>) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// After the result: asks for the artifacts and writes their tar stream to `sink`,
    /// checking order, sizes and the SHA-256 the guest claims. `None` if the agent
    /// cannot push artifacts.
    pub async fn collect_artifacts(
        &mut self,
        request: ArtifactRequest,
        sink: &mut (dyn std::io::Write + Send),
        observer: &mut dyn SessionObserver,
    ) -> Result<Option<ArtifactSummary>, SessionError> {
        const PHASE: &str = "while pushing artifacts";
        if !self.capabilities.contains(Capabilities::ARTIFACTS) {
            return Ok(None);
        }
        let limit = request.max_bytes.saturating_add(TAR_OVERHEAD);
        self.send(HostMessage::CollectArtifacts(request), PHASE).await?;
        let mut hasher = Sha256::new();
        let mut acks = AckBatch::default();
        let (mut next_seq, mut bytes) = (0u64, 0u64);
        loop {
            // No cancel receiver: every call returns a message.
            let Some(msg) = self.recv_acking(PHASE, &mut None, &mut acks).await? else { continue };
            match msg {
                GuestMessage::ArtifactChunk { seq, data } => {
                    check_chunk(PHASE, "artifact", seq, next_seq, data.len())?;
                    bytes += data.len() as u64;
                    if bytes > limit {
                        return Err(SessionError::Violation {
                            phase: PHASE,
                            detail: format!("the artifacts exceed the {limit}-byte limit (cap plus tar overhead)"),
                        });
                    }
                    hasher.update(&data);
                    sink.write_all(&data).map_err(SessionError::Store)?;
                    if let Some(ack) = acks.stored(HostMessage::ArtifactAck { seq }) {
                        self.send(ack, PHASE).await?;
                    }
                    next_seq += 1;
                    crate::crashpoint::here("mid-artifact");
                }
                GuestMessage::ArtifactsDone(summary) => {
                    let sha256: [u8; 32] = hasher.finalize().into();
                    if summary.bytes != bytes || summary.sha256 != sha256 {
                        return Err(SessionError::Violation {
                            phase: PHASE,
                            detail: format!(
                                "the guest claims {} bytes with SHA-256 {}, the host received {bytes} bytes with SHA-256 {}",
                                summary.bytes,
                                hex::encode(summary.sha256),
                                hex::encode(sha256)
                            ),
                        });
                    }
                    return Ok(Some(summary));
                }
                GuestMessage::RequestSecrets => self.refuse_secrets(observer, PHASE).await?,
                GuestMessage::AgentError { reason } => {
                    return Err(SessionError::Agent { phase: PHASE, reason: sanitize_guest_text(&reason) });
                }
                other => return Err(unexpected(PHASE, &other)),
            }
        }
    }

    /// Runs the session to the job's result. `secrets` is delivered once, when the
    /// agent asks for it right after the job; the bundle is wiped as it is sent.
    pub async fn run(
        &mut self,
        sandbox_id: &str,
        spec: JobSpec,
        secrets: SecretBundle,
        upload: Option<&Path>,
        observer: &mut dyn SessionObserver,
    ) -> Result<JobResult, SessionError> {
        let (hello, ack) = self.handshake(sandbox_id).await?;
        observer.handshake_done(&hello, &ack);
        self.capabilities = ack.capabilities;
        self.send(HostMessage::Job(spec), "before the job started").await?;
        if ack.capabilities.contains(Capabilities::SECRETS) {
            self.deliver_secrets(secrets, observer).await?;
        } else if !secrets.entries.is_empty() {
            return Err(SessionError::SecretsUnsupported { agent: sanitize_guest_text(&hello.agent_version) });
        }
        if let Some(path) = upload {
            self.upload(path, observer).await?;
        }
        self.stream_output(observer, false, 0).await
    }

    /// Takes back a job whose agent re-dialed after agentlabd restarted: the host has
    /// stored its output through chunk `stored_through`; the agent sends the rest, then
    /// the result if the job is over.
    pub async fn resume(
        &mut self,
        sandbox_id: &str,
        job_id: &str,
        stored_through: Option<u64>,
        observer: &mut dyn SessionObserver,
    ) -> Result<JobResult, SessionError> {
        let (hello, ack) = self.handshake(sandbox_id).await?;
        if !ack.capabilities.contains(Capabilities::RESUME) {
            return Err(SessionError::Violation {
                phase: "after agentlabd restarted",
                detail: format!("the agent ({}) cannot resume a job", sanitize_guest_text(&hello.agent_version)),
            });
        }
        observer.handshake_done(&hello, &ack);
        self.capabilities = ack.capabilities;
        let resume = HostMessage::ResumeJob { job_id: job_id.to_owned(), stored_through };
        self.send(resume, "after agentlabd restarted").await?;
        self.stream_output(observer, true, stored_through.map_or(0, |s| s + 1)).await
    }

    async fn handshake(&mut self, sandbox_id: &str) -> Result<(Hello, HelloAck), SessionError> {
        sandbox_id.clone_into(&mut self.sandbox_id);
        host_handshake(&mut self.conn, sandbox_id).await.map_err(|e| match e {
            ProtocolError::Closed { .. } => SessionError::Disconnected { phase: "before its Hello" },
            other => other.into(),
        })
    }

    /// Answers the agent's one request for secrets.
    async fn deliver_secrets(
        &mut self,
        secrets: SecretBundle,
        observer: &mut dyn SessionObserver,
    ) -> Result<(), SessionError> {
        const PHASE: &str = "before the job started";
        match self.recv(PHASE).await? {
            GuestMessage::RequestSecrets => {}
            GuestMessage::AgentError { reason } => {
                return Err(SessionError::Agent { phase: PHASE, reason: sanitize_guest_text(&reason) });
            }
            other => return Err(unexpected(PHASE, &other)),
        }
        observer.secrets_delivered(&secrets);
        match self.conn.send_secret(HostMessage::Secrets(secrets)).await {
            Err(ProtocolError::Io { source, .. }) if is_disconnect(&source) => {
                Err(SessionError::Disconnected { phase: PHASE })
            }
            other => other.map_err(SessionError::from),
        }
    }

    /// A sandbox gets its secrets once: any later request is refused and recorded.
    async fn refuse_secrets(
        &mut self,
        observer: &mut dyn SessionObserver,
        phase: &'static str,
    ) -> Result<(), SessionError> {
        let reason = format!(
            "sandbox {} already received its secrets; a sandbox gets them once, right after its job",
            self.sandbox_id
        );
        observer.secrets_refused(&reason);
        self.send(HostMessage::SecretsRefused { reason }, phase).await
    }

    /// Tells the agent the result is stored; it may power off.
    pub async fn shutdown(&mut self) {
        let _ = self.conn.send(HostMessage::Shutdown).await;
    }

    async fn upload(&mut self, path: &Path, observer: &mut dyn SessionObserver) -> Result<(), SessionError> {
        const PHASE: &str = "during the workdir upload";
        let upload_err = |source| SessionError::Upload { path: path.display().to_string(), source };
        let mut file = tokio::fs::File::open(path).await.map_err(upload_err)?;
        let mut buf = vec![0u8; MAX_CHUNK_LEN];
        let (mut sent, mut acked) = (0u64, 0u64);
        let mut eof = false;
        while !eof || acked < sent {
            if !eof && sent - acked < CHUNK_WINDOW {
                let n = file.read(&mut buf).await.map_err(upload_err)?;
                if n == 0 {
                    eof = true;
                } else {
                    self.conn.send(HostMessage::WorkdirChunk { seq: sent, data: buf[..n].to_vec() }).await?;
                    sent += 1;
                }
                continue;
            }
            match self.recv(PHASE).await? {
                GuestMessage::WorkdirAck { seq } if seq == acked => acked += 1,
                GuestMessage::WorkdirAck { seq } => {
                    return Err(SessionError::Violation {
                        phase: PHASE,
                        detail: format!("ack {seq} where {acked} was due"),
                    });
                }
                GuestMessage::AgentError { reason } => {
                    return Err(SessionError::Agent { phase: PHASE, reason: sanitize_guest_text(&reason) });
                }
                GuestMessage::RequestSecrets => self.refuse_secrets(observer, PHASE).await?,
                other => return Err(unexpected(PHASE, &other)),
            }
        }
        Ok(())
    }

    async fn stream_output(
        &mut self,
        observer: &mut dyn SessionObserver,
        mut started: bool,
        mut next_seq: u64,
    ) -> Result<JobResult, SessionError> {
        let mut cancel = self.cancel.take();
        let mut acks = AckBatch::default();
        loop {
            let phase = if started { "while the job was running" } else { "before the job started" };
            let msg = match self.recv_acking(phase, &mut cancel, &mut acks).await? {
                Some(msg) => msg,
                None => {
                    // The agent stops the job (SIGTERM, then SIGKILL) and reports it.
                    self.send(HostMessage::Cancel, phase).await?;
                    continue;
                }
            };
            match msg {
                GuestMessage::JobStarted { pid } if !started => {
                    started = true;
                    observer.job_started(pid);
                }
                // A resumed agent may say it again; once is what counts.
                GuestMessage::JobStarted { .. } => {}
                GuestMessage::Output(chunk) if started => {
                    check_chunk(phase, "output", chunk.seq, next_seq, chunk.data.len())?;
                    if observer.output(&chunk).map_err(SessionError::Store)?
                        && let Some(ack) = acks.stored(HostMessage::OutputAck { seq: chunk.seq })
                    {
                        self.send(ack, phase).await?;
                    }
                    next_seq += 1;
                }
                GuestMessage::JobFinished(result) => {
                    let mut result = result;
                    if let agentlab_protocol::JobOutcome::SpawnFailed { reason } = &mut result.outcome {
                        *reason = sanitize_guest_text(reason);
                    }
                    return Ok(result);
                }
                GuestMessage::AgentError { reason } => {
                    return Err(SessionError::Agent { phase, reason: sanitize_guest_text(&reason) });
                }
                GuestMessage::RequestSecrets => self.refuse_secrets(observer, phase).await?,
                other => return Err(unexpected(phase, &other)),
            }
        }
    }

    /// [`Self::recv_or_cancel`], sending the held-back acknowledgement first if the
    /// next message takes longer than [`ACK_DELAY`].
    async fn recv_acking(
        &mut self,
        phase: &'static str,
        cancel: &mut Option<watch::Receiver<Option<String>>>,
        acks: &mut AckBatch,
    ) -> Result<Option<GuestMessage>, SessionError> {
        if acks.pending.is_some() {
            if let Ok(msg) = tokio::time::timeout(ACK_DELAY, self.recv_or_cancel(phase, cancel)).await {
                return msg;
            }
            if let Some(ack) = acks.take_pending() {
                self.send(ack, phase).await?;
            }
        }
        self.recv_or_cancel(phase, cancel).await
    }

    /// The next message, or `None` once when `cancel` gets a reason.
    async fn recv_or_cancel(
        &mut self,
        phase: &'static str,
        cancel: &mut Option<watch::Receiver<Option<String>>>,
    ) -> Result<Option<GuestMessage>, SessionError> {
        loop {
            let Some(rx) = cancel.as_mut() else {
                return self.recv(phase).await.map(Some);
            };
            if rx.borrow_and_update().is_some() {
                *cancel = None;
                return Ok(None);
            }
            tokio::select! {
                msg = self.recv(phase) => return msg.map(Some),
                changed = rx.changed() => if changed.is_err() {
                    // Nobody can cancel any more.
                    *cancel = None;
                },
            }
        }
    }

    async fn send(&mut self, msg: HostMessage, phase: &'static str) -> Result<(), SessionError> {
        match self.conn.send(msg).await {
            Err(ProtocolError::Io { source, .. }) if is_disconnect(&source) => {
                Err(SessionError::Disconnected { phase })
            }
            other => other.map_err(SessionError::from),
        }
    }

    async fn recv(&mut self, phase: &'static str) -> Result<GuestMessage, SessionError> {
        match self.conn.recv().await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(SessionError::Disconnected { phase }),
            Err(ProtocolError::Io { source, .. }) if is_disconnect(&source) => {
                Err(SessionError::Disconnected { phase })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A streamed chunk must be the next in sequence and no larger than [`MAX_CHUNK_LEN`].
fn check_chunk(phase: &'static str, what: &str, seq: u64, next_seq: u64, len: usize) -> Result<(), SessionError> {
    let detail = if seq != next_seq {
        format!("{what} chunk {seq} where {next_seq} was due")
    } else if len > MAX_CHUNK_LEN {
        format!("{what} chunk of {len} bytes, over {MAX_CHUNK_LEN}")
    } else {
        return Ok(());
    };
    Err(SessionError::Violation { phase, detail })
}

/// Most stored chunks left unacknowledged: a quarter of the sender's window, so it
/// never waits on an acknowledgement held back here.
const ACK_EVERY: u64 = CHUNK_WINDOW / 4;
/// How long an acknowledgement is held back waiting for the next chunk. A sender that
/// waits on it (the end of a burst, a full window) waits this much longer.
const ACK_DELAY: Duration = Duration::from_millis(3);

/// Acknowledges stored chunks in batches. Every acknowledgement costs the guest an
/// interrupt, a wake-up and a read (dear under TCG); they are cumulative, so one
/// stands for every chunk before it.
#[derive(Default)]
struct AckBatch {
    unacked: u64,
    /// The acknowledgement of the last stored chunk, not sent yet.
    pending: Option<HostMessage>,
}

impl AckBatch {
    /// One more chunk is stored: returns its acknowledgement if it is due now (every
    /// [`ACK_EVERY`] chunks), else holds it back.
    fn stored(&mut self, ack: HostMessage) -> Option<HostMessage> {
        self.unacked += 1;
        if self.unacked >= ACK_EVERY {
            self.unacked = 0;
            self.pending = None;
            return Some(ack);
        }
        self.pending = Some(ack);
        None
    }

    fn take_pending(&mut self) -> Option<HostMessage> {
        self.unacked = 0;
        self.pending.take()
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | BrokenPipe | UnexpectedEof | ConnectionAborted)
}

fn unexpected(phase: &'static str, msg: &GuestMessage) -> SessionError {
    SessionError::Violation { phase, detail: format!("unexpected {} message", msg.kind()) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn acknowledgements_go_out_every_quarter_window_and_the_rest_is_held() {
        let mut acks = AckBatch::default();
        let mut sent = Vec::new();
        for seq in 0..40 {
            if let Some(HostMessage::OutputAck { seq }) = acks.stored(HostMessage::OutputAck { seq }) {
                sent.push(seq);
            }
        }
        assert_eq!(sent, [15, 31]);
        assert_eq!(acks.take_pending(), Some(HostMessage::OutputAck { seq: 39 }));
        assert_eq!(acks.take_pending(), None);
        // Taking the held one starts the count again.
        let due: Vec<bool> =
            (0..ACK_EVERY).map(|seq| acks.stored(HostMessage::ArtifactAck { seq }).is_some()).collect();
        assert_eq!(due.iter().filter(|d| **d).count(), 1);
        assert!(due[ACK_EVERY as usize - 1]);
    }
}
