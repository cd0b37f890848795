//! What can go wrong talking to Proxmox. Every error a user sees names the operation
//! (with its VMID and node) and carries Proxmox's own text.

use std::collections::BTreeMap;
use std::fmt;

/// pveproxy could not reach the node's daemon: the call did not run, retrying is safe.
pub const PROXY_CONNECT_FAILED: u16 = 595;
/// pveproxy lost the node's daemon midway: the call may or may not have run.
pub const PROXY_CONNECTION_LOST: u16 = 596;

/// An error answer from the API, with everything Proxmox said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// The HTTP reason phrase: where PVE puts a handler's error text.
    pub reason: String,
    /// The JSON `message` (libpve-http-server-perl >= 5.2.0; older servers send none).
    pub message: Option<String>,
    /// The JSON `errors`: parameter name -> what is wrong with it.
    pub errors: BTreeMap<String, String>,
}

impl ApiError {
    /// Proxmox's own words: the message if given, else the reason phrase.
    pub fn text(&self) -> String {
        let text = self.message.as_deref().map(str::trim).filter(|m| !m.is_empty()).unwrap_or(self.reason.trim());
        text.to_owned()
    }

    /// `can't lock file '…' - got timeout`: another task holds a VM config or storage lock.
    pub fn is_lock_timeout(&self) -> bool {
        let text = self.text();
        text.contains("can't lock file") && text.contains("got timeout")
    }

    /// `VM is locked (clone)`: a config `lock` from a running clone, backup, migration.
    pub fn is_vm_locked(&self) -> bool {
        self.text().contains("VM is locked")
    }

    /// `unable to create VM N: config file already exists`: someone took the VMID.
    pub fn is_vmid_taken(&self) -> bool {
        let text = self.text();
        text.contains("config file already exists") || (text.contains("VM ") && text.contains("already exists"))
    }

    /// `Configuration file 'nodes/…/qemu-server/N.conf' does not exist`.
    pub fn is_missing_vm(&self) -> bool {
        self.status == 500 && self.text().contains("does not exist")
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {} {}", self.status, self.reason.trim())?;
        if let Some(message) = self.message.as_deref().map(str::trim).filter(|m| !m.is_empty())
            && message != self.reason.trim()
        {
            write!(f, ": {message}")?;
        }
        for (param, problem) in &self.errors {
            write!(f, "; parameter '{param}': {}", problem.trim())?;
        }
        Ok(())
    }
}

/// Errors of the Proxmox backend.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum PveError {
    /// {op}: Proxmox refused: {error}{attempts}
    Api { op: String, error: ApiError, attempts: Attempts },
    /// {op}: cannot reach the Proxmox API: {detail}{attempts}
    Transport { op: String, detail: String, attempts: Attempts },
    /// {op}: unexpected answer from Proxmox: {detail}
    Decode { op: String, detail: String },
    /// {op}: task {upid} failed: {exitstatus}{log}
    TaskFailed { op: String, upid: String, exitstatus: String, log: String },
    /// {op}: task {upid} still running after {secs} s
    TaskTimeout { op: String, upid: String, secs: u64 },
    /// {op}: {detail}
    Other { op: String, detail: String },
    /// Proxmox configuration: {0}
    Config(String),
}

/// How many attempts an error took, shown only when there was more than one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attempts(pub u32);

impl fmt::Display for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 > 1 { write!(f, " (after {} attempts)", self.0) } else { Ok(()) }
    }
}

impl PveError {
    /// The API's answer, if this error is one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            PveError::Api { error, .. } => Some(error),
            _ => None,
        }
    }

    pub fn is_missing_vm(&self) -> bool {
        self.api().is_some_and(ApiError::is_missing_vm)
    }
}

/// Formats a task log's last lines for an error message.
pub fn log_tail(lines: &[String]) -> String {
    if lines.is_empty() { String::new() } else { format!("\n--- task log (last lines) ---\n{}", lines.join("\n")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, reason: &str, message: Option<&str>) -> ApiError {
        ApiError { status, reason: reason.into(), message: message.map(Into::into), errors: BTreeMap::new() }
    }

    #[test]
    fn the_message_wins_over_the_reason_and_both_show() {
        let e = api(500, "Internal Server Error", Some("VM is locked (clone)"));
        assert_eq!(e.text(), "VM is locked (clone)");
        assert!(e.is_vm_locked());
        assert_eq!(e.to_string(), "HTTP 500 Internal Server Error: VM is locked (clone)");
        // An older server: only the reason phrase carries the text.
        let old = api(500, "can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout", None);
        assert!(old.is_lock_timeout());
        assert_eq!(old.to_string(), "HTTP 500 can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout");
    }

    #[test]
    fn parameter_errors_are_listed() {
        let mut e = api(400, "Parameter verification failed.", Some("Parameter verification failed.\n"));
        e.errors.insert("cores".into(), "value must have a minimum value of 1".into());
        assert_eq!(
            e.to_string(),
            "HTTP 400 Parameter verification failed.; parameter 'cores': value must have a minimum value of 1"
        );
    }

    #[test]
    fn classification() {
        assert!(api(500, "unable to create VM 123: config file already exists", None).is_vmid_taken());
        assert!(api(500, "Configuration file 'nodes/pve/qemu-server/123.conf' does not exist", None).is_missing_vm());
        assert!(!api(500, "storage 'x' does not exist", None).is_vmid_taken());
    }
}
