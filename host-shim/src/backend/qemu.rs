//! The local microVM backend: per sandbox one `vhost-device-vsock` and one
//! `qemu-system-x86_64` (q35, memfd-backed shared RAM, `vhost-user-vsock-pci`), booting
//! the micro image's uncompressed kernel through PVH. KVM is used only if a probe boot
//! under it succeeds; otherwise TCG.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;

use super::adopted::{AdoptedVm, ProcessId, VmRecord};
use super::disk_image::{self, ImageKind};
use super::process::{POWEROFF_GRACE, QEMU_LOG, VHOST_LOG, VSOCK_SOCKET, find_program, tail, vm_diagnostics};
use super::{Backend, BackendError, ChannelEndpoint, ProvisionRequest, Sandbox, VmExit};
use crate::doctor::Check;

/// Kernel command line of the micro image: quiet, no crypto self-tests (the slowest
/// step under TCG, ~0.3 s) and no legacy probes. CPU mitigations stay on: the job is
/// hostile and shares the guest with the agent.
const KERNEL_CMDLINE: &str = "console=ttyS0 quiet loglevel=3 panic=-1 reboot=t pci=lastbus=0 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check rcupdate.rcu_expedited=1";
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
const DEVICE_START_TIMEOUT: Duration = Duration::from_secs(10);
/// The CID the guest gets on its private vhost-device-vsock (one device per VM).
const GUEST_CID: u32 = 3;

const QEMU_FIX: &str = "install it (apt-get install qemu-system-x86) or pass agentlabd --qemu PATH";
const VHOST_FIX: &str =
    "install it (cargo install vhost-device-vsock --locked) or pass agentlabd --vhost-device-vsock PATH";

/// Which accelerator to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a probe boot works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub vhost_device_vsock: PathBuf,
    /// Holds `vmlinux` and `initrd.img` from image/build.sh, or a template disk
    /// (`disk.qcow2` and its kernel and initrd) from image/build-template.sh.
    pub image_dir: PathBuf,
    /// Per-sandbox sockets and logs go under here.
    pub run_dir: PathBuf,
    pub accel: Accel,
    /// Caps on what a profile may ask of this host: a local microVM never gets more
    /// vCPUs than the host has, nor more memory than the operator allows.
    pub max_cpus: u32,
    pub max_memory_mb: u32,
    /// Appended to the guest kernel's command line (benchmarks pass parameters to a
    /// test init this way); empty in production.
    pub extra_cmdline: String,
}

impl QemuConfig {
    pub fn image_kind(&self) -> ImageKind {
        ImageKind::of(&self.image_dir)
    }

    pub fn kernel(&self) -> PathBuf {
        disk_image::kernel(&self.image_dir, self.image_kind())
    }

    pub fn initrd(&self) -> PathBuf {
        self.image_dir.join("initrd.img")
    }
}

pub struct QemuBackend {
    config: QemuConfig,
    accel: OnceCell<&'static str>,
}

struct Binaries {
    qemu: PathBuf,
    vhost: PathBuf,
}

impl QemuBackend {
    pub fn new(config: QemuConfig) -> Self {
        Self { config, accel: OnceCell::new() }
    }

    fn binaries(&self) -> Result<Binaries, BackendError> {
        let qemu = find_program(&self.config.qemu).map_err(|searched| BackendError::MissingBinary {
            program: self.config.qemu.display().to_string(),
            searched,
            fix: QEMU_FIX,
        })?;
        let vhost = find_program(&self.config.vhost_device_vsock).map_err(|searched| BackendError::MissingBinary {
            program: self.config.vhost_device_vsock.display().to_string(),
            searched,
            fix: VHOST_FIX,
        })?;
        Ok(Binaries { qemu, vhost })
    }

    fn check_image(&self) -> Result<(), BackendError> {
        for path in disk_image::required_files(&self.config.image_dir, self.config.image_kind()) {
            if !path.is_file() {
                return Err(BackendError::ImageMissing { path: path.display().to_string() });
            }
        }
        Ok(())
    }

    /// The accelerator for this daemon's VMs, probing KVM once if asked to.
    async fn accel(&self, qemu: &Path) -> &'static str {
        self.accel
            .get_or_init(|| async {
                match self.config.accel {
                    Accel::Tcg => "tcg",
                    Accel::Kvm => "kvm",
                    Accel::Auto => {
                        let works = probe_kvm(qemu, &self.config).await;
                        if works {
                            tracing::info!("KVM probe boot succeeded: using KVM");
                            "kvm"
                        } else {
                            tracing::info!("KVM unavailable or the guest kernel does not boot under it: using TCG");
                            "tcg"
                        }
                    }
                }
            })
            .await
    }
}

