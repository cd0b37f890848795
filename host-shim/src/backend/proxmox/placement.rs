//! Which node gets a new sandbox: the configured node with the most free memory and
//! CPU in `/cluster/resources` that has a template for the profile. Memory a placement
//! has promised but Proxmox does not report yet counts as used.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// One node as configured: its name and which local template stands in for each
/// profile's `template_vmid` (linked clones come from a template on the same node).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    /// profile template_vmid -> this node's template VMID. A profile template missing
    /// here is used as is.
    #[serde(default)]
    pub templates: BTreeMap<u32, u32>,
}

impl NodeConfig {
    pub fn template_for(&self, profile_template: u32) -> u32 {
        self.templates.get(&profile_template).copied().unwrap_or(profile_template)
    }
}

/// A node's load as Proxmox reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeLoad {
    pub name: String,
    pub online: bool,
    pub mem: u64,
    pub maxmem: u64,
    /// 0.0..=1.0 of the node's CPUs.
    pub cpu: f64,
}

/// The `type=node` entries of a `/cluster/resources` answer.
pub fn node_loads(resources: &Value) -> Vec<NodeLoad> {
    let Some(list) = resources.as_array() else { return Vec::new() };
    list.iter()
        .filter(|r| r.get("type").and_then(Value::as_str) == Some("node"))
        .filter_map(|r| {
            Some(NodeLoad {
                name: r.get("node").and_then(Value::as_str)?.to_owned(),
                online: r.get("status").and_then(Value::as_str) == Some("online"),
                mem: r.get("mem").and_then(Value::as_u64).unwrap_or(0),
                maxmem: r.get("maxmem").and_then(Value::as_u64).unwrap_or(0),
                cpu: r.get("cpu").and_then(Value::as_f64).unwrap_or(0.0),
            })
        })
        .collect()
}

/// Picks a node for a VM of `memory_mb`, or explains why none fits.
pub fn choose<'a>(
    nodes: &'a [NodeConfig],
    loads: &[NodeLoad],
    pending_mb: &HashMap<String, u64>,
    memory_mb: u32,
) -> Result<&'a NodeConfig, String> {
    let need = u64::from(memory_mb) * 1024 * 1024;
    let mut best: Option<(&NodeConfig, f64)> = None;
    let mut refused = Vec::new();
    for node in nodes {
        let Some(load) = loads.iter().find(|l| l.name == node.name) else {
            refused.push(format!("{}: not in /cluster/resources", node.name));
            continue;
        };
        if !load.online {
            refused.push(format!("{}: offline", node.name));
            continue;
        }
        let pending = pending_mb.get(&node.name).copied().unwrap_or(0) * 1024 * 1024;
        let free = load.maxmem.saturating_sub(load.mem).saturating_sub(pending);
        if free < need {
            refused.push(format!("{}: {} MiB free, {} MiB needed", node.name, free >> 20, memory_mb));
            continue;
        }
        // Free memory share and idle CPU share, weighted equally.
        let mem_share = free as f64 / load.maxmem.max(1) as f64;
        let cpu_share = 1.0 - load.cpu.clamp(0.0, 1.0);
        let score = mem_share + cpu_share;
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((node, score));
        }
    }
    best.map(|(n, _)| n).ok_or_else(|| format!("no node can take a {memory_mb} MiB sandbox ({})", refused.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, mem_gib: u64, maxmem_gib: u64, cpu: f64) -> NodeLoad {
        NodeLoad { name: name.into(), online: true, mem: mem_gib << 30, maxmem: maxmem_gib << 30, cpu }
    }

    fn nodes(names: &[&str]) -> Vec<NodeConfig> {
        names.iter().map(|n| NodeConfig { name: (*n).into(), templates: BTreeMap::new() }).collect()
    }

    #[test]
    fn the_freest_node_wins_and_pending_memory_counts() {
        let cfg = nodes(&["a", "b", "c"]);
        let loads = vec![load("a", 60, 64, 0.1), load("b", 10, 64, 0.1), load("c", 20, 64, 0.1)];
        assert_eq!(choose(&cfg, &loads, &HashMap::new(), 4096).unwrap().name, "b");
        // b has 20 GiB promised that Proxmox does not show yet: c is freer now.
        let pending = HashMap::from([("b".to_owned(), 20 * 1024)]);
        assert_eq!(choose(&cfg, &loads, &pending, 4096).unwrap().name, "c");
    }

    #[test]
    fn full_offline_and_unknown_nodes_are_explained() {
        let cfg = nodes(&["a", "b", "gone"]);
        let mut b = load("b", 1, 64, 0.0);
        b.online = false;
        let loads = vec![load("a", 63, 64, 0.0), b];
        let err = choose(&cfg, &loads, &HashMap::new(), 4096).unwrap_err();
        assert_eq!(
            err,
            "no node can take a 4096 MiB sandbox (a: 1024 MiB free, 4096 MiB needed; b: offline; gone: not in /cluster/resources)"
        );
    }

    #[test]
    fn templates_map_per_node() {
        let n = NodeConfig { name: "a".into(), templates: BTreeMap::from([(9000, 9100)]) };
        assert_eq!(n.template_for(9000), 9100);
        assert_eq!(n.template_for(9001), 9001);
    }

    #[test]
    fn reads_cluster_resources() {
        let v = serde_json::json!([
            {"type": "node", "node": "pve1", "status": "online", "mem": 1, "maxmem": 2, "cpu": 0.25, "maxcpu": 8},
            {"type": "qemu", "node": "pve1", "vmid": 100},
        ]);
        let loads = node_loads(&v);
        assert_eq!(loads.len(), 1);
        assert_eq!((loads[0].mem, loads[0].maxmem, loads[0].cpu), (1, 2, 0.25));
    }
}
