//! The `proxmox:` section of /etc/agentlab/config.yaml.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{ConnectionConfig, RetryPolicy};
use super::error::PveError;
use super::placement::NodeConfig;
use super::tls::TlsConfig;

/// How the root@pam-only `args` option (the vsock device) gets set. API tokens are
/// refused for `args` even when they belong to root (`root@pam!x` is not `root@pam`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ArgsVia {
    /// Run `qm set VMID --args …` on this node (agentlabd runs on the node as root).
    #[default]
    Qm,
    /// Log in as root@pam through /access/ticket and set it with that ticket.
    Ticket,
}

/// Where the sandbox's agent connection arrives.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChannelMode {
    /// AF_VSOCK on this node; the guest gets CID = its VMID.
    #[default]
    Vsock,
    /// Hybrid vsock over Unix sockets in `hybrid_dir` (test stand-ins only).
    Hybrid,
}

/// Serialize writes the same form Deserialize reads (tests write agentlabd's config
/// file from it).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxConfig {
    /// `https://HOST:8006`.
    pub api_url: String,
    /// `USER@REALM!TOKENID`.
    pub token_id: String,
    /// File holding the token's secret (mode 0600). Or AGENTLAB_PVE_TOKEN_SECRET.
    #[serde(default)]
    pub token_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Nodes sandboxes may be placed on, with their template mapping.
    pub nodes: Vec<NodeConfig>,
    /// VMIDs for sandboxes: `[first, last]`, outside any range people use by hand.
    pub vmid_range: [u32; 2],
    #[serde(default)]
    pub args_via: ArgsVia,
    /// `qm` mode: the command (default `qm`).
    #[serde(default = "default_qm")]
    pub qm_command: Vec<String>,
    /// `ticket` mode: file holding root@pam's password. Or AGENTLAB_PVE_ROOT_PASSWORD.
    #[serde(default)]
    pub root_password_file: Option<PathBuf>,
    #[serde(default)]
    pub channel: ChannelMode,
    /// `hybrid` channel: guest `vm-VMID/vsock.sock_52000` sockets appear here.
    #[serde(default)]
    pub hybrid_dir: Option<PathBuf>,
    #[serde(default = "default_task_timeout")]
    pub task_timeout_secs: u64,
    /// Graceful shutdown time before the VM is stopped hard.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
    /// How often the reconciler compares the database with the cluster.
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval_secs: u64,
    /// How long a VM tagged `agentlab` without a live sandbox is left alone.
    #[serde(default = "default_orphan_grace")]
    pub orphan_grace_secs: u64,
    #[serde(default = "default_attempts")]
    pub retry_attempts: u32,
    /// How often a running VM's status is checked while its job runs.
    #[serde(default = "default_status_poll")]
    pub status_poll_secs: u64,
}

fn default_connect_timeout() -> u64 {
    5
}
fn default_request_timeout() -> u64 {
    60
}
fn default_qm() -> Vec<String> {
    vec!["qm".into()]
}
fn default_task_timeout() -> u64 {
    600
}
fn default_shutdown_timeout() -> u64 {
    30
}
fn default_reconcile_interval() -> u64 {
    60
}
fn default_orphan_grace() -> u64 {
    900
}
fn default_attempts() -> u32 {
    RetryPolicy::default().max_attempts
}
fn default_status_poll() -> u64 {
    5
}

fn read_secret(file: Option<&Path>, env: &str, what: &str) -> Result<String, PveError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PveError::Config(format!("{what} file {}: {e}", path.display())))?;
        return Ok(text.trim().to_owned());
    }
    std::env::var(env).map_err(|_| PveError::Config(format!("no {what}: set its file in config.yaml or {env}")))
}

impl ProxmoxConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), PveError> {
        let [first, last] = self.vmid_range;
        if first < 100 || last < first || last > 999_999_999 {
            return Err(PveError::Config(format!(
                "vmid_range [{first}, {last}] must be within 100..=999999999, first <= last"
            )));
        }
        if self.nodes.is_empty() {
            return Err(PveError::Config("nodes is empty: list at least this node".into()));
        }
        if self.channel == ChannelMode::Hybrid && self.hybrid_dir.is_none() {
            return Err(PveError::Config("channel: hybrid needs hybrid_dir".into()));
        }
        if self.channel == ChannelMode::Vsock && self.nodes.len() > 1 {
            return Err(PveError::Config(format!(
                "nodes lists {} nodes, but vsock reaches only VMs on this node: run one agentlabd per node, each listing only its own node (docs/PROXMOX.md)",
                self.nodes.len()
            )));
        }
        if self.args_via == ArgsVia::Qm && self.qm_command.is_empty() {
            return Err(PveError::Config("qm_command is empty".into()));
        }
        Ok(())
    }

    pub fn connection(&self) -> Result<ConnectionConfig, PveError> {
        let token_secret = read_secret(self.token_secret_file.as_deref(), "AGENTLAB_PVE_TOKEN_SECRET", "token secret")?;
        Ok(ConnectionConfig {
            api_url: self.api_url.clone(),
            token_id: self.token_id.clone(),
            token_secret: super::client::Secret(token_secret),
            tls: self.tls.clone(),
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            retry: RetryPolicy { max_attempts: self.retry_attempts.max(1), ..RetryPolicy::default() },
        })
    }

    pub fn root_password(&self) -> Result<String, PveError> {
        read_secret(self.root_password_file.as_deref(), "AGENTLAB_PVE_ROOT_PASSWORD", "root@pam password")
    }
}

/// /etc/agentlab/config.yaml: the daemon-wide settings file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub proxmox: Option<ProxmoxConfig>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let de = serde_norway::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| format!("{}: {}: {}", path.display(), e.path(), e.inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, text).unwrap();
        ConfigFile::load(&path)
    }

    #[test]
    fn a_minimal_config_loads_with_defaults() {
        let c = parse(
            "proxmox:\n  api_url: https://pve1:8006\n  token_id: agentlab@pve!shim\n  tls: {fingerprint: 'AA'}\n  nodes: [{name: pve1}]\n  vmid_range: [100000, 100999]\n",
        )
        .unwrap();
        let p = c.proxmox.unwrap();
        p.validate().unwrap();
        assert_eq!((p.args_via, p.channel), (ArgsVia::Qm, ChannelMode::Vsock));
        assert_eq!(p.orphan_grace_secs, 900);
    }

    #[test]
    fn the_example_in_docs_proxmox_md_loads() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROXMOX.md")).unwrap();
        let start = doc.find("```yaml\n").unwrap() + "```yaml\n".len();
        let yaml = &doc[start..start + doc[start..].find("```").unwrap()];
        let p = parse(yaml).unwrap().proxmox.unwrap();
        p.validate().unwrap();
        assert_eq!(p.vmid_range, [100_000, 109_999]);
        assert_eq!(p.nodes[0].template_for(9000), 9000);
    }

    #[test]
    fn mistakes_are_named() {
        let err = parse("proxmox:\n  api_url: x\n  tokn_id: y\n").unwrap_err();
        assert!(err.contains("proxmox: unknown field `tokn_id`"), "{err}");
        let c = parse(
            "proxmox:\n  api_url: https://a\n  token_id: a@pve!b\n  nodes: [{name: a}, {name: b}]\n  vmid_range: [100, 200]\n",
        )
        .unwrap();
        let err = c.proxmox.unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("run one agentlabd per node"), "{err}");
    }
}
