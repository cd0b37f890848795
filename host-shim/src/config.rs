//! Where the daemon keeps things, and its limits. Production defaults follow the
//! design; `--state-dir` moves everything under one directory for unprivileged use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::admission::Budget;
use crate::backend::qemu::{Accel, QemuConfig};

pub const DEFAULT_SOCKET: &str = "/run/agentlab/agentlabd.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/agentlab";
pub const DEFAULT_IMAGE_DIR: &str = "/usr/share/agentlab/image";
pub const DEFAULT_PROFILES_DIR: &str = "/etc/agentlab/profiles";
/// The profile a job gets when it names none.
pub const DEFAULT_PROFILE: &str = "yolo-ephemeral";

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Every `*.yaml` here is loaded at start; one invalid profile stops the start.
    pub profiles_dir: PathBuf,
    pub qemu: QemuConfig,
    /// How long a guest may take from VM start to its agent's dial-in.
    pub boot_timeout: Duration,
    /// Timeout for jobs submitted without one.
    pub default_job_timeout: Duration,
    /// SIGTERM → SIGKILL grace the agent gives a job.
    pub kill_grace: Duration,
    /// How long past the job's own timeout the host waits for the agent's report
    /// before it gives up on the guest.
    pub report_slack: Duration,
    /// Most bytes of output stored per job; the rest is dropped after a marker.
    pub max_log_bytes: u64,
    /// What all sandboxes together may be given; jobs beyond it wait in the queue.
    pub budget: Budget,
}

/// The default host budget: four vCPUs per host CPU (sandboxes are mostly idle, waiting
/// on a model), and 90% of the host's memory.
pub fn default_budget() -> Budget {
    let cpus = std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1));
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .unwrap_or(4 * 1024 * 1024);
    Budget { cores: cpus * 4, memory_mb: total_kib / 1024 * 9 / 10 }
}

impl DaemonConfig {
    /// Defaults for a state directory and socket.
    pub fn new(state_dir: &Path, socket: &Path, image_dir: &Path) -> Self {
        DaemonConfig {
            state_dir: state_dir.to_owned(),
            socket: socket.to_owned(),
            profiles_dir: PathBuf::from(DEFAULT_PROFILES_DIR),
            qemu: QemuConfig {
                qemu: PathBuf::from("qemu-system-x86_64"),
                vhost_device_vsock: PathBuf::from("vhost-device-vsock"),
                image_dir: image_dir.to_owned(),
                run_dir: state_dir.join("sandboxes"),
                accel: Accel::Auto,
                max_cpus: std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
                max_memory_mb: 8192,
                extra_cmdline: String::new(),
            },
            boot_timeout: Duration::from_secs(90),
            default_job_timeout: Duration::from_secs(3600),
            kill_grace: Duration::from_secs(5),
            report_slack: Duration::from_secs(60),
            max_log_bytes: 1 << 30,
            budget: default_budget(),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("agentlab.db")
    }

    pub fn jobs_dir(&self) -> PathBuf {
        self.state_dir.join("jobs")
    }

    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        self.jobs_dir().join(job_id)
    }

    /// Secrets bundles (age-encrypted) and the identity that opens them.
    pub fn secrets_dir(&self) -> PathBuf {
        self.state_dir.join("secrets")
    }

    pub fn uploads_dir(&self) -> PathBuf {
        self.state_dir.join("uploads")
    }
}
