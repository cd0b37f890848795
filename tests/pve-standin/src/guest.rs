//! What runs when a VM starts: a real microVM through host-shim's QEMU backend, or an
//! instant fake agent. Both reach the shim on hybrid vsock under
//! `<hybrid_dir>/vm-<vmid>/`, where the shim listens on `vsock.sock_52000`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentlab_host::backend::qemu::{Accel, QemuBackend, QemuConfig};
use agentlab_host::backend::{Backend, ProvisionRequest};
use agentlab_protocol::transport::hybrid;
use agentlab_protocol::{
    AGENT_VSOCK_PORT, Capabilities, Enforcement, GuestConnection, GuestMessage, Hello, HostMessage, JobOutcome,
    JobResult, OutputChunk, OutputStream, guest_handshake,
};
use tokio::sync::oneshot;

use crate::{GuestMode, Shared};

/// The CID in `args: -device vhost-vsock-pci,guest-cid=N`.
pub fn cid_from_args(args: &str) -> Option<u32> {
    args.split_whitespace()
        .flat_map(|w| w.split(','))
        .find_map(|part| part.strip_prefix("guest-cid="))
        .and_then(|n| n.parse().ok())
}

/// A running guest: tell it to stop, and learn when it has.
pub struct GuestHandle {
    stop: Option<oneshot::Sender<()>>,
    done: oneshot::Receiver<()>,
}

impl GuestHandle {
    /// Asks the guest to stop (a real VM gets its power-off grace, then is killed).
    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn stop_and_wait(mut self, timeout: Duration) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(timeout + Duration::from_secs(10), &mut self.done).await;
    }
}

fn vm_dir(hybrid_dir: &Path, vmid: u32) -> PathBuf {
    hybrid_dir.join(format!("vm-{vmid}"))
}

/// Starts what the VM runs; `None` when the stand-in runs no guests.
pub async fn start(
    shared: Arc<Shared>,
    vmid: u32,
    cid: Option<u32>,
    cores: u32,
    memory_mb: u32,
) -> Result<Option<GuestHandle>, String> {
    let mode = shared.options.guest.clone();
    if !matches!(mode, GuestMode::None) && cid.is_none() {
        return Err(format!("VM {vmid} has no vsock device (args: -device vhost-vsock-pci,guest-cid=N)"));
    }
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    match mode {
        GuestMode::None => return Ok(None),
        GuestMode::Fake { hybrid_dir } => {
            let socket = hybrid::guest_port_path(&vm_dir(&hybrid_dir, vmid).join("vsock.sock"), AGENT_VSOCK_PORT);
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = fake_agent(&socket) => {}
                    _ = stop_rx => {}
                }
                powered_off(&shared, vmid);
                let _ = done_tx.send(());
            });
        }
        GuestMode::Boot { hybrid_dir, image_dir } => {
            let backend = QemuBackend::new(QemuConfig {
                qemu: PathBuf::from("qemu-system-x86_64"),
                vhost_device_vsock: PathBuf::from("vhost-device-vsock"),
                image_dir,
                run_dir: hybrid_dir.clone(),
                accel: Accel::Tcg,
                max_cpus: 2,
                max_memory_mb: 1024,
                extra_cmdline: String::new(),
            });
            let req = ProvisionRequest {
                sandbox_id: format!("vm-{vmid}"),
                job_id: String::new(),
                template_vmid: 0,
                bridge: None,
                console_log: hybrid_dir.join(format!("vm-{vmid}.console.log")),
                cores,
                memory_mb,
            };
            let mut vm = backend.provision(&req).await.map_err(|e| format!("start failed: {e}"))?;
            vm.boot().await.map_err(|e| format!("start failed: {e}"))?;
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = vm.exited() => {}
                    _ = stop_rx => {}
                }
                let _ = vm.destroy().await;
                powered_off(&shared, vmid);
                let _ = done_tx.send(());
            });
        }
    }
    Ok(Some(GuestHandle { stop: Some(stop_tx), done: done_rx }))
}

fn powered_off(shared: &Shared, vmid: u32) {
    let mut c = shared.lock();
    c.guests.remove(&vmid);
    if let Some(vm) = c.vms.get_mut(&vmid) {
        vm.running = false;
    }
}

/// A guest agent that boots instantly: dials the shim, runs the job in name only, and
/// powers off when told to. `sleep N` in the command waits N seconds; `exit N` exits N.
async fn fake_agent(socket: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => break s,
            Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) => return,
        }
    };
    let mut conn: GuestConnection<_> = GuestConnection::new(stream);
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        // What this fake does: uploads, acknowledged output, its (empty) secrets.
        capabilities: Capabilities(
            Capabilities::WORKDIR_UPLOAD.0 | Capabilities::OUTPUT_ACK.0 | Capabilities::SECRETS.0,
        ),
        agent_version: "fake-0.1.0".into(),
        kernel_release: "stand-in".into(),
        landlock_abi: 0,
    };
    if guest_handshake(&mut conn, hello).await.is_err() {
        return;
    }
    let Ok(Some(HostMessage::Job(spec))) = conn.recv().await else { return };
    let command = spec.args.last().cloned().unwrap_or_default();
    if conn.send(GuestMessage::RequestSecrets).await.is_err() {
        return;
    }
    let Ok(Some(HostMessage::Secrets(_))) = conn.recv().await else { return };
    // A workdir upload is taken and acknowledged chunk by chunk, then dropped.
    let mut remaining = spec.workdir_upload_bytes.unwrap_or(0);
    while remaining > 0 {
        let Ok(Some(HostMessage::WorkdirChunk { seq, data })) = conn.recv().await else { return };
        remaining = remaining.saturating_sub(data.len() as u64);
        if conn.send(GuestMessage::WorkdirAck { seq }).await.is_err() {
            return;
        }
    }
    if conn.send(GuestMessage::JobStarted { pid: 4242 }).await.is_err() {
        return;
    }
    let text = format!("fake-agent ran: {command}\n");
    let chunk = OutputChunk { seq: 0, stream: OutputStream::Stdout, data: text.clone().into_bytes() };
    if conn.send(GuestMessage::Output(chunk)).await.is_err() {
        return;
    }
    let mut code = 0;
    for part in command.split(';').map(str::trim) {
        if let Some(n) = part.strip_prefix("sleep ").and_then(|n| n.trim().parse::<f64>().ok()) {
            tokio::time::sleep(Duration::from_secs_f64(n)).await;
        }
        if let Some(n) = part.strip_prefix("exit ").and_then(|n| n.trim().parse::<i32>().ok()) {
            code = n;
        }
    }
    // The output ack, then the result.
    let _ = conn.recv().await;
    let result = JobResult {
        outcome: JobOutcome::Exited { code },
        duration_ms: 1,
        output_bytes: text.len() as u64,
        enforcement: Enforcement::default(),
    };
    if conn.send(GuestMessage::JobFinished(result)).await.is_err() {
        return;
    }
    // Shutdown, or the host going away: either way, power off.
    let _ = tokio::time::timeout(Duration::from_secs(30), conn.recv()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cid_from_args() {
        assert_eq!(cid_from_args("-device vhost-vsock-pci,guest-cid=1234"), Some(1234));
        assert_eq!(cid_from_args("-device vhost-vsock-pci,id=v0,guest-cid=77 -no-reboot"), Some(77));
        assert_eq!(cid_from_args("-no-reboot"), None);
    }
}
