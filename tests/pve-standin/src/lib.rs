//! A stand-in for the Proxmox VE API, for tests only. It is faithful where a client
//! could go wrong: every request is validated against the official schema (PVE 9, or
//! PVE 8 by option), errors travel in the HTTP reason phrase and the JSON `message`,
//! changes run as asynchronous tasks with real UPIDs, VM configs have locks with the
//! real texts and timing, `args` is root@pam-only, and faults can be injected. Its
//! guests are real microVMs (boot mode, through host-shim's QEMU backend) or instant
//! fake agents (no-boot mode), both on hybrid vsock.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test infrastructure: a broken invariant should fail loudly.

pub mod api;
pub mod faults;
pub mod guest;
pub mod schema;
pub mod server;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentlab_host::backend::proxmox::upid::Upid;
pub use faults::FaultKind;

/// A cluster node and its load.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub maxmem: u64,
    pub mem: u64,
    pub maxcpu: u32,
    pub cpu: f64,
}

impl NodeSpec {
    pub fn new(name: &str) -> NodeSpec {
        NodeSpec { name: name.into(), maxmem: 64 << 30, mem: 8 << 30, maxcpu: 16, cpu: 0.1 }
    }
}

/// What a started VM runs.
#[derive(Clone, Debug)]
pub enum GuestMode {
    /// Nothing: start just marks the VM running.
    None,
    /// An instant fake agent dials `<hybrid_dir>/vm-<vmid>/vsock.sock_52000`.
    Fake { hybrid_dir: PathBuf },
    /// A real microVM from `image_dir` through host-shim's QEMU backend, its vsock on
    /// `<hybrid_dir>/vm-<vmid>/vsock.sock`.
    Boot { hybrid_dir: PathBuf, image_dir: PathBuf },
}

#[derive(Clone, Debug)]
pub struct Options {
    pub schema_version: u8,
    pub nodes: Vec<NodeSpec>,
    /// (vmid, node) of each template.
    pub templates: Vec<(u32, String)>,
    pub guest: GuestMode,
    /// How long a task runs before it finishes.
    pub task_duration: Duration,
    /// Real lock waits (10 s config, 1 s clone) times this.
    pub lock_wait_scale: f64,
    pub fault_rate: f64,
    pub fault_kinds: Vec<FaultKind>,
    pub fault_seed: u64,
    pub token_id: String,
    pub token_secret: String,
    pub root_password: String,
    /// Answer errors like libpve-http-server-perl before 5.2.0: the text only in the
    /// reason phrase, the body `{"data": null}`.
    pub legacy_errors: bool,
    /// Tasks end with `WARNINGS: 1` (and a warning in their log) instead of `OK`.
    pub task_warnings: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            schema_version: 9,
            nodes: vec![NodeSpec::new("pve1")],
            templates: vec![(9000, "pve1".into())],
            guest: GuestMode::None,
            task_duration: Duration::from_millis(20),
            lock_wait_scale: 1.0,
            fault_rate: 0.0,
            fault_kinds: FaultKind::ALL.to_vec(),
            fault_seed: 1,
            token_id: "agentlab@pve!shim".into(),
            token_secret: "5f8e2a8e-6d7c-4a53-9d0b-0c1d2e3f4a5b".into(),
            root_password: "stand-in-root-password".into(),
            legacy_errors: false,
            task_warnings: false,
        }
    }
}

/// One VM (or template).
#[derive(Clone, Debug)]
pub struct Vm {
    pub vmid: u32,
    pub node: String,
    pub config: BTreeMap<String, String>,
    pub template: bool,
    pub running: bool,
    pub created: Instant,
}

impl Vm {
    pub fn lock(&self) -> Option<&str> {
        self.config.get("lock").map(String::as_str)
    }
}

/// A task: its UPID (the answers about it are built from the parsed fields), how it
/// ended, and its log.
#[derive(Clone, Debug)]
pub struct Task {
    pub upid: Upid,
    pub exitstatus: Option<String>,
    pub log: Vec<String>,
}

/// A request as it arrived, for tests that check what the client sends.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub template: String,
    pub params: BTreeMap<String, String>,
}

/// Everything the stand-in knows.
pub struct Cluster {
    pub nodes: Vec<NodeSpec>,
    pub vms: BTreeMap<u32, Vm>,
    pub tasks: HashMap<String, Task>,
    /// VMIDs whose config file lock is held.
    pub file_locks: HashMap<u32, u64>,
    pub tickets: Vec<(String, String)>,
    pub guests: HashMap<u32, guest::GuestHandle>,
    pub requests: u64,
    pub recorded: Vec<Recorded>,
    pub validation_failures: Vec<String>,
    next_pid: u32,
    next_lock_owner: u64,
}

