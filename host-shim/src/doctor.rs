//! `agentlab doctor`: each prerequisite of running sandboxes, checked where it lives
//! (here, in agentlabd), with the fix for each failure.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::daemon::Daemon;

/// Free space in the state directory below which jobs are at risk.
const LOW_DISK_MB: u64 = 1024;
/// Below this, a job's log or artifacts will not fit.
const FULL_DISK_MB: u64 = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// What to do about a warning or failure.
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: &str, detail: impl Into<String>) -> Check {
        Check { name: name.to_owned(), status: Status::Ok, detail: detail.into(), fix: None }
    }

    pub fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name: name.to_owned(), status: Status::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }

    pub fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name: name.to_owned(), status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// Everything agentlabd can check about itself and its backend.
pub async fn run(daemon: &Daemon) -> Vec<Check> {
    let mut checks = daemon.backend.doctor().await;
    checks.push(disk_space(&daemon.config.state_dir));
    checks.push(vsock_module(daemon.backend.name()));
    checks
}

fn disk_space(dir: &Path) -> Check {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(fs) => {
            let free_mb = fs.blocks_available().saturating_mul(fs.fragment_size()) / (1024 * 1024);
            let detail = format!("{free_mb} MiB free in {}", dir.display());
            let fix = "free space there or move it (agentlabd --state-dir); logs and artifacts are kept there";
            if free_mb < FULL_DISK_MB {
                Check::fail("disk space", detail, fix)
            } else if free_mb < LOW_DISK_MB {
                Check::warn("disk space", detail, fix)
            } else {
                Check::ok("disk space", detail)
            }
        }
        Err(e) => Check::fail("disk space", format!("cannot read {}: {e}", dir.display()), "check the state directory"),
    }
}

/// The host end of AF_VSOCK (`vhost_vsock`), which the Proxmox backend listens on.
fn vsock_module(backend: &str) -> Check {
    vsock_module_check(backend, Path::new("/sys/module/vhost_vsock").exists())
}

fn vsock_module_check(backend: &str, loaded: bool) -> Check {
    match (backend, loaded) {
        (_, true) => Check::ok("vsock module", "vhost_vsock is loaded"),
        ("qemu", false) => {
            Check::ok("vsock module", "vhost_vsock is not loaded; the qemu backend does not need it (hybrid vsock)")
        }
        (_, false) => Check::fail(
            "vsock module",
            "vhost_vsock is not loaded, so no guest can reach agentlabd",
            "modprobe vhost_vsock, and list it in /etc/modules-load.d/agentlab.conf (agentlab host setup --apply does both)",
        ),
    }
}

/// The Landlock ABI a Linux release has, from the version that introduced each ABI.
pub fn landlock_abi_of_kernel(release: &str) -> u32 {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let version: (u32, u32) = (
        parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
        parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
    );
    const INTRODUCED: [((u32, u32), u32); 7] =
        [((6, 15), 7), ((6, 12), 6), ((6, 10), 5), ((6, 7), 4), ((6, 2), 3), ((5, 19), 2), ((5, 13), 1)];
    INTRODUCED.iter().find(|(since, _)| version >= *since).map_or(0, |(_, abi)| *abi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landlock_abis_follow_the_kernel_release() {
        assert_eq!(landlock_abi_of_kernel("6.1.0-56-amd64"), 2);
        assert_eq!(landlock_abi_of_kernel("6.18.44-fc-v657"), 7);
        assert_eq!(landlock_abi_of_kernel("6.8.0"), 4);
        assert_eq!(landlock_abi_of_kernel("5.10.0"), 0);
        assert_eq!(landlock_abi_of_kernel("garbage"), 0);
    }

    #[test]
    fn disk_space_and_vsock_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let check = disk_space(dir.path());
        assert!(check.detail.ends_with(&format!("MiB free in {}", dir.path().display())), "{check:?}");
        let missing = disk_space(Path::new("/nonexistent/agentlab"));
        assert_eq!(missing.status, Status::Fail);
        let missing = vsock_module_check("proxmox", false);
        assert_eq!(
            (missing.status, missing.detail.as_str()),
            (Status::Fail, "vhost_vsock is not loaded, so no guest can reach agentlabd")
        );
        assert_eq!(
            missing.fix.as_deref(),
            Some(
                "modprobe vhost_vsock, and list it in /etc/modules-load.d/agentlab.conf (agentlab host setup --apply does both)"
            )
        );
        let loaded = vsock_module_check("proxmox", true);
        assert_eq!((loaded.status, loaded.detail.as_str(), loaded.fix), (Status::Ok, "vhost_vsock is loaded", None));
        let qemu = vsock_module_check("qemu", false);
        assert_eq!((qemu.status, qemu.fix.as_deref()), (Status::Ok, None), "{qemu:?}");
        // The real probe agrees with /sys.
        let live = vsock_module("proxmox").status;
        assert_eq!(live == Status::Ok, Path::new("/sys/module/vhost_vsock").exists());
    }
}
