//! End to end with the Debian 12 template (image/build-template.sh): the real CLI and
//! agentlabd boot the template's disk under QEMU (its own kernel and initrd, the disk as
//! root with a throwaway overlay), systemd starts agentlab-agent from its unit, and a job
//! runs through the same path as on Proxmox. Slow under TCG (a full systemd boot), so
//! there is one test that checks everything it can.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::PathBuf;

use agentlab_tests::{Daemon, describe, host_kernel, workspace_root};
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
