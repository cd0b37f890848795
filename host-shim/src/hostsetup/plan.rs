//! The steps of preparing a node: which files each writes (from the repository's
//! `host/` directory, with this node's values substituted) and which commands make the
//! running system match them.

use super::params::SandboxNet;

const NFT_RULESET: &str = include_str!("../../../host/nftables/agentlab.nft");
const NFT_DEFINES: &str = include_str!("../../../host/nftables/agentlab-defines.nft");
const NFT_UNIT: &str = include_str!("../../../host/systemd/agentlab-nftables.service");
const AGENTLABD_UNIT: &str = include_str!("../../../host/systemd/agentlabd.service");
const DNSMASQ_UNIT: &str = include_str!("../../../host/systemd/agentlab-dnsmasq.service");
const DNSMASQ_CONF: &str = include_str!("../../../host/dnsmasq/agentlab.conf");
const BRIDGE_STANZA: &str = include_str!("../../../host/network/agentlab-bridge");
const SYSCTL_CONF: &str = include_str!("../../../host/sysctl/80-agentlab.conf");
const MODULES_LOAD: &str = include_str!("../../../host/modules-load/agentlab.conf");

/// The line that makes ifupdown2 read the bridge's file.
const SOURCE_LINE: &str = "source /etc/network/interfaces.d/*";

/// Where the agentlab Debian package installs agentlabd's unit.
pub const PACKAGED_UNIT: &str = "/lib/systemd/system/agentlabd.service";

/// Where the node's nftables policy is installed (the unit loads it from here).
pub const NFT_PATH: &str = "/etc/agentlab/agentlab.nft";

/// A file a step owns, with its exact content.
#[derive(Clone, Debug)]
pub struct FileSpec {
    /// Absolute path on the node.
    pub path: String,
    pub content: String,
    pub mode: u32,
    /// Not written when this file exists: the agentlab Debian package ships the same
    /// unit under /lib, and a copy in /etc would shadow the package's future versions.
    pub unless_present: Option<&'static str>,
}