/// Boots the image under KVM with `agentlab.probe`, which makes the agent print a
/// marker and power off at once. Anything else (no /dev/kvm, QEMU refusing the CPU, a
/// hang, a crash) is "no", logged with the reason.
async fn probe_kvm(qemu: &Path, config: &QemuConfig) -> bool {
    if let Err(e) = std::fs::File::options().read(true).write(true).open("/dev/kvm") {
        tracing::info!("KVM probe: /dev/kvm unusable: {e}");
        return false;
    }
    let Ok(dir) = tempfile_dir(&config.run_dir, "kvm-probe") else {
        return false;
    };
    let console = dir.join("console.log");
    let qemu_log = dir.join(QEMU_LOG);
    let mut cmd = Command::new(qemu);
    cmd.args(["-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "128M", "-smp", "1"])
        .args(common_args(config, &console, true))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if let Ok(log) = std::fs::File::create(&qemu_log) {
        cmd.stderr(log);
    }
    let verdict = match cmd.spawn() {
        Ok(mut child) => match tokio::time::timeout(PROBE_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) if std::fs::read_to_string(&console).is_ok_and(|c| c.contains("AGENTLAB-PROBE-OK")) => {
                Ok(status)
            }
            Ok(Ok(status)) => Err(format!("QEMU exited ({status}) without the probe marker: {}", tail(&qemu_log, 3))),
            Ok(Err(e)) => Err(format!("waiting for QEMU: {e}")),
            Err(_) => Err(format!("the guest did not finish within {} s", PROBE_TIMEOUT.as_secs())),
        },
        Err(e) => Err(format!("cannot start QEMU: {e}")),
    };
    let _ = std::fs::remove_dir_all(&dir);
    match verdict {
        Ok(_) => true,
        Err(reason) => {
            tracing::info!("KVM probe boot failed: {reason}");
            false
        }
    }
}

fn tempfile_dir(parent: &Path, name: &str) -> std::io::Result<PathBuf> {
    let dir = parent.join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Arguments shared by sandboxes and the probe: image, console, no defaults.
fn common_args(config: &QemuConfig, console: &Path, probe: bool) -> Vec<String> {
    let kind = config.image_kind();
    let mut cmdline = match (kind, probe) {
        (ImageKind::Micro, false) => KERNEL_CMDLINE.to_owned(),
        (ImageKind::Micro, true) => format!("{KERNEL_CMDLINE} agentlab.probe"),
        (ImageKind::Disk, probe) => disk_image::disk_cmdline(KERNEL_CMDLINE, probe),
    };
    if !config.extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&config.extra_cmdline);
    }
    let mut args: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", console.display()),
        "-kernel".into(),
        config.kernel().display().to_string(),
        "-initrd".into(),
        config.initrd().display().to_string(),
        "-append".into(),
        cmdline,
    ];
    if kind == ImageKind::Disk {
        args.extend(disk_image::drive_args(&config.image_dir));
    }
    args
}

