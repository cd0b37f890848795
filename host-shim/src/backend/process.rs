//! Helpers for the helper processes a backend runs.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Finds `program` like a shell would: a path with a slash as is, else in `PATH`.
pub fn find_program(program: &Path) -> Result<PathBuf, String> {
    if program.components().count() > 1 {
        return if program.is_file() { Ok(program.to_owned()) } else { Err(program.display().to_string()) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!("PATH={}", path.to_string_lossy()))
}

/// A local VM's files in its run directory, for the launcher and for a daemon that
/// takes the VM over after a restart.
pub const QEMU_LOG: &str = "qemu.log";
pub const VHOST_LOG: &str = "vhost-device-vsock.log";
pub const VSOCK_SOCKET: &str = "vsock.sock";

/// How long a local VM gets to power off once told its result is stored.
pub const POWEROFF_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The tails of a local VM's logs, for an error message.
pub fn vm_diagnostics(qemu_log: &Path, vhost_log: &Path, console_log: &Path) -> String {
    let mut parts = Vec::new();
    for (name, path, lines) in
        [("qemu", qemu_log, 5), ("vhost-device-vsock", vhost_log, 5), ("guest console", console_log, 15)]
    {
        let text = tail(path, lines);
        if !text.is_empty() {
            parts.push(format!("--- {name} ---\n{text}"));
        }
    }
    parts.join("\n")
}

/// The last `lines` lines of a file (at most 64 KiB read), for diagnostics.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(64 * 1024).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c\nd");
        assert_eq!(tail(&p, 10), "a\nb\nc\nd");
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
    }

    #[test]
    fn find_program_reports_where_it_looked() {
        assert!(find_program(Path::new("sh")).is_ok());
        let err = find_program(Path::new("no-such-program-agentlab")).unwrap_err();
        assert!(err.starts_with("PATH="));
        assert_eq!(find_program(Path::new("/nonexistent/qemu")).unwrap_err(), "/nonexistent/qemu");
    }
}
