//! The daemon's API on its Unix socket: the same length-prefixed postcard frames as
//! the guest channel, with these request and response types.

use agentlab_protocol::{Connection, Enforcement, OutputStream, SecretEntry, SecretKind};
use serde::{Deserialize, Serialize};

pub use crate::artifacts::ArtifactView;
use crate::profile::Profile;
pub use crate::secrets::BundleView;
use crate::state::{JobState, SandboxState};

/// Largest repo upload the daemon accepts (1 GiB).
pub const MAX_REPO_BYTES: u64 = 1 << 30;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ApiRequest {
    /// Submit a job. If `repo_bytes` is set, that many bytes of tar follow as `UploadChunk`s.
    Submit(SubmitRequest),
    UploadChunk {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    JobShow {
        id: String,
    },
    JobList,
    SandboxList,
    ProfileList,
    /// A job's stored output from `offset` (a byte offset in the stored log, as the
    /// `Output` responses report it), or its last `tail_lines` lines; with `follow`,
    /// then its live output until it ends. Ends with the job's view.
    Logs {
        id: String,
        offset: u64,
        tail_lines: Option<u64>,
        follow: bool,
    },
    /// Events after the event id `after`, of one job or all; with `follow`, new ones as
    /// they happen (for a job: until it and its sandbox are finished). Ends with `Done`.
    Events {
        job: Option<String>,
        after: i64,
        follow: bool,
    },
    /// Stop a job: SIGTERM in the guest, SIGKILL after the grace; a job not started yet
    /// never starts.
    Cancel {
        id: String,
    },
    SandboxShow {
        id: String,
    },
    /// The lease ends `ttl_ms` from now.
    LeaseRenew {
        id: String,
        ttl_ms: u64,
    },
    /// Destroy a sandbox kept after its job; with `force`, one running a job too.
    SandboxDestroy {
        id: String,
        force: bool,
    },
    /// Destroy every sandbox kept after its job.
    SandboxPrune,
    /// agentlabd's own checks of its prerequisites.
    Doctor,
    /// Add or replace one secret of a bundle (creating the bundle).
    SecretSet {
        bundle: String,
        entry: SecretEntry,
    },
    /// Remove one secret, or with `entry: None` the whole bundle.
    SecretRemove {
        bundle: String,
        entry: Option<(SecretKind, String)>,
    },
    SecretShow {
        bundle: String,
    },
    SecretList,
    /// A job's artifacts.
    ArtifactList {
        job: String,
    },
    /// One artifact's bytes as `ArtifactData` chunks, then its record.
    ArtifactFetch {
        job: String,
        path: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// Shell command, run as `/bin/sh -c COMMAND` in the guest.
    pub command: String,
    pub timeout_ms: u64,
    /// What the user named as the repo, for display.
    pub repo_label: Option<String>,
    pub repo_bytes: Option<u64>,
    /// Profile name; the daemon's default profile if absent.
    pub profile: Option<String>,
    /// Lease length; the profile's `behavior.ttl_minutes_default` if absent.
    pub ttl_ms: Option<u64>,
    /// Keep the sandbox after the job; the profile's `behavior.keepalive_default` if absent.
    pub keepalive: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ApiResponse {
    Submitted {
        job_id: String,
        sandbox_id: String,
    },
    Job(Box<JobView>),
    Jobs(Vec<JobView>),
    Sandboxes(Vec<SandboxView>),
    Profiles(Vec<Profile>),
    /// Output of a job; `offset` is where the next record starts in the stored log.
    Output {
        stream: OutputStream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        offset: u64,
    },
    Event(EventView),
    /// What a followed job is doing now: queued, provisioning, booting, running…
    Phase {
        name: String,
    },
    Error {
        message: String,
    },
    Bundle(BundleView),
    Bundles(Vec<BundleView>),
    /// The request was carried out and has nothing to show.
    Done,
    Artifacts(Vec<ArtifactView>),
    ArtifactData {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Artifact(ArtifactView),
    /// What a request did, in words.
    Message {
        text: String,
    },
    Sandbox(Box<SandboxView>),
    Checks(Vec<crate::doctor::Check>),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobView {
    pub id: String,
    pub sandbox_id: String,
    pub state: JobState,
    pub command: String,
    pub repo: Option<String>,
    pub timeout_ms: u64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub guest_kernel: Option<String>,
    pub agent_version: Option<String>,
    pub output_bytes: u64,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub duration_ms: Option<u64>,
    pub profile: Option<String>,
    /// What the guest reported it enforced (untrusted: the guest's own account).
    pub enforcement: Option<Enforcement>,
    /// For a queued job: where it stands and what it waits for (not stored).
    pub queue: Option<String>,
    pub events: Vec<EventView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxView {
    pub id: String,
    pub backend: String,
    pub state: SandboxState,
    pub job_id: Option<String>,
    pub accel: Option<String>,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Kept after its job, until its lease ends.
    pub keepalive: bool,
    pub lease_expires_at_ms: Option<i64>,
    /// Filled by `sandbox show` only.
    pub events: Vec<EventView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventView {
    pub id: i64,
    pub at_ms: i64,
    pub kind: String,
    pub job_id: Option<String>,
    pub sandbox_id: Option<String>,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    pub message: Option<String>,
}

/// The daemon's end of an API connection.
pub type ServerConnection<S> = Connection<S, ApiRequest, ApiResponse>;
/// The CLI's end of an API connection.
pub type ClientConnection<S> = Connection<S, ApiResponse, ApiRequest>;

/// The exit code `agentlab job submit --follow` uses for a finished job, like
/// `timeout(1)` and `docker run`: the job's own code, 128+signal, 124 for a timeout,
/// 125 when the job never ran or its sandbox failed.
pub fn exit_code_for(job: &JobView) -> i32 {
    match (job.state, job.exit_code, job.signal) {
        (JobState::Completed, _, _) => 0,
        (JobState::Timeout, _, _) => 124,
        (JobState::Failed, Some(code), _) => code,
        (JobState::Failed, None, Some(signal)) => 128 + signal,
        _ => 125,
    }
}
