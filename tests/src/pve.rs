//! Helpers for the Proxmox backend's tests: a stand-in and a backend configured for it.

use std::path::Path;

use agentlab_host::backend::proxmox::config::{ArgsVia, ChannelMode, ConfigFile, ProxmoxConfig};
use agentlab_host::backend::proxmox::placement::NodeConfig;
use agentlab_host::backend::proxmox::tls::TlsConfig;
use agentlab_pve_standin::{Options, StandIn};
use serde_json::Value;

/// Trust exactly the stand-in's certificate, by its fingerprint.
pub fn pinned_tls(standin: &StandIn) -> TlsConfig {
    TlsConfig { fingerprint: Some(standin.fingerprint.clone()), ..TlsConfig::default() }
}

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
        tls: pinned_tls(standin),
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

/// The same configuration as agentlabd's config.yaml: every field of `c`, so the
/// daemon runs with exactly the configuration the library tests use.
fn config_yaml(c: &ProxmoxConfig) -> String {
    let Value::Object(fields) = serde_json::to_value(c).unwrap() else { unreachable!("a struct serializes to a map") };
    let mut y = String::from("proxmox:\n");
    for (key, value) in &fields {
        y += &format!("  {key}: {}\n", flow_yaml(value));
    }
    y
}

/// `value` in YAML's flow style. JSON is YAML, except that a quoted key is a string:
/// keys are written plain, so `templates: {9000: 9100}` keeps its numeric keys.
fn flow_yaml(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let entries: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    assert!(k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "key {k:?} needs quoting");
                    format!("{k}: {}", flow_yaml(v))
                })
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(flow_yaml).collect::<Vec<_>>().join(", ")),
        scalar => scalar.to_string(),
    }
}

/// Writes `c` as agentlabd's config file at `path`, and checks that loading it gives
/// `c` back.
pub fn write_config_yaml(c: &ProxmoxConfig, path: &Path) {
    std::fs::write(path, config_yaml(c)).unwrap();
    let loaded = ConfigFile::load(path).unwrap().proxmox;
    assert_eq!(loaded.as_ref(), Some(c), "{} does not load as the configuration written", path.display());
}
