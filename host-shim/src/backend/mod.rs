//! Where sandboxes come from. `qemu` (local microVMs) is the embedded default;
//! `proxmox` is the production backend.

pub mod disk_image;
mod process;
pub mod qemu;

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
}

/// A source of sandboxes.
#[async_trait]
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// Checks everything a sandbox needs, so a job fails before any VM exists.
    async fn preflight(&self) -> Result<(), BackendError>;

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

    /// Stops the VM (gracefully if it is powering off anyway) and removes everything.
    async fn destroy(self: Box<Self>) -> Result<(), BackendError>;
}