#[async_trait]
impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn adopt(&self, sandbox_id: &str) -> Option<Box<dyn Sandbox>> {
        AdoptedVm::find(&self.config.run_dir.join(sandbox_id)).map(|vm| Box::new(vm) as Box<dyn Sandbox>)
    }

    fn discard(&self, sandbox_id: &str) {
        let dir = self.config.run_dir.join(sandbox_id);
        if let Some(record) = VmRecord::read(&dir) {
            record.kill();
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    fn discard_unrecorded(&self, keep: &std::collections::HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.config.run_dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                self.discard(&name);
            }
        }
    }

    fn granted(&self, cores: u32, memory_mb: u32) -> (u32, u32) {
        (cores.clamp(1, self.config.max_cpus.max(1)), memory_mb.clamp(128, self.config.max_memory_mb.max(128)))
    }

    async fn preflight(&self) -> Result<(), BackendError> {
        self.binaries()?;
        self.check_image()
    }

    async fn doctor(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        for (name, program, fix) in
            [("qemu", &self.config.qemu, QEMU_FIX), ("vhost-device-vsock", &self.config.vhost_device_vsock, VHOST_FIX)]
        {
            checks.push(match find_program(program) {
                Ok(path) => Check::ok(name, path.display().to_string()),
                Err(searched) => {
                    Check::fail(name, format!("{} not found (searched {searched})", program.display()), fix)
                }
            });
        }
        checks.push(match self.check_image() {
            Ok(()) => Check::ok("image", self.config.image_dir.display().to_string()),
            Err(e) => Check::fail("image", e.to_string(), "make image (image/build.sh), or agentlabd --image-dir DIR"),
        });
        match std::fs::read_to_string(self.config.image_dir.join("kernel-release")) {
            Ok(release) => {
                let release = release.trim();
                let abi = crate::doctor::landlock_abi_of_kernel(release);
                let detail = format!(
                    "the image's kernel {release} has Landlock ABI {abi}: file rules{}{}",
                    if abi >= 4 { ", TCP rules" } else { "; TCP is blocked by seccomp instead (ABI < 4)" },
                    if abi >= 6 { ", signal and socket scoping" } else { "; no signal scoping (ABI < 6)" }
                );
                checks.push(if abi == 0 {
                    Check::warn(
                        "image landlock",
                        detail,
                        "profiles with `landlock: required` fail on it: use a kernel ≥ 5.13",
                    )
                } else {
                    Check::ok("image landlock", detail)
                });
            }
            Err(e) => checks.push(Check::warn(
                "image landlock",
                format!("cannot read the image's kernel-release: {e}"),
                "rebuild the image with make image",
            )),
        }
        if let Ok(bins) = self.binaries() {
            let accel = self.accel(&bins.qemu).await;
            checks.push(match (self.config.accel, accel) {
                (_, "kvm") => Check::ok("accelerator", "KVM"),
                (Accel::Tcg, _) => Check::ok("accelerator", "TCG (agentlabd --accel tcg)"),
                _ => Check::warn(
                    "accelerator",
                    "TCG: KVM is missing or the probe boot under it failed (agentlabd's log says why); guests boot several times slower",
                    "give agentlabd access to /dev/kvm (group kvm) on a host with virtualisation enabled",
                ),
            });
        }
        checks
    }

    async fn provision(&self, req: &ProvisionRequest) -> Result<Box<dyn Sandbox>, BackendError> {
        let bins = self.binaries()?;
        self.check_image()?;
        let accel = self.accel(&bins.qemu).await;
        let dir = self.config.run_dir.join(&req.sandbox_id);
        std::fs::create_dir_all(&dir)
            .map_err(|source| BackendError::Io { context: format!("creating {}", dir.display()), source })?;
        let vhost_socket = dir.join("vhost.sock");
        let uds = dir.join(VSOCK_SOCKET);
        let vhost_log = dir.join(VHOST_LOG);
        let (cpus, memory_mb) = self.granted(req.cores, req.memory_mb);
        let mut sandbox = QemuSandbox {
            cpus,
            memory_mb,
            config: self.config.clone(),
            dir,
            qemu_bin: bins.qemu,
            accel,
            vhost_socket,
            uds,
            console_log: req.console_log.clone(),
            qemu_log: PathBuf::new(),
            vhost_log,
            vhost: None,
            qemu: None,
            exit: None,
        };
        sandbox.qemu_log = sandbox.dir.join(QEMU_LOG);
        sandbox.start_vhost(&bins.vhost).await?;
        Ok(Box::new(sandbox))
    }
}

struct QemuSandbox {
    cpus: u32,
    memory_mb: u32,
    config: QemuConfig,
    dir: PathBuf,
    qemu_bin: PathBuf,
    accel: &'static str,
    vhost_socket: PathBuf,
    uds: PathBuf,
    console_log: PathBuf,
    qemu_log: PathBuf,
    vhost_log: PathBuf,
    vhost: Option<Child>,
    qemu: Option<Child>,
    exit: Option<VmExit>,
}

fn log_file(path: &Path) -> Result<std::fs::File, BackendError> {
    std::fs::File::create(path)
        .map_err(|source| BackendError::Io { context: format!("creating {}", path.display()), source })
}

