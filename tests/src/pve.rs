//! Helpers for the Proxmox backend's tests: a stand-in and a backend configured for it.

use std::path::Path;

use agentlab_host::backend::proxmox::config::{ArgsVia, ChannelMode, ProxmoxConfig};
use agentlab_host::backend::proxmox::placement::NodeConfig;
use agentlab_host::backend::proxmox::tls::TlsConfig;
use agentlab_pve_standin::{Options, StandIn};

/// A backend configuration for `standin`, pinned to its certificate, setting `args`
/// with a root@pam ticket, hybrid channel under `dir`. Secrets go to files in `dir`.
pub fn config_for(standin: &StandIn, options: &Options, dir: &Path) -> ProxmoxConfig {
    let token_file = dir.join("token-secret");
    std::fs::write(&token_file, format!("{}\n", options.token_secret)).unwrap();
    let root_file = dir.join("root-password");
    std::fs::write(&root_file, &options.root_password).unwrap();
    let hybrid = dir.join("vsock");
    std::fs::create_dir_all(&hybrid).unwrap();
    ProxmoxConfig {
        api_url: standin.url(),
        token_id: options.token_id.clone(),
        token_secret_file: Some(token_file),
        tls: TlsConfig { fingerprint: Some(standin.fingerprint.clone()), ..TlsConfig::default() },
        connect_timeout_secs: 5,
        request_timeout_secs: 30,
        nodes: options
            .nodes
            .iter()
            .map(|n| NodeConfig {
                name: n.name.clone(),
                templates: options
                    .templates
                    .iter()
                    .filter(|(_, node)| *node == n.name)
                    .map(|(id, _)| (9000, *id))
                    .collect(),
            })
            .collect(),
        vmid_range: [100_000, 100_999],
        args_via: ArgsVia::Ticket,
        qm_command: vec!["qm".into()],
        root_password_file: Some(root_file),
        channel: ChannelMode::Hybrid,
        hybrid_dir: Some(hybrid),
        task_timeout_secs: 120,
        shutdown_timeout_secs: 10,
        reconcile_interval_secs: 1,
        orphan_grace_secs: 2,
        retry_attempts: 8,
        status_poll_secs: 2,
    }
}

/// The same configuration as agentlabd's config.yaml.
pub fn config_yaml(c: &ProxmoxConfig) -> String {
    let q = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let path = |p: &Option<std::path::PathBuf>| q(&p.as_ref().unwrap().display().to_string());
    let mut y = String::from("proxmox:\n");
    y += &format!("  api_url: {}\n  token_id: {}\n", q(&c.api_url), q(&c.token_id));
    y += &format!("  token_secret_file: {}\n", path(&c.token_secret_file));
    y += &format!("  tls:\n    fingerprint: {}\n", q(c.tls.fingerprint.as_ref().unwrap()));
    y += "  nodes:\n";
    for n in &c.nodes {
        y += &format!("    - name: {}\n      templates: {{", q(&n.name));
        y += &n.templates.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ");
        y += "}\n";
    }
    y += &format!("  vmid_range: [{}, {}]\n", c.vmid_range[0], c.vmid_range[1]);
    y += &format!("  args_via: ticket\n  root_password_file: {}\n", path(&c.root_password_file));
    y += &format!("  channel: hybrid\n  hybrid_dir: {}\n", path(&c.hybrid_dir));
    for (k, v) in [
        ("task_timeout_secs", c.task_timeout_secs),
        ("shutdown_timeout_secs", c.shutdown_timeout_secs),
        ("reconcile_interval_secs", c.reconcile_interval_secs),
        ("orphan_grace_secs", c.orphan_grace_secs),
        ("status_poll_secs", c.status_poll_secs),
    ] {
        y += &format!("  {k}: {v}\n");
    }
    y += &format!("  retry_attempts: {}\n", c.retry_attempts);
    y
}
