//! The messages. Variants are encoded by their index: append new ones at the end,
//! never reorder or remove (a decoder rejects an index it does not know).
//!
//! Data fields are `serde_bytes`: postcard writes them exactly as it writes a `Vec<u8>`
//! (a varint length, then the bytes), but in one copy instead of one call per byte.

use serde::{Deserialize, Serialize};

pub use crate::secret::{SecretBundle, SecretBytes, SecretEntry, SecretKind};

/// Optional features a side supports, as bits. Unknown bits are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// The workdir may be sent as a tar stream over the channel.
    pub const WORKDIR_UPLOAD: Capabilities = Capabilities(1 << 0);
    /// Output chunks are sequenced and acknowledged.
    pub const OUTPUT_ACK: Capabilities = Capabilities(1 << 1);
    /// The agent asks for the job's secrets once, right after the job
    /// ([`GuestMessage::RequestSecrets`]); the host answers with [`HostMessage::Secrets`].
    pub const SECRETS: Capabilities = Capabilities(1 << 2);
    /// After the result the host asks for artifacts ([`HostMessage::CollectArtifacts`]);
    /// the agent pushes them as an acknowledged tar stream.
    pub const ARTIFACTS: Capabilities = Capabilities(1 << 3);
    /// An agent whose channel drops keeps its job running, re-dials and, told where
    /// the host's record of the output ends ([`HostMessage::ResumeJob`]), sends the rest.
    pub const RESUME: Capabilities = Capabilities(1 << 4);

    /// Everything this build supports.
    pub const ALL: Capabilities = Capabilities(
        Self::WORKDIR_UPLOAD.0 | Self::OUTPUT_ACK.0 | Self::SECRETS.0 | Self::ARTIFACTS.0 | Self::RESUME.0,
    );

    /// The bits both sides have.
    #[must_use]
    pub fn intersect(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 & other.0)
    }

    /// Whether every bit of `other` is set.
    #[must_use]
    pub fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The agent's opening message. Layout frozen for all protocol versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub capabilities: Capabilities,
    /// `CARGO_PKG_VERSION` of the agent.
    pub agent_version: String,
    /// `uname -r` of the guest. Informational only: the guest may lie.
    pub kernel_release: String,
    /// Landlock ABI the guest kernel reports (0: none). Informational only.
    pub landlock_abi: u32,
}

/// The host's acceptance of a [`Hello`]. Layout frozen for all protocol versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The version both sides now speak.
    pub version: u16,
    pub capabilities: Capabilities,
    /// The sandbox the host knows this connection as.
    pub sandbox_id: String,
}

/// A job for the agent to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job_id: String,
    /// Program to execute (looked up in `PATH` if it has no slash).
    pub program: String,
    pub args: Vec<String>,
    /// Extra environment on top of the agent's minimal default environment.
    pub env: Vec<(String, String)>,
    /// Absolute path of the working directory in the guest; created if missing.
    pub workdir: String,
    /// Wall-clock limit; 0 means none.
    pub timeout_ms: u64,
    /// Time between SIGTERM and SIGKILL when the limit is hit or the job is cancelled.
    pub kill_grace_ms: u64,
    /// If set, a tar stream of this many bytes follows as [`HostMessage::WorkdirChunk`]s.
    pub workdir_upload_bytes: Option<u64>,
    /// The inner sandbox the agent puts the job in.
    pub sandbox: SandboxSpec,
}

/// How strictly Landlock must be enforced. Also the `sandbox.landlock` key of a
/// profile, hence the YAML spelling (postcard ignores names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LandlockMode {
    /// The job does not start unless the kernel can enforce the file system rules.
    #[default]
    Required,
    /// Enforce what the kernel can; [`Enforcement::notes`] names the rest.
    BestEffort,
    /// No Landlock at all.
    Off,
}

/// The job's inner sandbox, enforced by the agent between fork and exec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub landlock: LandlockMode,
    /// The unprivileged user the job runs as (looked up in the guest's `/etc/passwd`).
    pub user: String,
    /// Extra absolute paths the job may read and execute.
    pub read_only_paths: Vec<String>,
    /// Extra absolute paths the job may read and write.
    pub read_write_paths: Vec<String>,
    /// The secrets directory, readable by the job only if set.
    pub secrets_dir: Option<String>,
    /// No network for the job: TCP (and UDP where Landlock can) and `AF_INET`/`AF_INET6` sockets refused.
    pub network_off: bool,
    pub rlimits: Rlimits,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            landlock: LandlockMode::Required,
            user: "agent".to_owned(),
            read_only_paths: Vec::new(),
            read_write_paths: Vec::new(),
            secrets_dir: None,
            network_off: true,
            rlimits: Rlimits::default(),
        }
    }
}

/// Resource limits of the job. Also the `sandbox.rlimits` section of a profile, where
/// absent keys take the defaults below and unknown keys are refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rlimits {
    /// Open files (`RLIMIT_NOFILE`).
    pub nofile: u64,
    /// Processes of the job user (`RLIMIT_NPROC`).
    pub nproc: u64,
    /// Largest file the job may write, MiB (`RLIMIT_FSIZE`); unlimited if absent.
    pub fsize_mb: Option<u64>,
    /// CPU seconds (`RLIMIT_CPU`); unlimited if absent.
    pub cpu_seconds: Option<u64>,
    /// Core dumps are off (`RLIMIT_CORE` 0) unless this is true.
    pub core_dumps: bool,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits { nofile: 4096, nproc: 2048, fsize_mb: None, cpu_seconds: None, core_dumps: false }
    }
}

