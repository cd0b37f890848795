//! `agentlab host setup`: the real CLI against a temporary root (`--root`), so the
//! files it writes and its idempotence are checked without touching this machine; the
//! installed nftables and dnsmasq files are checked by the real `nft` and `dnsmasq`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use agentlab_tests::netns::Netns;
use agentlab_tests::{bin, describe, workspace_root};

const FILES: [&str; 8] = [
    "/etc/network/interfaces.d/agentlab-vmbr1",
    "/etc/sysctl.d/80-agentlab.conf",
    "/etc/agentlab/agentlab.nft",
    "/etc/systemd/system/agentlab-nftables.service",
    "/etc/agentlab/dnsmasq.conf",
    "/etc/systemd/system/agentlab-dnsmasq.service",
    "/etc/modules-load.d/agentlab.conf",
    "/etc/systemd/system/agentlabd.service",
];

fn setup(args: &[&str]) -> Output {
    Command::new(bin("agentlab")).args(["host", "setup"]).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path.trim_start_matches('/'))).unwrap()
}

fn repo(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap()
}

fn files_under(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(format!("/{}", entry.path().strip_prefix(root).unwrap().display()));
            }
        }
    }
    found.sort();
    found
}

#[test]
fn without_apply_every_step_says_what_it_would_do_and_nothing_changes() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    let out = setup(&["--root", root_arg]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out);
    let headers: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(headers.len(), 6, "{stdout}");
    assert!(headers[0].starts_with("[1/6] sandbox bridge vmbr1 (10.77.0.1/16, no physical port): would change"));
    assert!(headers[1].starts_with("[2/6] IPv4 forwarding"));
    assert!(headers[2].starts_with("[3/6] nftables table inet agentlab: NAT from 10.77.0.0/16 to the uplink; blocks 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16, 100.64.0.0/10, fc00::/7 and fe80::/10"));
    assert!(
        headers[3].starts_with("[4/6] DHCP and DNS for the sandboxes: dnsmasq on vmbr1, pool 10.77.0.10-10.77.255.254")
    );
    assert!(headers[4].starts_with("[5/6] vhost_vsock loaded now and at every boot"));
    assert!(headers[5].starts_with("[6/6] agentlabd systemd unit"));
    assert!(headers.iter().all(|h| h.ends_with(": would change")), "{stdout}");
    for file in FILES {
        assert!(stdout.contains(&format!("    file {file}: would create\n")), "{file}\n{stdout}");
    }
    assert!(stdout.ends_with("agentlab host setup: 6 of 6 steps would change something; run again with --apply\n"));
    assert_eq!(files_under(root.path()), Vec::<String>::new(), "a plan must not write anything");
}

