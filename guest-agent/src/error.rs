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
}