/// A fact about the running node that tells whether a command is still needed.
#[derive(Clone, Debug)]
pub enum LiveCheck {
    PathExists(String),
    /// The file's content, trimmed, equals the value.
    FileIs(String, &'static str),
    /// The file has this exact line.
    FileHasLine(String, &'static str),
    /// The command exits 0.
    Succeeds(Vec<String>),
}

/// When a command runs.
#[derive(Clone, Debug)]
pub enum When {
    /// Only when a file of its step was created or changed.
    FilesChanged,
    /// Only when the check fails.
    Unless(LiveCheck),
    /// When a file of its step changed, or the check fails.
    FilesChangedOrUnless(LiveCheck),
}

#[derive(Clone, Debug)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub when: When,
    /// What to do if the program is missing.
    pub fix: &'static str,
}

#[derive(Clone, Debug)]
pub struct Step {
    pub title: String,
    pub files: Vec<FileSpec>,
    pub commands: Vec<CommandSpec>,
}

fn render(template: &str, net: &SandboxNet) -> String {
    net.substitutions().iter().fold(template.to_owned(), |text, (key, value)| text.replace(key, value))
}

fn file(path: impl Into<String>, content: String) -> FileSpec {
    FileSpec { path: path.into(), content, mode: 0o644, unless_present: None }
}

fn cmd(argv: &[&str], when: When, fix: &'static str) -> CommandSpec {
    CommandSpec { argv: argv.iter().map(|s| (*s).to_owned()).collect(), when, fix }
}

fn succeeds(argv: &[&str]) -> LiveCheck {
    LiveCheck::Succeeds(argv.iter().map(|s| (*s).to_owned()).collect())
}

const SYSTEMD_FIX: &str = "this must be a systemd host (Proxmox VE is)";

fn daemon_reload() -> CommandSpec {
    cmd(&["systemctl", "daemon-reload"], When::FilesChanged, SYSTEMD_FIX)
}

fn enable(unit: &str) -> CommandSpec {
    cmd(
        &["systemctl", "enable", unit],
        When::Unless(succeeds(&["systemctl", "is-enabled", "--quiet", unit])),
        SYSTEMD_FIX,
    )
}

/// Every step, in the order they must run.
pub fn plan(net: &SandboxNet) -> Vec<Step> {
    let bridge = &net.bridge;
    let (pool_start, pool_end) = net.dhcp_range();
    vec![
        Step {
            title: format!("sandbox bridge {bridge} ({}/{}, no physical port)", net.gateway(), net.prefix),
            files: vec![file(format!("/etc/network/interfaces.d/agentlab-{bridge}"), render(BRIDGE_STANZA, net))],
            commands: vec![
                // ifupdown2 reads interfaces.d only through this line; Proxmox VE's installer
                // writes it, and its network editor keeps it.
                cmd(
                    &["sh", "-c", &format!("echo '{SOURCE_LINE}' >>/etc/network/interfaces")],
                    When::Unless(LiveCheck::FileHasLine("/etc/network/interfaces".into(), SOURCE_LINE)),
                    "add the line to /etc/network/interfaces by hand",
                ),
                cmd(
                    &["ifup", bridge],
                    When::FilesChangedOrUnless(LiveCheck::PathExists(format!("/sys/class/net/{bridge}"))),
                    "install ifupdown2 (Proxmox VE's default), or bring the bridge up by hand",
                ),
            ],
        },
        Step {
            title: "IPv4 forwarding (the node routes its sandboxes' traffic)".into(),
            files: vec![file("/etc/sysctl.d/80-agentlab.conf", SYSCTL_CONF.to_owned())],
            commands: vec![cmd(
                &["sysctl", "-w", "net.ipv4.ip_forward=1"],
                When::Unless(LiveCheck::FileIs("/proc/sys/net/ipv4/ip_forward".into(), "1")),
                "install procps",
            )],
        },
        Step {
            title: format!(
                "nftables table inet agentlab: NAT from {} to the uplink; blocks 10.0.0.0/8, 172.16.0.0/12, \
                 192.168.0.0/16, 169.254.0.0/16, 100.64.0.0/10, fc00::/7 and fe80::/10; no connections into \
                 sandboxes; only DHCP and DNS to the node",
                net.subnet()
            ),
            files: vec![
                file(NFT_PATH, format!("{}\n{NFT_RULESET}", render(NFT_DEFINES, net))),
                file("/etc/systemd/system/agentlab-nftables.service", NFT_UNIT.to_owned()),
            ],
            commands: vec![
                daemon_reload(),
                enable("agentlab-nftables.service"),
                cmd(
                    &["nft", "-f", NFT_PATH],
                    When::FilesChangedOrUnless(succeeds(&["nft", "list", "table", "inet", "agentlab"])),
                    "install nftables (apt-get install nftables)",
                ),
            ],
        },
        Step {
            title: format!("DHCP and DNS for the sandboxes: dnsmasq on {bridge}, pool {pool_start}-{pool_end}"),
            files: vec![
                file("/etc/agentlab/dnsmasq.conf", render(DNSMASQ_CONF, net)),
                file("/etc/systemd/system/agentlab-dnsmasq.service", DNSMASQ_UNIT.to_owned()),
            ],
            commands: vec![
                cmd(
                    &["apt-get", "install", "-y", "--no-install-recommends", "dnsmasq-base"],
                    When::Unless(LiveCheck::PathExists("/usr/sbin/dnsmasq".into())),
                    "install dnsmasq-base by hand",
                ),
                daemon_reload(),
                enable("agentlab-dnsmasq.service"),
                cmd(
                    &["systemctl", "restart", "agentlab-dnsmasq.service"],
                    When::FilesChangedOrUnless(succeeds(&[
                        "systemctl",
                        "is-active",
                        "--quiet",
                        "agentlab-dnsmasq.service",
                    ])),
                    SYSTEMD_FIX,
                ),
            ],
        },
        Step {
            title: "vhost_vsock loaded now and at every boot (the agent channel)".into(),
            files: vec![file("/etc/modules-load.d/agentlab.conf", MODULES_LOAD.to_owned())],
            commands: vec![cmd(
                &["modprobe", "vhost_vsock"],
                When::Unless(LiveCheck::PathExists("/sys/module/vhost_vsock".into())),
                "install kmod; the node's kernel needs CONFIG_VHOST_VSOCK (Proxmox VE's has it)",
            )],
        },
        Step {
            title: "agentlabd systemd unit, enabled".into(),
            files: vec![FileSpec {
                unless_present: Some(PACKAGED_UNIT),
                ..file("/etc/systemd/system/agentlabd.service", AGENTLABD_UNIT.to_owned())
            }],
            commands: vec![daemon_reload(), enable("agentlabd.service")],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_substituted() {
        let net = SandboxNet::new("vmbr7", "10.88.0.0/24").unwrap();
        for step in plan(&net) {
            for f in &step.files {
                // Placeholders are @UPPER_CASE@; nftables' own `@set` references stay.
                let segments: Vec<&str> = f.content.split('@').collect();
                let inner = &segments[1..segments.len().saturating_sub(1).max(1)];
                let placeholder =
                    inner.iter().find(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
                assert_eq!(placeholder, None, "{} keeps a placeholder:\n{}", f.path, f.content);
            }
        }
    }

    #[test]
    fn the_installed_ruleset_is_the_repository_file_after_this_nodes_values() {
        let net = SandboxNet::new("vmbr7", "10.88.0.0/24").unwrap();
        let steps = plan(&net);
        let nft = steps.iter().flat_map(|s| &s.files).find(|f| f.path == NFT_PATH).unwrap();
        let (defines, ruleset) = nft.content.split_once("\n#!/usr/sbin/nft -f\n").unwrap();
        assert!(defines.ends_with("define sandbox_if = \"vmbr7\"\ndefine sandbox_net4 = 10.88.0.0/24\n"), "{defines}");
        assert_eq!(format!("#!/usr/sbin/nft -f\n{ruleset}"), NFT_RULESET);
    }

    #[test]
    fn the_agentlabd_unit_keeps_qm_ipc_working() {
        let directives: Vec<&str> = AGENTLABD_UNIT.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
        for forbidden in ["NoNewPrivileges", "PrivateTmp"] {
            assert!(!directives.iter().any(|l| l.contains(forbidden)), "{forbidden} breaks qm/pvesh IPC");
            assert!(AGENTLABD_UNIT.contains(forbidden), "the unit's comment must say why {forbidden} is absent");
        }
    }
}