pub struct Shared {
    pub options: Options,
    pub schema: schema::Schema,
    pub cluster: Mutex<Cluster>,
    pub faults: Mutex<faults::Faults>,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, faults::Faults> {
        self.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub struct StandIn {
    pub addr: SocketAddr,
    /// SHA-256 of the server certificate, as `pvenode cert info` prints it.
    pub fingerprint: String,
    pub shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

/// A VM as a test sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmView {
    pub vmid: u32,
    pub node: String,
    pub name: Option<String>,
    pub tags: Option<String>,
    pub running: bool,
    pub template: bool,
}

impl StandIn {
    /// Starts a stand-in on 127.0.0.1 (an ephemeral port).
    pub async fn start(options: Options) -> Result<StandIn, String> {
        let schema = schema::Schema::load(options.schema_version)?;
        let mut vms = BTreeMap::new();
        for (vmid, node) in &options.templates {
            let mut config = BTreeMap::new();
            config.insert("name".to_owned(), format!("agentlab-template-{vmid}"));
            config.insert("cores".to_owned(), "1".to_owned());
            config.insert("memory".to_owned(), "512".to_owned());
            config.insert("scsi0".to_owned(), format!("local-lvm:base-{vmid}-disk-0,size=4G"));
            config.insert("template".to_owned(), "1".to_owned());
            vms.insert(
                *vmid,
                Vm { vmid: *vmid, node: node.clone(), config, template: true, running: false, created: Instant::now() },
            );
        }
        let cluster = Cluster {
            nodes: options.nodes.clone(),
            vms,
            tasks: HashMap::new(),
            file_locks: HashMap::new(),
            tickets: Vec::new(),
            guests: HashMap::new(),
            requests: 0,
            recorded: Vec::new(),
            validation_failures: Vec::new(),
            next_pid: 0x0001_0000,
            next_lock_owner: 1,
        };
        let faults = faults::Faults::new(options.fault_rate, options.fault_kinds.clone(), options.fault_seed);
        let shared = Arc::new(Shared { options, schema, cluster: Mutex::new(cluster), faults: Mutex::new(faults) });
        let (addr, fingerprint, server) = server::serve(shared.clone()).await?;
        Ok(StandIn { addr, fingerprint, shared, server })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Every VM that is not a template.
    pub fn vms(&self) -> Vec<VmView> {
        self.shared
            .lock()
            .vms
            .values()
            .filter(|v| !v.template)
            .map(|v| VmView {
                vmid: v.vmid,
                node: v.node.clone(),
                name: v.config.get("name").cloned(),
                tags: v.config.get("tags").cloned(),
                running: v.running,
                template: v.template,
            })
            .collect()
    }

    pub fn requests(&self) -> u64 {
        self.shared.lock().requests
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.shared.lock().recorded.clone()
    }

    pub fn validation_failures(&self) -> Vec<String> {
        self.shared.lock().validation_failures.clone()
    }

    /// Every fault message injected so far.
    pub fn injected(&self) -> Vec<(FaultKind, String)> {
        self.shared.faults().injected.clone()
    }

    /// The next `method` request to the path template `template` (as in the schema,
    /// e.g. `/nodes/{node}/qemu/{vmid}/status/start`) meets `kind`, whatever the rate.
    pub fn fault_next(&self, method: &str, template: &str, kind: FaultKind) {
        self.shared.faults().planned.push((method.to_owned(), template.to_owned(), kind));
    }

    pub fn set_fault_rate(&self, rate: f64) {
        self.shared.faults().rate = rate;
    }

    pub fn set_node_load(&self, node: &str, mem: u64, cpu: f64) {
        let mut c = self.shared.lock();
        if let Some(n) = c.nodes.iter_mut().find(|n| n.name == node) {
            n.mem = mem;
            n.cpu = cpu;
        }
    }

    /// Someone removes a VM outside AgentLab (its guest is left alone, as if the API
    /// had lost it).
    pub fn delete_behind_back(&self, vmid: u32) -> bool {
        self.shared.lock().vms.remove(&vmid).is_some()
    }

    /// Creates a stopped VM directly, as another tool would.
    pub fn plant_vm(&self, vmid: u32, node: &str, name: &str, tags: Option<&str>) {
        let mut config = BTreeMap::new();
        config.insert("name".to_owned(), name.to_owned());
        if let Some(tags) = tags {
            config.insert("tags".to_owned(), tags.to_owned());
        }
        let vm = Vm { vmid, node: node.to_owned(), config, template: false, running: false, created: Instant::now() };
        self.shared.lock().vms.insert(vmid, vm);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.abort();
        let guests: Vec<guest::GuestHandle> = self.shared.lock().guests.drain().map(|(_, g)| g).collect();
        for g in guests {
            g.stop();
        }
    }
}
