//! Where sandboxes come from. `qemu` (local microVMs) is the embedded default;
//! `proxmox` is the production backend.

pub mod adopted;
pub mod disk_image;
mod process;
pub mod proxmox;
pub mod qemu;

use std::collections::HashSet;
use std::path::PathBuf;

use async_trait::async_trait;

/// Where a sandbox's agent connection arrives on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelEndpoint {
    /// Hybrid vsock: the guest's dial to host port P arrives on `<uds>_P`.
    Hybrid { uds: PathBuf },
    /// Real AF_VSOCK: the connection whose peer CID is `cid`.
    Vsock { cid: u32 },
}

/// What the runner asks a backend for.
pub struct ProvisionRequest {
    pub sandbox_id: String,
    /// The job the sandbox is for (Proxmox puts it in the VM's description).
    pub job_id: String,
    /// The profile's template (Proxmox: linked-cloned; a node may map it to its own).
    pub template_vmid: u32,
    /// The profile's bridge, or None for no network device.
    pub bridge: Option<String>,
    /// Where the guest's serial console should be written (kept with the job).
    pub console_log: PathBuf,
    /// vCPUs and memory from the job's profile.
    pub cores: u32,
    pub memory_mb: u32,
}

/// How the VM process ended on its own.
#[derive(Clone, Debug)]
pub struct VmExit {
    pub description: String,
}

/// Backend errors. Each names the cause and what to do about it.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BackendError {
    /// {program} not found (searched {searched}): {fix}
    MissingBinary { program: String, searched: String, fix: &'static str },
    /// the guest image is not built: {path} does not exist; build it with `make image` (image/build.sh), or point agentlabd --image-dir at a built image
    ImageMissing { path: String },
    /// cannot start {what}: {source}
    Spawn { what: String, source: std::io::Error },
    /// {what} exited during start-up ({status}): {stderr}
    DeviceFailed { what: String, status: String, stderr: String },
    /// {what} did not create {path} within {secs} s: {stderr}
    DeviceTimeout { what: String, path: String, secs: u64, stderr: String },
    /// {context}: {source}
    Io { context: String, source: std::io::Error },
    /// {0}
    Proxmox(String),
}

/// A source of sandboxes.
#[async_trait]
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// A sandbox an earlier, killed daemon left running, to carry on with; `None` if
    /// this backend cannot take VMs over or the VM is gone.
    fn adopt(&self, _sandbox_id: &str) -> Option<Box<dyn Sandbox>> {
        None
    }

    /// Like [`Self::adopt`], for a backend that has to ask where the VM is and whether
    /// it still runs (Proxmox); the error says why the VM cannot be taken back.
    async fn reattach(&self, sandbox_id: &str) -> Result<Box<dyn Sandbox>, String> {
        self.adopt(sandbox_id).ok_or_else(|| "its sandbox did not survive".to_owned())
    }

    /// Gets rid of whatever is left of a sandbox no job needs any more.
    fn discard(&self, _sandbox_id: &str) {}

    /// At start-up: discards what an earlier daemon left on this host that no record
    /// speaks for (a crash between creating a VM and recording it), except `keep`.
    fn discard_unrecorded(&self, _keep: &HashSet<String>) {}

    /// The vCPUs and memory (MiB) a sandbox asking for `cores` and `memory_mb` gets,
    /// which is what admission control counts against the host's budget.
    fn granted(&self, cores: u32, memory_mb: u32) -> (u32, u32) {
        (cores, memory_mb)
    }

    /// Checks everything a sandbox needs, so a job fails before any VM exists.
    async fn preflight(&self) -> Result<(), BackendError>;

    /// The backend's prerequisites one by one, for `agentlab doctor`.
    async fn doctor(&self) -> Vec<crate::doctor::Check> {
        vec![match self.preflight().await {
            Ok(()) => crate::doctor::Check::ok("backend", format!("{} is ready", self.name())),
            Err(e) => crate::doctor::Check::fail("backend", e.to_string(), "see the message"),
        }]
    }

    /// Creates the sandbox's VM and devices, not yet running.
    async fn provision(&self, req: &ProvisionRequest) -> Result<Box<dyn Sandbox>, BackendError>;
}

/// One VM.
#[async_trait]
pub trait Sandbox: Send {
    fn channel(&self) -> ChannelEndpoint;

    /// Starts the VM. The channel must be listened on before this is called.
    async fn boot(&mut self) -> Result<(), BackendError>;

    /// Resolves when the VM stops by itself. Cancel-safe.
    async fn exited(&mut self) -> VmExit;

    /// Which accelerator the VM runs on, for the record.
    fn accel(&self) -> Option<String>;

    /// What the VM got (vCPUs, memory, accelerator), for the record.
    fn shape(&self) -> String;

    /// The last lines the guest and its devices printed, for error messages.
    fn diagnostics(&self) -> String;

    /// Warnings from steps that succeeded (Proxmox tasks ending `WARNINGS: N`), each
    /// once, for the job's record.
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// What to check when the guest's agent never dialed in.
    fn dial_in_hint(&self) -> String {
        "the guest kernel or agent did not come up (see the console below; rebuild the image with `make image` if the agent is missing)".to_owned()
    }

    /// Stops the VM (gracefully if it is powering off anyway) and removes everything.
    async fn destroy(self: Box<Self>) -> Result<(), BackendError>;
}
