//! A local microVM started by an earlier agentlabd that was killed: its QEMU and
//! vhost-device-vsock outlived it (they run in their own session), and `vm.json` in the
//! sandbox's directory says which processes they are. The new daemon manages them by
//! pid, after checking each pid is still the same process (its start time).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::process::{POWEROFF_GRACE, QEMU_LOG, VHOST_LOG, VSOCK_SOCKET, vm_diagnostics};
use super::{BackendError, ChannelEndpoint, Sandbox, VmExit};

/// The record of a running VM's processes, written once it boots.
pub const RECORD: &str = "vm.json";
const POLL: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: tells a reused pid from the process we started.
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: u32) -> Option<ProcessId> {
        let pid = i32::try_from(pid).ok()?;
        Some(ProcessId { pid, start_time: start_time(pid)? })
    }

    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    fn signal(&self, signal: Signal) {
        if self.alive() {
            let _ = kill(Pid::from_raw(self.pid), signal);
        }
    }
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// None until the VM boots.
    pub qemu: Option<ProcessId>,
    pub vhost: ProcessId,
    pub cpus: u32,
    pub memory_mb: u32,
    pub accel: String,
    pub console_log: PathBuf,
}

impl VmRecord {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{RECORD}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, dir.join(RECORD))
    }

    pub fn read(dir: &Path) -> Option<VmRecord> {
        serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()
    }

    /// Kills whatever of the VM is still running.
    pub fn kill(&self) {
        if let Some(qemu) = &self.qemu {
            qemu.signal(Signal::SIGKILL);
        }
        self.vhost.signal(Signal::SIGKILL);
    }

    fn qemu_alive(&self) -> bool {
        self.qemu.as_ref().is_some_and(ProcessId::alive)
    }
}

/// A VM taken over from an earlier daemon.
pub struct AdoptedVm {
    pub dir: PathBuf,
    pub record: VmRecord,
}

impl AdoptedVm {
    /// The VM in `dir`, if its record is there and its QEMU still runs.
    pub fn find(dir: &Path) -> Option<AdoptedVm> {
        let record = VmRecord::read(dir)?;
        record.qemu_alive().then(|| AdoptedVm { dir: dir.to_owned(), record })
    }
}

#[async_trait]
impl Sandbox for AdoptedVm {
    fn channel(&self) -> ChannelEndpoint {
        ChannelEndpoint::Hybrid { uds: self.dir.join(VSOCK_SOCKET) }
    }

    async fn boot(&mut self) -> Result<(), BackendError> {
        Err(BackendError::Io {
            context: format!("sandbox {} was taken over running", self.dir.display()),
            source: std::io::Error::other("it cannot be booted again"),
        })
    }

    async fn exited(&mut self) -> VmExit {
        while self.record.qemu_alive() {
            tokio::time::sleep(POLL).await;
        }
        VmExit { description: "QEMU exited".to_owned() }
    }

    fn accel(&self) -> Option<String> {
        Some(self.record.accel.clone())
    }

    fn shape(&self) -> String {
        format!(
            "{} vCPU, {} MiB, {} (taken over after a restart)",
            self.record.cpus, self.record.memory_mb, self.record.accel
        )
    }

    fn diagnostics(&self) -> String {
        vm_diagnostics(&self.dir.join(QEMU_LOG), &self.dir.join(VHOST_LOG), &self.record.console_log)
    }

    async fn destroy(self: Box<Self>) -> Result<(), BackendError> {
        // The agent powers off once told the result is stored; if it does not, kill.
        let deadline = tokio::time::Instant::now() + POWEROFF_GRACE;
        while self.record.qemu_alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        self.record.kill();
        std::fs::remove_dir_all(&self.dir)
            .map_err(|source| BackendError::Io { context: format!("removing {}", self.dir.display()), source })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_process_is_known_by_pid_and_start_time() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.alive());
        assert!(!ProcessId { pid: me.pid, start_time: me.start_time + 1 }.alive(), "a reused pid is another process");
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let id = ProcessId::of(child.id()).unwrap();
        assert!(id.alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!id.alive());
    }

    #[test]
    fn the_record_round_trips_and_an_absent_vm_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let gone = ProcessId { pid: i32::MAX, start_time: 1 };
        let record = VmRecord {
            qemu: Some(gone.clone()),
            vhost: gone,
            cpus: 2,
            memory_mb: 512,
            accel: "tcg".into(),
            console_log: dir.path().join("console.log"),
        };
        record.write(dir.path()).unwrap();
        assert_eq!(VmRecord::read(dir.path()), Some(record));
        assert!(AdoptedVm::find(dir.path()).is_none(), "its QEMU is not running");
    }
}