/// The VM's processes get a session of their own: a killed (or restarted) daemon does
/// not take its sandboxes with it. The next daemon takes them over from `vm.json`, or
/// kills them if their job cannot go on.
fn outlive_daemon(cmd: &mut Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; this runs
    // in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl QemuSandbox {
    async fn start_vhost(&mut self, vhost_bin: &Path) -> Result<(), BackendError> {
        let mut cmd = Command::new(vhost_bin);
        cmd.arg("--vm")
            .arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                self.vhost_socket.display(),
                self.uds.display()
            ))
            .stdin(Stdio::null())
            .stdout(log_file(&self.vhost_log)?)
            .stderr(log_file(&self.vhost_log)?)
            .kill_on_drop(true);
        outlive_daemon(&mut cmd);
        let what = "vhost-device-vsock";
        let mut child = cmd.spawn().map_err(|source| BackendError::Spawn { what: what.into(), source })?;
        let deadline = tokio::time::Instant::now() + DEVICE_START_TIMEOUT;
        while !self.vhost_socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BackendError::DeviceFailed {
                    what: what.into(),
                    status: status.to_string(),
                    stderr: tail(&self.vhost_log, 10),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::DeviceTimeout {
                    what: what.into(),
                    path: self.vhost_socket.display().to_string(),
                    secs: DEVICE_START_TIMEOUT.as_secs(),
                    stderr: tail(&self.vhost_log, 10),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Recorded at once: should the daemon die before the VM boots, the next one
        // finds the device process and ends it.
        if let Some(vhost) = child.id().and_then(ProcessId::of) {
            self.record(None, vhost)?;
        }
        self.vhost = Some(child);
        Ok(())
    }

    /// Writes `vm.json`: which processes are this VM's, for a daemon that restarts.
    fn record(&self, qemu: Option<ProcessId>, vhost: ProcessId) -> Result<(), BackendError> {
        let record = VmRecord {
            qemu,
            vhost,
            cpus: self.cpus,
            memory_mb: self.memory_mb,
            accel: self.accel.to_owned(),
            console_log: self.console_log.clone(),
        };
        record
            .write(&self.dir)
            .map_err(|source| BackendError::Io { context: format!("recording {}", self.dir.display()), source })
    }

    fn qemu_args(&self) -> Vec<String> {
        let mem = format!("{}M", self.memory_mb);
        let cpu = if self.accel == "kvm" { "host" } else { "max" };
        let mut args: Vec<String> = vec![
            "-machine".into(),
            "q35".into(),
            "-accel".into(),
            self.accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-m".into(),
            mem.clone(),
            "-smp".into(),
            self.cpus.to_string(),
            // vhost-user devices need guest RAM the device process can map.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-chardev".into(),
            format!("socket,id=vsock0,path={}", self.vhost_socket.display()),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock0".into(),
        ];
        args.extend(common_args(&self.config, &self.console_log, false));
        args
    }
}

#[async_trait]
impl Sandbox for QemuSandbox {
    fn channel(&self) -> ChannelEndpoint {
        ChannelEndpoint::Hybrid { uds: self.uds.clone() }
    }

    async fn boot(&mut self) -> Result<(), BackendError> {
        let mut cmd = Command::new(&self.qemu_bin);
        cmd.args(self.qemu_args())
            .stdin(Stdio::null())
            .stdout(log_file(&self.qemu_log)?)
            .stderr(log_file(&self.qemu_log)?)
            .kill_on_drop(true);
        outlive_daemon(&mut cmd);
        let child = cmd.spawn().map_err(|source| BackendError::Spawn { what: "qemu".into(), source })?;
        let processes =
            (child.id().and_then(ProcessId::of), self.vhost.as_ref().and_then(|v| v.id()).and_then(ProcessId::of));
        self.qemu = Some(child);
        if let (Some(qemu), Some(vhost)) = processes {
            self.record(Some(qemu), vhost)?;
        }
        Ok(())
    }

    async fn exited(&mut self) -> VmExit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let Some(qemu) = self.qemu.as_mut() else {
            return std::future::pending().await;
        };
        let status = qemu.wait().await;
        let description = match status {
            Ok(s) => format!("QEMU exited ({s})"),
            Err(e) => format!("QEMU could not be waited for: {e}"),
        };
        let exit = VmExit { description };
        self.exit = Some(exit.clone());
        exit
    }

    fn accel(&self) -> Option<String> {
        Some(self.accel.to_owned())
    }

    fn shape(&self) -> String {
        format!("{} vCPU, {} MiB, {}", self.cpus, self.memory_mb, self.accel)
    }

    fn diagnostics(&self) -> String {
        vm_diagnostics(&self.qemu_log, &self.vhost_log, &self.console_log)
    }

    async fn destroy(mut self: Box<Self>) -> Result<(), BackendError> {
        if let Some(mut qemu) = self.qemu.take()
            && tokio::time::timeout(POWEROFF_GRACE, qemu.wait()).await.is_err()
        {
            let _ = qemu.kill().await;
        }
        if let Some(mut vhost) = self.vhost.take() {
            let _ = vhost.kill().await;
        }
        std::fs::remove_dir_all(&self.dir)
            .map_err(|source| BackendError::Io { context: format!("removing {}", self.dir.display()), source })
    }
}
