use std::io;

use agentlab_protocol::ProtocolError;

/// Why the agent's session ended early.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum AgentError {
    /// could not reach the host at {target} within {secs} s: {source}
    Connect { target: String, secs: u64, source: ProtocolError },
    /// {0}
    Protocol(#[from] ProtocolError),
    /// cannot prepare the workdir {path}: {source}
    Workdir { path: String, source: io::Error },
    /// workdir upload failed: {0}
    Upload(String),
    /// cannot start the async runtime: {0}
    Runtime(io::Error),
    /// cannot watch for SIGTERM: {0}
    Signal(io::Error),
    /// stopped by SIGTERM; the job was killed and its secrets wiped
    Terminated,
    /// the host refused the job's secrets: {0}
    SecretsRefused(String),
    /// cannot put the job's secrets in place: {0}
    Secrets(String),
    /// the job was stopped: {0}
    Gone(String),
}
