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
