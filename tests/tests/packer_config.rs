//! packer/: Debian's packer (1.6.6) has the Proxmox builders built in but predates API
//! tokens (`token`) and plugins (`required_plugins`). So CI checks the formatting and
//! the syntax of the real config, then fully validates it with `token` swapped for
//! `password` (the only argument 1.6.6 lacks), which checks every other argument and
//! that the file provisioners' sources exist. A second test checks that the variables
//! and paths agree with what the build produces and what the template build installs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::Path;
use std::process::{Command, Output};

use agentlab_tests::{describe, workspace_root};

fn packer(args: &[&str], dir: &Path) -> Output {
    Command::new("packer")
        .args(args)
        .current_dir(dir)
        .env("CHECKPOINT_DISABLE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run packer (apt-get install packer; scripts/install-deps.sh does): {e}"))
}

fn config() -> String {
    std::fs::read_to_string(workspace_root().join("packer/agentlab.pkr.hcl")).unwrap()
}

const VARS: [&str; 10] = [
    "-var",
    "proxmox_url=https://pve.invalid:8006/api2/json",
    "-var",
    "proxmox_node=pve1",
    "-var",
    "proxmox_token_id=packer@pve!agentlab",
    "-var",
    "proxmox_token_secret=not-a-secret",
    "-var",
    "base_template=debian-12-cloud",
];

/// A copy of the config for Debian's packer (`token` → `password`) in a directory laid
/// out like the repository (image/ and target/ are links), so `path.root`-relative
/// provisioner sources resolve as they do in a real build.
fn copy_for_debian_packer(edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let root = workspace_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("packer")).unwrap();
    for link in ["image", "target"] {
        std::os::unix::fs::symlink(root.join(link), dir.path().join(link)).unwrap();
    }
    std::fs::copy(root.join("packer/install-agent.sh"), dir.path().join("packer/install-agent.sh")).unwrap();
    let text = config();
    assert_eq!(text.matches("\n  token                    = var.proxmox_token_secret\n").count(), 1);
    let text = text.replace("\n  token                    =", "\n  password                 =");
    std::fs::write(dir.path().join("packer/agentlab.pkr.hcl"), edit(text)).unwrap();
    dir
}

#[test]
fn debians_packer_validates_the_proxmox_clone_config() {
    let root = workspace_root();
    let fmt = packer(&["fmt", "-check", "-diff", "packer"], &root);
    assert!(fmt.status.success(), "packer fmt: {}", describe(&fmt));
    let syntax = packer(&["validate", "-syntax-only", "packer/agentlab.pkr.hcl"], &root);
    assert!(syntax.status.success(), "{}", describe(&syntax));

    let agent = root.join("target/x86_64-unknown-linux-musl/release/agentlab-agent");
    assert!(agent.is_file(), "{} is missing: run `make agent` (make test does)", agent.display());
    let copy = copy_for_debian_packer(|t| t);
    // packer parses the SSH key: a throwaway one.
    let key = copy.path().join("id_ed25519");
    let keygen = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).output().unwrap();
    assert!(keygen.status.success(), "{}", describe(&keygen));
    let key_var = format!("ssh_private_key_file={}", key.display());
    let mut args = vec!["validate"];
    args.extend(VARS);
    args.extend(["-var", key_var.as_str(), "packer/agentlab.pkr.hcl"]);
    let full = packer(&args, copy.path());
    assert!(full.status.success(), "{}", describe(&full));

    // Control: the same validation catches a provisioner source that does not exist.
    let broken = copy_for_debian_packer(|t| t.replace("agentlab-agent.service\"", "agentlab-agent.servic\""));
    let out = packer(&args, broken.path());
    assert!(!out.status.success(), "a missing provisioner source must fail validation: {}", describe(&out));
    assert!(
        describe(&out).contains("Bad source 'packer/../image/template/agentlab-agent.servic'"),
        "{}",
        describe(&out)
    );
}

/// `variable "NAME"` blocks of the config.
fn variables(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("variable \""))
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect()
}

#[test]
fn the_configs_variables_and_paths_match_the_build() {
    let root = workspace_root();
    let text = config();
    let vars = variables(&text);
    for needed in ["proxmox_url", "proxmox_node", "proxmox_token_id", "proxmox_token_secret", "storage_pool", "bridge"]
    {
        assert!(vars.iter().any(|v| v == needed), "variable {needed} missing: {vars:?}");
        assert!(text.contains(&format!("var.{needed}")), "variable {needed} is declared but unused");
    }
    assert!(text.contains("  qemu_agent = true\n"));
    assert!(text.contains("source \"proxmox-clone\" \"agentlab\""));
    // The secret is marked sensitive so packer never prints it.
    let secret = text.split("variable \"proxmox_token_secret\"").nth(1).unwrap().split('}').next().unwrap();
    assert!(secret.contains("sensitive   = true"), "{secret}");

    // The agent binary packer uploads is the one `make agent` builds.
    let makefile = std::fs::read_to_string(root.join("Makefile")).unwrap();
    assert!(
        makefile
            .contains("MUSL      := x86_64-unknown-linux-musl\nAGENT     := target/$(MUSL)/release/agentlab-agent\n")
    );
    assert!(text.contains("default     = \"target/x86_64-unknown-linux-musl/release/agentlab-agent\""));

    // Every upload's source exists in the repository, and install-agent.sh installs each
    // uploaded file where image/build-template.sh puts it.
    let install = std::fs::read_to_string(root.join("packer/install-agent.sh")).unwrap();
    let template_build = std::fs::read_to_string(root.join("image/build-template.sh")).unwrap();
    let uploads = [
        (
            "image/template/agentlab-agent.service",
            "/tmp/agentlab-agent.service",
            "/etc/systemd/system/agentlab-agent.service",
        ),
        (
            "image/template/modules-load-agentlab.conf",
            "/tmp/agentlab-modules.conf",
            "/etc/modules-load.d/agentlab.conf",
        ),
    ];
    for (source, uploaded, installed) in uploads {
        assert!(root.join(source).is_file(), "{source}");
        assert!(
            text.contains(&format!("source      = \"${{path.root}}/../{source}\"\n    destination = \"{uploaded}\"")),
            "{source} -> {uploaded}"
        );
        assert!(install.contains(&format!(" {uploaded} {installed}\n")), "install-agent.sh: {uploaded} -> {installed}");
        assert!(template_build.contains(&format!("\"$TREE{installed}\"")), "build-template.sh installs {installed}");
    }
    assert!(
        text.contains(
            "source      = \"${path.root}/../${var.agent_binary}\"\n    destination = \"/tmp/agentlab-agent\""
        )
    );
    assert!(install.contains("install -m 0755 /tmp/agentlab-agent /usr/bin/agentlab-agent\n"));
    assert!(template_build.contains("\"$TREE/usr/bin/agentlab-agent\""));
    assert!(text.contains("script          = \"${path.root}/install-agent.sh\""));
}