#[test]
fn apply_writes_the_repository_files_and_a_second_apply_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    let first = setup(&["--apply", "--root", root_arg]);
    assert!(first.status.success(), "{}", describe(&first));
    let mut expected: Vec<String> = FILES.iter().map(|f| (*f).to_owned()).collect();
    expected.sort();
    assert_eq!(files_under(root.path()), expected);
    for file in FILES {
        assert!(text(&first).contains(&format!("    file {file}: created\n")), "{file}");
        let mode = std::fs::metadata(root.path().join(file.trim_start_matches('/'))).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "{file}");
    }
    // The units are the repository's files, byte for byte; the ruleset is the repository's
    // file after this node's two defines.
    for (installed, source) in [
        ("/etc/systemd/system/agentlabd.service", "host/systemd/agentlabd.service"),
        ("/etc/systemd/system/agentlab-nftables.service", "host/systemd/agentlab-nftables.service"),
        ("/etc/systemd/system/agentlab-dnsmasq.service", "host/systemd/agentlab-dnsmasq.service"),
        ("/etc/modules-load.d/agentlab.conf", "host/modules-load/agentlab.conf"),
        ("/etc/sysctl.d/80-agentlab.conf", "host/sysctl/80-agentlab.conf"),
    ] {
        assert_eq!(read(root.path(), installed), repo(source), "{installed}");
    }
    let nft = read(root.path(), "/etc/agentlab/agentlab.nft");
    assert!(nft.contains("define sandbox_if = \"vmbr1\"\ndefine sandbox_net4 = 10.77.0.0/16\n"), "{nft}");
    assert!(nft.ends_with(&repo("host/nftables/agentlab.nft")));
    let dnsmasq = read(root.path(), "/etc/agentlab/dnsmasq.conf");
    assert!(dnsmasq.contains("\ninterface=vmbr1\n"), "{dnsmasq}");
    assert!(dnsmasq.contains("\ndhcp-range=10.77.0.10,10.77.255.254,255.255.0.0,1h\n"), "{dnsmasq}");
    assert!(dnsmasq.contains("\ndhcp-option=option:router,10.77.0.1\n"), "{dnsmasq}");
    let bridge = read(root.path(), "/etc/network/interfaces.d/agentlab-vmbr1");
    assert!(
        bridge.contains("auto vmbr1\niface vmbr1 inet static\n\taddress 10.77.0.1/16\n\tbridge-ports none\n"),
        "{bridge}"
    );

    let second = setup(&["--apply", "--root", root_arg]);
    assert!(second.status.success(), "{}", describe(&second));
    let stdout = text(&second);
    for file in FILES {
        assert!(stdout.contains(&format!("    file {file}: up to date\n")), "{file}\n{stdout}");
    }
    assert_eq!(stdout.lines().filter(|l| l.ends_with(": already done")).count(), 6, "{stdout}");
    assert!(stdout.ends_with("agentlab host setup: nothing to do\n"), "{stdout}");
    assert!(!stdout.contains("created") && !stdout.contains("updated"), "{stdout}");

    // A file changed by hand (or with the wrong mode) is put back; the others are left alone.
    let conf = root.path().join("etc/agentlab/dnsmasq.conf");
    std::fs::write(&conf, "interface=eth0\n").unwrap();
    std::fs::set_permissions(
        root.path().join("etc/modules-load.d/agentlab.conf"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let third = text(&setup(&["--apply", "--root", root_arg]));
    assert!(third.contains("    file /etc/agentlab/dnsmasq.conf: updated\n"), "{third}");
    assert!(third.contains("    file /etc/modules-load.d/agentlab.conf: updated\n"), "{third}");
    assert_eq!(third.matches(": updated\n").count(), 2, "{third}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), dnsmasq);
}

#[test]
fn the_installed_ruleset_and_dnsmasq_config_pass_the_real_tools_checks() {
    let root = tempfile::tempdir().unwrap();
    let out =
        setup(&["--apply", "--root", root.path().to_str().unwrap(), "--bridge", "sbx0", "--subnet", "10.88.0.0/24"]);
    assert!(out.status.success(), "{}", describe(&out));
    let nft = root.path().join("etc/agentlab/agentlab.nft");
    // `nft -c` needs a network namespace to check against: a fresh, empty one of our own.
    let ns = Netns::create(format!("agentlab-t{}-hostsetup", std::process::id()));
    ns.exec("nft", &["-c", "-f", nft.to_str().unwrap()]);
    let conf = root.path().join("etc/agentlab/dnsmasq.conf");
    let check = Command::new("dnsmasq").arg("--test").arg(format!("--conf-file={}", conf.display())).output().unwrap();
    assert!(check.status.success(), "{}", describe(&check));
    assert!(String::from_utf8_lossy(&check.stderr).contains("syntax check OK"), "{}", describe(&check));
    let dnsmasq = std::fs::read_to_string(conf).unwrap();
    assert!(
        dnsmasq.contains("\ninterface=sbx0\n")
            && dnsmasq.contains("dhcp-range=10.88.0.10,10.88.0.254,255.255.255.0,1h")
    );
}

#[test]
fn the_plan_for_this_machine_reads_its_state_and_changes_nothing() {
    // Read-only against the real /: checks run, nothing is written or started.
    let before = state_of(&FILES);
    let out = setup(&[]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out);
    let loaded = Path::new("/sys/module/vhost_vsock").exists();
    let expected = if loaded {
        "not needed (/sys/module/vhost_vsock exists)"
    } else {
        "would run (/sys/module/vhost_vsock does not exist)"
    };
    assert!(stdout.contains(&format!("    run  modprobe vhost_vsock: {expected}\n")), "{stdout}");
    assert!(!Path::new("/etc/agentlab/agentlab.nft").exists() || stdout.contains("agentlab.nft: up to date"));
    assert_eq!(state_of(&FILES), before, "a plan without --apply writes nothing");
}

/// Each path's modification time, or `None` where it does not exist.
fn state_of(paths: &[&str]) -> Vec<Option<std::time::SystemTime>> {
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

#[test]
fn bad_values_are_refused_with_the_fix() {
    let out = setup(&["--bridge", "vmbr1\"; flush ruleset; \""]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a usable interface name: use 1 to 15 letters, digits")
    );
    let out = setup(&["--subnet", "10.77.1.0/16"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "agentlab: --subnet 10.77.1.0/16 has host bits set: did you mean 10.77.0.0/16?\n"
    );
}

#[test]
fn the_packages_unit_is_used_instead_of_a_copy_in_etc() {
    let root = tempfile::tempdir().unwrap();
    let packaged = root.path().join("lib/systemd/system/agentlabd.service");
    std::fs::create_dir_all(packaged.parent().unwrap()).unwrap();
    std::fs::write(&packaged, repo("host/systemd/agentlabd.service")).unwrap();
    let out = setup(&["--apply", "--root", root.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out).contains(
            "    file /etc/systemd/system/agentlabd.service: not needed (/lib/systemd/system/agentlabd.service is installed by the package)\n"
        ),
        "{}",
        text(&out)
    );
    assert!(!root.path().join("etc/systemd/system/agentlabd.service").exists());
    let mut expected: Vec<String> =
        FILES.iter().filter(|f| !f.ends_with("/agentlabd.service")).map(|f| (*f).to_owned()).collect();
    expected.push("/lib/systemd/system/agentlabd.service".to_owned());
    expected.sort();
    assert_eq!(files_under(root.path()), expected, "the other seven files and the package's unit");
}
