//! Profiles through the real daemon and CLI: listing, showing, validating files
//! locally, choosing one at submit, and a daemon that refuses invalid profiles.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::process::Command;

use agentlab_tests::{Daemon, bin, describe, workspace_root};
use serde_json::Value;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn list_and_show_the_shipped_profiles() {
    let d = Daemon::start();
    let out = d.cli(&["--json", "profile", "list"]);
    assert!(out.status.success(), "{}", describe(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["interactive-dev", "yolo-ephemeral", "yolo-workspace"]);

    let out = d.cli(&["profile", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("interactive-dev") && l.contains(" best-effort ")), "{text}");

    let out = d.cli(&["profile", "show", "yolo-workspace"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("name: yolo-workspace\n"), "{text}");
    assert!(text.contains("  memory_mb: 8192\n"), "{text}");

    let out = d.cli(&["profile", "show", "nope"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        stderr(&out),
        "agentlab: no profile named `nope` (known: interactive-dev, yolo-ephemeral, yolo-workspace)\n"
    );
}

#[test]
fn submitting_with_an_unknown_profile_is_refused_with_a_suggestion_and_records_nothing() {
    let d = Daemon::start();
    let out = d.cli(&["job", "submit", "--profile", "yolo-ephemerl", "--cmd", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        stderr(&out),
        "agentlab: invalid: no profile named `yolo-ephemerl`; did you mean `yolo-ephemeral`? (known: interactive-dev, yolo-ephemeral, yolo-workspace)\n"
    );
    assert_eq!(String::from_utf8_lossy(&d.cli(&["--json", "job", "list"]).stdout).trim(), "[]");
}

#[test]
fn validate_checks_a_file_locally_without_a_daemon() {
    let shipped = workspace_root().join("profiles/defaults.yaml");
    let out = Command::new(bin("agentlab"))
        .args(["--socket", "/nonexistent.sock", "profile", "validate"])
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: 3 valid profile(s): yolo-ephemeral, yolo-workspace, interactive-dev\n", shipped.display())
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: x\ntemplate_vmid: 9000\nresources:\n  cores: 2\n  memory_mb: 2048\nnetwork:\n  mdoe: nat\n",
    )
    .unwrap();
    let out = Command::new(bin("agentlab")).args(["profile", "validate"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        stderr(&out),
        format!(
            "agentlab: {}, document 1, line 7: network.mdoe: unknown key (allowed: bridge, mode, allowlist); did you mean `mode`?\n",
            bad.display()
        )
    );
}

#[test]
fn the_daemon_refuses_to_start_with_an_invalid_profile_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(workspace_root().join("profiles/defaults.yaml"), dir.path().join("defaults.yaml")).unwrap();
    std::fs::write(
        dir.path().join("extra.yaml"),
        "name: extra\ntemplate_vmid: 9000\nresources: {cores: 999, memory_mb: 2048}\n",
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(bin("agentlabd"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("--profiles-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.ends_with(&format!(
            "agentlabd: cannot load the profiles: {}, document 1: resources.cores: 999 is out of range 1..=64\n",
            dir.path().join("extra.yaml").display()
        )),
        "{err}"
    );
    assert!(!state.path().join("agentlabd.sock").exists(), "nothing is served from a half-loaded configuration");
}

/// `agentlab doctor` checks each prerequisite and names the fix for each failure.
#[test]
fn doctor_names_each_missing_prerequisite_and_its_fix() {
    let empty = tempfile::tempdir().unwrap();
    let d = agentlab_tests::Daemon::start_with(&[
        "--image-dir",
        empty.path().to_str().unwrap(),
        "--qemu",
        "/nonexistent/qemu-system-x86_64",
    ]);
    let out = d.cli(&["--json", "doctor"]);
    assert_eq!(out.status.code(), Some(1), "{}", agentlab_tests::describe(&out));
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_name = |name: &str| checks.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    assert_eq!(by_name("socket")["status"], "ok");
    let qemu = by_name("qemu");
    assert_eq!(qemu["status"], "fail");
    assert_eq!(qemu["fix"], "install it (apt-get install qemu-system-x86) or pass agentlabd --qemu PATH");
    let image = by_name("image");
    assert_eq!(image["status"], "fail");
    assert_eq!(
        image["detail"],
        format!(
            "the guest image is not built: {}/vmlinux does not exist; build it with `make image` (image/build.sh), or point agentlabd --image-dir at a built image",
            empty.path().display()
        )
    );
    assert_eq!(by_name("vhost-device-vsock")["status"], "ok");
    assert_eq!(by_name("disk space")["status"], "ok");
    assert_eq!(by_name("vsock module")["status"], "ok");

    let text = d.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("FAIL  qemu                 /nonexistent/qemu-system-x86_64 not found"), "{text}");
    assert!(text.contains("fix: install it (apt-get install qemu-system-x86)"), "{text}");

    let missing = std::process::Command::new(agentlab_tests::bin("agentlab"))
        .args(["--socket", "/nonexistent/agentlabd.sock", "doctor"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stdout)
            .starts_with("FAIL  socket               /nonexistent/agentlabd.sock: No such file or directory")
    );
}

/// Under systemd (`Type=notify`) agentlabd says it is ready once its socket serves.
#[test]
fn agentlabd_notifies_systemd_when_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let d = agentlab_tests::Daemon::start_with_env(&[], &[("NOTIFY_SOCKET", notify.to_str().unwrap())]);
    let mut buf = [0u8; 1024];
    let n = listener.recv(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]), format!("READY=1\nSTATUS=serving on {}\n", d.socket.display()));
}
