//! image/virt-customize.sh: the recipe that embeds the agent into an existing image.
//! libguestfs (a whole appliance VM) is not installed in CI, so this checks the exact
//! command the recipe runs (`--dry-run`) against the files the template build installs,
//! and the error a machine without virt-customize gets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::process::Command;

use agentlab_tests::{describe, workspace_root};

fn recipe(args: &[&str]) -> std::process::Output {
    Command::new(workspace_root().join("image/virt-customize.sh")).args(args).output().unwrap()
}

#[test]
fn the_recipe_installs_what_the_template_build_installs() {
    let root = workspace_root();
    let agent = tempfile::NamedTempFile::new().unwrap();
    let agent_path = agent.path().to_str().unwrap();
    let out = recipe(&["--agent", agent_path, "--image", "base.qcow2", "--dry-run"]);
    assert!(out.status.success(), "{}", describe(&out));
    let command = String::from_utf8(out.stdout).unwrap();
    assert!(command.starts_with("virt-customize -a base.qcow2 "), "{command}");
    let template_build = std::fs::read_to_string(root.join("image/build-template.sh")).unwrap();
    let template = root.join("image/template");
    let uploads = [
        (agent_path.to_owned(), "/usr/bin/agentlab-agent"),
        (template.join("agentlab-agent.service").display().to_string(), "/etc/systemd/system/agentlab-agent.service"),
        (template.join("modules-load-agentlab.conf").display().to_string(), "/etc/modules-load.d/agentlab.conf"),
        (
            template.join("80-agentlab-dhcp.network").display().to_string(),
            "/etc/systemd/network/80-agentlab-dhcp.network",
        ),
    ];
    for (source, dest) in &uploads {
        assert!(command.contains(&format!("--upload {source}:{dest} ")), "{source} -> {dest}\n{command}");
        assert!(std::path::Path::new(source).is_file(), "{source}");
        assert!(template_build.contains(&format!("\"$TREE{dest}\"")), "the template build does not install {dest}");
    }
    for expected in [
        "--chmod 0755:/usr/bin/agentlab-agent ",
        "--run-command getent\\ passwd\\ agent\\ \\>/dev/null\\ \\|\\|\\ useradd\\ --user-group\\ --create-home\\ --shell\\ /bin/bash\\ agent ",
        "--run-command install\\ -d\\ -m\\ 0755\\ -o\\ agent\\ -g\\ agent\\ /workspace ",
        "--run-command systemctl\\ enable\\ agentlab-agent.service ",
        "--truncate /etc/machine-id ",
    ] {
        assert!(command.contains(expected), "{expected}\n{command}");
    }
}

#[test]
fn bad_input_and_a_missing_virt_customize_are_explained() {
    let out = recipe(&["--agent", "/nonexistent/agentlab-agent", "--image", "x.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "virt-customize.sh: error: agent binary not found: /nonexistent/agentlab-agent (make agent builds it)\n"
    );
    let agent = tempfile::NamedTempFile::new().unwrap();
    let out = recipe(&["--agent", agent.path().to_str().unwrap(), "--image", "/nonexistent/x.qcow2"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "virt-customize.sh: error: image not found: /nonexistent/x.qcow2\n"
    );
    if Command::new("sh").args(["-c", "command -v virt-customize"]).output().unwrap().status.success() {
        return; // This machine has libguestfs; the message below is for those without.
    }
    let image = tempfile::NamedTempFile::new().unwrap();
    let out = recipe(&["--agent", agent.path().to_str().unwrap(), "--image", image.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "virt-customize.sh: error: virt-customize not found: apt-get install libguestfs-tools\n"
    );
}
