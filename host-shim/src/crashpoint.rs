//! Crash points, for the crash-safety tests: with `AGENTLAB_CRASH_AT=NAME` in its
//! environment, agentlabd kills itself with SIGKILL (no clean-up of any kind, exactly
//! `kill -9`) the first time it reaches the point NAME. Without the variable each point
//! is one comparison. The points are listed in docs/SPECIFICATION.md.

use std::sync::OnceLock;

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();

/// Dies here if this is the point the environment names.
pub fn here(name: &str) {
    let at = CRASH_AT.get_or_init(|| std::env::var("AGENTLAB_CRASH_AT").ok());
    if at.as_deref() == Some(name) {
        tracing::warn!("AGENTLAB_CRASH_AT={name}: killing agentlabd here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
