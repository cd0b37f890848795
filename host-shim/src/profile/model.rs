//! The profile schema, with the Go predecessor's sections and meanings, plus `sandbox`.

pub use agentlab_protocol::{LandlockMode, Rlimits};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Unique name, `[a-z0-9][a-z0-9-]*`, at most 63 characters.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Proxmox template VMID that sandboxes are linked-cloned from.
    pub template_vmid: u32,
    pub resources: Resources,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub behavior: Behavior,
    /// Name of the secrets bundle delivered to the guest, if any.
    #[serde(default)]
    pub secrets_bundle: Option<String>,
    #[serde(default)]
    pub repo: Repo,
    #[serde(default)]
    pub artifacts: Artifacts,
    #[serde(default)]
    pub sandbox: SandboxPolicy,
    /// How many sandboxes of this profile may exist at once (0: no limit).
    #[serde(default)]
    pub max_sandboxes: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// vCPUs, 1 to 64.
    pub cores: u32,
    /// Guest memory, 256 MiB to 256 GiB.
    pub memory_mb: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No network device at all.
    #[default]
    Off,
    /// Outbound through the host's NAT; the LAN and private ranges are blocked.
    Nat,
    /// Only the listed destinations.
    Allowlist,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default = "default_bridge")]
    pub bridge: String,
    #[serde(default)]
    pub mode: NetworkMode,
    /// `host` or `host:port` entries; only with `mode: allowlist`.
    #[serde(default)]
    pub allowlist: Vec<String>,
}

impl Default for Network {
    fn default() -> Self {
        Network { bridge: default_bridge(), mode: NetworkMode::Off, allowlist: Vec::new() }
    }
}

fn default_bridge() -> String {
    "vmbr1".to_owned()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Behavior {
    /// Lease length when a job does not give `--ttl`; 0 means until the job ends.
    #[serde(default = "default_ttl")]
    pub ttl_minutes_default: u32,
    /// Keep the sandbox after its job (until the lease expires).
    #[serde(default)]
    pub keepalive_default: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior { ttl_minutes_default: default_ttl(), keepalive_default: false }
    }
}

fn default_ttl() -> u32 {
    180
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repo {
    /// Where the repo lands in the guest, and the job's working directory.
    #[serde(default = "default_clone_path")]
    pub clone_path: String,
}

impl Default for Repo {
    fn default() -> Self {
        Repo { clone_path: default_clone_path() }
    }
}

fn default_clone_path() -> String {
    "/workspace".to_owned()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifacts {
    /// Globs relative to the workdir whose matches are collected after the job.
    #[serde(default)]
    pub globs: Vec<String>,
    /// Cap on the collected artifacts, MiB.
    #[serde(default = "default_artifact_cap")]
    pub max_mb: u32,
}

impl Default for Artifacts {
    fn default() -> Self {
        Artifacts { globs: Vec::new(), max_mb: default_artifact_cap() }
    }
}

fn default_artifact_cap() -> u32 {
    512
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxPolicy {
    #[serde(default)]
    pub landlock: LandlockMode,
    /// The unprivileged user the job runs as.
    #[serde(default = "default_user")]
    pub user: String,
    /// Extra absolute paths the job may read.
    #[serde(default)]
    pub read_only_paths: Vec<String>,
    /// Extra absolute paths the job may write.
    #[serde(default)]
    pub read_write_paths: Vec<String>,
    /// Whether the job may read the secrets directory (for file secrets such as an
    /// agent's settings.json). Environment secrets are set either way.
    #[serde(default)]
    pub secrets_readable: bool,
    #[serde(default)]
    pub rlimits: Rlimits,
}

impl Default for SandboxPolicy {
    fn default() -> Self {
        SandboxPolicy {
            landlock: LandlockMode::Required,
            user: default_user(),
            read_only_paths: Vec::new(),
            read_write_paths: Vec::new(),
            secrets_readable: false,
            rlimits: Rlimits::default(),
        }
    }
}

fn default_user() -> String {
    "agent".to_owned()
}
