//! End to end with the Debian 12 template (image/build-template.sh): the real CLI and
//! agentlabd boot the template's disk under QEMU (its own kernel and initrd, the disk as
//! root with a throwaway overlay), systemd starts agentlab-agent from its unit, and a job
//! runs through the same path as on Proxmox. Slow under TCG (a full systemd boot), so
//! there is one test that checks everything it can.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::PathBuf;

use agentlab_tests::{Daemon, VsockDevice, accept_dial_in, console_tail, describe, host_kernel, workspace_root};
use serde_json::Value;

/// The template built by `make template` (make test builds it first).
fn template_dir() -> PathBuf {
    let dir = std::env::var_os("AGENTLAB_TEMPLATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/template"));
    for file in ["disk.qcow2", "vmlinux", "initrd.img", "kernel-release"] {
        assert!(
            dir.join(file).is_file(),
            "the template is not built ({} missing): run `make template`",
            dir.join(file).display()
        );
    }
    dir
}

#[test]
fn systemd_starts_the_agent_in_the_template_and_a_job_runs_end_to_end() {
    let template = template_dir();
    let kernel = std::fs::read_to_string(template.join("kernel-release")).unwrap().trim().to_owned();
    assert_ne!(kernel, host_kernel());
    let disk_meta = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.len(), m.modified().unwrap())
    };
    let disk_before = disk_meta(&template.join("disk.qcow2"));
    let d = Daemon::start_with(&["--image-dir", template.to_str().unwrap(), "--boot-timeout", "300s"]);
    let script = "uname -r; id -un; cat /proc/1/comm; grep -o 'agentlab-agent.service' /proc/self/cgroup; \
                  cat /etc/hostname; test -s /etc/machine-id && echo machine-id-set; git --version | cut -d' ' -f1-2; \
                  test -f /etc/ssl/certs/ca-certificates.crt && echo ca-certificates; \
                  cat /etc/modules-load.d/agentlab.conf | grep -v '^#'; pwd";
    let out = d.cli(&["job", "submit", "--follow", "--timeout", "2m", "--cmd", script]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{kernel}\nagent\nsystemd\nagentlab-agent.service\nagentlab\nmachine-id-set\ngit version\nca-certificates\n\
             vsock\nvmw_vsock_virtio_transport\n/workspace\n"
        ),
        "kernel, job user, systemd as PID 1, the agent's unit, a fresh machine-id, git, CA certificates, the vsock modules"
    );

    let jobs: Value = serde_json::from_slice(&d.cli(&["--json", "job", "list"]).stdout).unwrap();
    let job = d.job_json(jobs[0]["id"].as_str().unwrap());
    assert_eq!(job["state"], "COMPLETED");
    assert_eq!(job["guest_kernel"], kernel.as_str());
    let e = &job["enforcement"];
    assert_eq!(
        (e["user"].as_str(), e["uid"].as_u64(), e["seccomp"].as_bool()),
        (Some("agent"), Some(1000), Some(true)),
        "{e}"
    );
    d.wait_for_teardowns();
    let sandboxes: Value = serde_json::from_slice(&d.cli(&["--json", "sandbox", "list"]).stdout).unwrap();
    assert_eq!(sandboxes[0]["state"], "DESTROYED", "{sandboxes}");
    assert_eq!(d.live_sandbox_dirs(), Vec::<PathBuf>::new());
    assert_eq!(d.processes_using_state(), Vec::<String>::new());
    // The sandbox wrote to its own overlay, never to the template.
    assert_eq!(disk_meta(&template.join("disk.qcow2")), disk_before);
}

#[test]
fn building_the_template_again_is_a_no_op_when_nothing_changed() {
    let template = template_dir();
    let disk = std::fs::metadata(template.join("disk.qcow2")).unwrap().modified().unwrap();
    let agent = workspace_root().join("target/x86_64-unknown-linux-musl/release/agentlab-agent");
    let out = std::process::Command::new(workspace_root().join("image/build-template.sh"))
        .arg("--agent")
        .arg(&agent)
        .arg("--out")
        .arg(&template)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("build-template.sh: up to date ("), "{stderr}");
    assert_eq!(std::fs::metadata(template.join("disk.qcow2")).unwrap().modified().unwrap(), disk);
    // The size cap held when it was built.
    let manifest: Value = serde_json::from_slice(&std::fs::read(template.join("manifest.json")).unwrap()).unwrap();
    let qcow2 = manifest["files"]["disk.qcow2"]["size"].as_u64().unwrap();
    assert!(qcow2 <= 1024 << 20, "disk.qcow2 is {qcow2} bytes");
    for package in ["systemd", "git", "ca-certificates", "cloud-init", "systemd-resolved", "linux-image-cloud-amd64"] {
        assert!(manifest["packages"].get(package).is_some(), "{package} is not in the template");
    }
    assert!(manifest["packages"].get("sudo").is_none(), "no sudo in the template");
}

/// OVMF as Debian ships it (`apt-get install ovmf`): what a Proxmox VM with `bios: ovmf` runs.
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_disk_boots_by_itself_under_uefi_and_its_agent_dials_in() {
    use agentlab_protocol::transport::hybrid;
    use agentlab_protocol::{AGENT_VSOCK_PORT, HostConnection, HostMessage, host_handshake};
    use std::time::Duration;

    let template = template_dir();
    let kernel = std::fs::read_to_string(template.join("kernel-release")).unwrap().trim().to_owned();
    assert!(
        std::path::Path::new(OVMF).is_file(),
        "{OVMF} is missing: apt-get install ovmf (scripts/install-deps.sh does)"
    );
    let dir = tempfile::Builder::new().prefix("agentlab-uefi-").tempdir().unwrap();
    let console = dir.path().join("console.log");
    let vsock = VsockDevice::start(dir.path()).await;
    let listener = hybrid::listen(&vsock.uds, AGENT_VSOCK_PORT).unwrap();
    // No -kernel: OVMF finds systemd-boot on the ESP (EFI/BOOT/BOOTX64.EFI), which boots
    // the kernel and initrd from there, which mount the ext4 root by its label.
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024M", "-smp", "1"])
        .args(["-object", "memory-backend-memfd,id=mem,size=1024M,share=on", "-numa", "node,memdev=mem"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-bios", OVMF])
        // The disk behind virtio-scsi, as `scsihw: virtio-scsi-single` + `scsi0` in Proxmox
        // (the agentlabd test boots it as virtio-blk).
        .args(["-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,bus=scsi0.0,drive=root"])
        .arg("-drive")
        .arg(format!("file={},if=none,id=root,format=qcow2,snapshot=on", template.join("disk.qcow2").display()))
        .arg("-chardev")
        .arg(format!("socket,id=vsock0,path={}", vsock.vhost_sock.display()))
        .args(["-device", "vhost-user-vsock-pci,chardev=vsock0", "-serial"])
        .arg(format!("file:{}", console.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stream = accept_dial_in(&listener, &console, Duration::from_secs(240)).await;
    let mut conn = HostConnection::new(stream);
    let (hello, _) = host_handshake(&mut conn, "sb-uefi").await.unwrap();
    assert_eq!(hello.kernel_release, kernel);
    // Ending the session ends the agent with success; its unit then powers the VM off.
    conn.send(HostMessage::Shutdown).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(120), qemu.wait())
        .await
        .unwrap_or_else(|_| panic!("the VM did not power off after the session; console:\n{}", console_tail(&console)))
        .unwrap();
    assert!(status.success(), "{status}");
    let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap()).into_owned();
    assert!(text.contains("Debian GNU/Linux 12") || text.contains("systemd"), "{}", console_tail(&console));
}
