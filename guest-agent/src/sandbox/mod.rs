//! The job's inner sandbox.
//!
//! The agent (still root) resolves the job user, hands the workdir to it and makes a
//! private tmp dir ([`prepare`]), then spawns itself as `agentlab-agent sandbox-exec`
//! ([`launcher`]) with the policy as JSON in [`POLICY_ENV`]. The launcher, a fresh
//! single-threaded process, applies rlimits, drops to the job user, sets
//! `no_new_privs`, applies Landlock and seccomp, reports what it enforced on an
//! inherited pipe and execs the job. The pipe is close-on-exec, so end-of-file right
//! after a report means the exec succeeded.

pub mod landlock_rules;
pub mod launcher;
pub mod passwd;
pub mod prepare;
pub mod seccomp;

use agentlab_protocol::{Enforcement, SandboxSpec};
use serde::{Deserialize, Serialize};

/// Environment variable carrying the [`LaunchPolicy`] to the launcher; never passed on to the job.
pub const POLICY_ENV: &str = "AGENTLAB_SANDBOX_POLICY";
/// Environment variable telling the job (and `selftest`) the agent's pid.
pub const AGENT_PID_ENV: &str = "AGENTLAB_AGENT_PID";
/// The hidden subcommand that runs the launcher.
pub const LAUNCHER_SUBCOMMAND: &str = "sandbox-exec";

/// Everything the launcher needs, resolved by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchPolicy {
    pub spec: SandboxSpec,
    pub uid: u32,
    pub gid: u32,
    pub workdir: String,
    /// The job's private tmp dir, already created and owned by the job user.
    pub tmpdir: String,
    /// The agent's status socket (kept reachable for `agentlab-agent status`).
    pub status_socket: String,
    /// Root-only directory of environment secrets, read by the launcher before it drops
    /// privileges and handed to the job's environment at exec.
    #[serde(default)]
    pub env_secrets_dir: Option<String>,
}

/// One line the launcher writes on the report pipe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LauncherReport {
    /// The sandbox is in place; the launcher is about to exec the job.
    Enforced(Enforcement),
    /// The sandbox could not be set up; nothing was executed.
    Failed { reason: String },
    /// The sandbox is in place but exec failed.
    ExecFailed { reason: String },
}

/// Why the job cannot be put in its sandbox.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SandboxError {
    /// cannot read /etc/passwd: {0}
    Passwd(std::io::Error),
    /// the job user {0:?} is not in /etc/passwd
    UnknownUser(String),
    /// cannot hand {path} to the job user: {source}
    Chown { path: String, source: std::io::Error },
    /// cannot prepare the job's tmp dir {path}: {source}
    Tmpdir { path: String, source: std::io::Error },
    /// the sandbox policy is unreadable: {0}
    Policy(String),
    /// cannot set {resource} to {value}: {source}
    Rlimit { resource: &'static str, value: u64, source: nix::Error },
    /// cannot switch to the job user {user} (uid {uid}): {reason}
    DropPrivileges { user: String, uid: u32, reason: String },
    /// cannot set no_new_privs: {0}
    NoNewPrivs(nix::Error),
    /// Landlock is required but this kernel cannot enforce it (ABI {abi}); use `landlock: best-effort` in the profile to run anyway
    LandlockUnavailable { abi: u32 },
    /// Landlock is required but failed: {0}
    Landlock(String),
    /// cannot install the seccomp filter: {0}
    Seccomp(String),
    /// cannot read the job's environment secrets from {0}
    Secrets(String),
}