/// What the agent actually enforced on the job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforcement {
    /// Landlock ABI of the guest kernel (0: none).
    pub landlock_abi: u32,
    /// File system access restricted by Landlock.
    pub landlock_fs: bool,
    /// TCP (and UDP from ABI 8) restricted by Landlock.
    pub landlock_net: bool,
    /// Signals and abstract Unix sockets scoped by Landlock.
    pub landlock_scope: bool,
    /// The seccomp filter is installed.
    pub seccomp: bool,
    pub no_new_privs: bool,
    /// The user the job runs as, and its uid.
    pub user: String,
    pub uid: u32,
    /// What best-effort could not enforce, human-readable.
    pub notes: Vec<String>,
}

/// Which of the job's pipes a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A piece of the job's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// Starts at 0 and increases by one per chunk, across both streams.
    pub seq: u64,
    pub stream: OutputStream,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// How the job ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// The process exited with this code.
    Exited { code: i32 },
    /// The process was killed by this signal (not by the agent).
    Signaled { signal: i32 },
    /// The wall-clock limit was hit; the agent stopped the job with `signal`.
    TimedOut { signal: i32 },
    /// The host cancelled the job; the agent stopped it with `signal`.
    Cancelled { signal: i32 },
    /// The job could not be started at all.
    SpawnFailed { reason: String },
}

/// The agent's final report on a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub outcome: JobOutcome,
    pub duration_ms: u64,
    /// Output bytes the agent sent (both streams).
    pub output_bytes: u64,
    /// The inner sandbox as enforced; default (nothing) if the job never started.
    pub enforcement: Enforcement,
}

/// What the host wants of the workdir after the job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRequest {
    /// Globs relative to the workdir (`*` stays within a directory, `**` crosses them).
    pub globs: Vec<String>,
    /// Most bytes of file content the agent may send; the host refuses more.
    pub max_bytes: u64,
}

/// The agent's account of an artifact stream it sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSummary {
    /// Bytes of the tar stream.
    pub bytes: u64,
    /// SHA-256 of the tar stream.
    pub sha256: [u8; 32],
    /// Files that matched but were left out, with the reason (`path: reason`).
    pub skipped: Vec<String>,
}

/// Guest → host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    Hello(Hello),
    /// The workdir tar chunk `seq` was received.
    WorkdirAck {
        seq: u64,
    },
    /// The job's process is running.
    JobStarted {
        pid: u32,
    },
    Output(OutputChunk),
    JobFinished(JobResult),
    /// The agent could not go on (for example the workdir tar was invalid).
    AgentError {
        reason: String,
    },
    /// The job's secrets, please. Answered once per sandbox; any later request is
    /// refused and recorded.
    RequestSecrets,
    /// A piece of the artifact tar stream; `seq` starts at 0.
    ArtifactChunk {
        seq: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The artifact stream is complete.
    ArtifactsDone(ArtifactSummary),
}

/// Host → guest.
// A session carries one `Job`: its size does not matter, and boxing it would only
// complicate every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    HelloAck(HelloAck),
    HelloReject {
        reason: String,
        min_version: u16,
        max_version: u16,
    },
    Job(JobSpec),
    WorkdirChunk {
        seq: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Output chunks up to and including `seq` are stored.
    OutputAck {
        seq: u64,
    },
    /// Stop the job: SIGTERM, then SIGKILL after the grace period.
    Cancel,
    /// The result is stored; the agent may power the VM off.
    Shutdown,
    /// The answer to the sandbox's first [`GuestMessage::RequestSecrets`] (possibly empty).
    Secrets(SecretBundle),
    /// The answer to any later request.
    SecretsRefused {
        reason: String,
    },
    /// Push the artifacts: after the job's result, before [`HostMessage::Shutdown`].
    CollectArtifacts(ArtifactRequest),
    /// Artifact chunks up to and including `seq` are stored.
    ArtifactAck {
        seq: u64,
    },
    /// To an agent that re-dialed (instead of a job): carry on with `job_id`; the
    /// host has stored its output through chunk `stored_through` (none: nothing yet),
    /// so send what follows, then the result if the job is over.
    ResumeJob {
        job_id: String,
        stored_through: Option<u64>,
    },
}

/// A short name of a message, for errors and logs. Never includes payload bytes.
pub trait MessageKind {
    fn kind(&self) -> &'static str;
}

impl MessageKind for GuestMessage {
    fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "Hello",
            Self::WorkdirAck { .. } => "WorkdirAck",
            Self::JobStarted { .. } => "JobStarted",
            Self::Output(_) => "Output",
            Self::JobFinished(_) => "JobFinished",
            Self::AgentError { .. } => "AgentError",
            Self::RequestSecrets => "RequestSecrets",
            Self::ArtifactChunk { .. } => "ArtifactChunk",
            Self::ArtifactsDone(_) => "ArtifactsDone",
        }
    }
}

impl MessageKind for HostMessage {
    fn kind(&self) -> &'static str {
        match self {
            Self::HelloAck(_) => "HelloAck",
            Self::HelloReject { .. } => "HelloReject",
            Self::Job(_) => "Job",
            Self::WorkdirChunk { .. } => "WorkdirChunk",
            Self::OutputAck { .. } => "OutputAck",
            Self::Cancel => "Cancel",
            Self::Shutdown => "Shutdown",
            Self::Secrets(_) => "Secrets",
            Self::SecretsRefused { .. } => "SecretsRefused",
            Self::CollectArtifacts(_) => "CollectArtifacts",
            Self::ArtifactAck { .. } => "ArtifactAck",
            Self::ResumeJob { .. } => "ResumeJob",
        }
    }
}
