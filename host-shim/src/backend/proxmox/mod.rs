//! The Proxmox VE backend: a sandbox is a linked clone of the profile's template,
//! configured, given its vsock device, started, and destroyed with its disks when the
//! job ends. Every step's error names the operation, the VMID and node, and carries
//! Proxmox's own text.

pub mod args;
pub mod client;
pub mod config;
pub mod error;
pub mod placement;
pub mod reconcile;
pub mod task;
pub mod tls;
pub mod upid;
pub mod vmid;
mod watch;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use self::args::{ArgsSetter, vsock_args};
use self::client::{Check, Method, Outcome, PveClient};
use self::config::{ArgsVia, ChannelMode, ProxmoxConfig};
use self::error::PveError;
use self::placement::NodeConfig;
use self::vmid::VmidPool;
use super::{Backend, BackendError, ChannelEndpoint, ProvisionRequest, Sandbox, VmExit};

/// The tag every AgentLab VM carries; the reconciler touches nothing without it.
pub const TAG: &str = "agentlab";
/// The backend's name, as recorded with each of its sandboxes.
pub const BACKEND_NAME: &str = "proxmox";
/// How many VMIDs a clone tries when other clients keep taking them first.
const MAX_VMID_TRIES: u32 = 8;
const LOCK_WAIT: Duration = Duration::from_secs(120);

impl From<PveError> for BackendError {
    fn from(e: PveError) -> BackendError {
        BackendError::Proxmox(e.to_string())
    }
}

/// The VM's tags: `agentlab;sb-<id>`.
pub fn tags_for(sandbox_id: &str) -> String {
    format!("{TAG};{sandbox_id}")
}

/// A VM's `tags`, one by one (PVE separates them with `;`, `,` or spaces).
fn tag_list(tags: &str) -> impl Iterator<Item = &str> {
    tags.split([';', ',', ' ']).filter(|t| !t.is_empty())
}

/// Whether a VM's `tags` mark it as AgentLab's.
pub fn is_ours(tags: &str) -> bool {
    tag_list(tags).any(|t| t == TAG)
}

/// The sandbox id in a VM's `tags`, if it is one of ours.
pub fn sandbox_of(tags: &str) -> Option<String> {
    if !is_ours(tags) {
        return None;
    }
    tag_list(tags).find(|t| t.starts_with("sb-")).map(str::to_owned)
}

pub struct ProxmoxBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProxmoxConfig,
    client: PveClient,
    args: ArgsSetter,
    vmids: VmidPool,
    /// Memory promised to sandboxes being created, per node, until Proxmox shows it.
    pending_mb: Mutex<HashMap<String, u64>>,
    /// VMs this daemon made whose removal failed (node, VMID). A clone that failed
    /// before it was tagged is invisible to the reconciler's tag rule, so the daemon
    /// remembers it and the reconciler retries it each pass.
    failed_cleanups: Mutex<Vec<(String, u32)>>,
    /// The shared VM state poller's output (see watch.rs).
    listings: tokio::sync::OnceCell<watch::Listings>,
}

impl ProxmoxBackend {
    pub fn new(config: ProxmoxConfig) -> Result<ProxmoxBackend, PveError> {
        config.validate()?;
        let client = PveClient::new(&config.connection()?)?;
        let password = match config.args_via {
            ArgsVia::Ticket => Some(config.root_password()?),
            ArgsVia::Qm => None,
        };
        let args = ArgsSetter::new(config.args_via.clone(), config.qm_command.clone(), password);
        let [first, last] = config.vmid_range;
        let inner = Inner {
            client,
            args,
            vmids: VmidPool::new(first..=last),
            pending_mb: Mutex::default(),
            failed_cleanups: Mutex::default(),
            listings: tokio::sync::OnceCell::new(),
            config,
        };
        Ok(ProxmoxBackend { inner: Arc::new(inner) })
    }

    /// Asks the API for its version: proves the address, the certificate pin and the
    /// token in one request, at start, before any job depends on them.
    pub async fn check_api(&self) -> Result<String, PveError> {
        let op = format!("checking the Proxmox API at {}", self.inner.config.api_url);
        let v = self.inner.client.call(&op, Method::Get, "/version", &[]).await?;
        let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
        Ok(format!("version {} (release {}) at {}", field("version"), field("release"), self.inner.config.api_url))
    }

    /// The API client (for the reconciler and for counting requests).
    pub fn client(&self) -> &PveClient {
        &self.inner.client
    }

    pub fn config(&self) -> &ProxmoxConfig {
        &self.inner.config
    }
}

/// Whether the `vhost_vsock` module this node needs for the vsock channel is loaded.
/// Reads sysfs only: nothing here opens a vsock socket.
pub fn vhost_vsock_check() -> Result<(), String> {
    vhost_vsock_check_at(std::path::Path::new("/sys/module/vhost_vsock"), std::path::Path::new("/dev/vhost-vsock"))
}

fn vhost_vsock_check_at(module: &std::path::Path, device: &std::path::Path) -> Result<(), String> {
    if module.exists() || device.exists() {
        Ok(())
    } else {
        Err("the vhost_vsock kernel module is not loaded, so guests get no vsock device and no agent can dial in: run `modprobe vhost_vsock` and add `vhost_vsock` to /etc/modules-load.d/agentlab.conf".into())
    }
}

#[async_trait]
impl Backend for ProxmoxBackend {
    fn name(&self) -> &'static str {
        BACKEND_NAME
    }

    async fn preflight(&self) -> Result<(), BackendError> {
        if self.inner.config.channel == ChannelMode::Vsock {
            vhost_vsock_check().map_err(BackendError::Proxmox)?;
        }
        Ok(())
    }

    async fn reattach(&self, sandbox_id: &str) -> Result<Box<dyn Sandbox>, String> {
        Ok(Box::new(self.inner.clone().running_vm_of(sandbox_id).await?))
    }

    async fn provision(&self, req: &ProvisionRequest) -> Result<Box<dyn Sandbox>, BackendError> {
        let inner = self.inner.clone();
        let sandbox = inner.create(req).await?;
        Ok(Box::new(sandbox))
    }
}

impl Inner {
    /// Where a VM's hybrid vsock sockets live, when the channel is hybrid (tests).
    fn hybrid_dir(&self, vmid: u32) -> Option<PathBuf> {
        match (&self.config.channel, &self.config.hybrid_dir) {
            (ChannelMode::Hybrid, Some(dir)) => Some(dir.join(format!("vm-{vmid}"))),
            _ => None,
        }
    }

    /// The running VM tagged with `sandbox_id`, which an earlier, killed daemon left.
    async fn running_vm_of(self: Arc<Self>, sandbox_id: &str) -> Result<ProxmoxSandbox, String> {
        let op = format!("finding sandbox {sandbox_id}'s VM");
        let resources = self
            .client
            .call(&op, Method::Get, "/cluster/resources", &[("type", "vm".to_owned())])
            .await
            .map_err(|e| e.to_string())?;
        // A running one first: a stopped leftover with the same tag must not hide it.
        let (entry, vmid, node, _) = our_vms(&resources)
            .filter(|(_, _, _, tags)| sandbox_of(tags).as_deref() == Some(sandbox_id))
            .max_by_key(|(entry, ..)| runs(Some(entry)))
            .ok_or_else(|| format!("no VM tagged with sandbox {sandbox_id} is listed in /cluster/resources"))?;
        if !runs(Some(entry)) {
            let status = status_of(Some(entry)).unwrap_or("in an unknown state");
            return Err(format!("its VM {vmid} on node {node} is {status}"));
        }
        let number = |key: &str| entry.get(key).and_then(Value::as_u64).unwrap_or(0);
        let hybrid_dir = self.hybrid_dir(vmid);
        Ok(ProxmoxSandbox {
            inner: self.clone(),
            node: node.to_owned(),
            vmid,
            cores: u32::try_from(number("maxcpu")).unwrap_or(0),
            memory_mb: u32::try_from(number("maxmem") >> 20).unwrap_or(0),
            sandbox_id: sandbox_id.to_owned(),
            hybrid_dir,
            exit: None,
            // Proxmox counts a running VM's memory itself.
            pending_released: true,
            warnings: Vec::new(),
            started_at: Some(tokio::time::Instant::now()),
        })
    }

    fn task_timeout(&self) -> Duration {
        Duration::from_secs(self.config.task_timeout_secs)
    }

    fn add_pending(&self, node: &str, mb: i64) {
        let mut pending = self.pending_mb.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = pending.entry(node.to_owned()).or_insert(0);
        *entry = entry.saturating_add_signed(mb);
    }

    /// Places, clones, waits, configures. On any failure after the clone, the VM is
    /// destroyed before the error is returned.
    async fn create(self: Arc<Self>, req: &ProvisionRequest) -> Result<ProxmoxSandbox, BackendError> {
        let (loads, in_use) = self.cluster_view().await?;
        let node = {
            let pending = self.pending_mb.lock().unwrap_or_else(PoisonError::into_inner).clone();
            placement::choose(&self.config.nodes, &loads, &pending, req.memory_mb)
                .map_err(|e| BackendError::Proxmox(format!("placing sandbox {}: {e}", req.sandbox_id)))?
                .clone()
        };
        self.add_pending(&node.name, i64::from(req.memory_mb));
        let cloned = self.clone_vm(&node, req, &in_use).await;
        drop(in_use);
        let (vmid, clone_note) = match cloned {
            Ok(done) => done,
            Err(e) => {
                self.add_pending(&node.name, -i64::from(req.memory_mb));
                return Err(e.into());
            }
        };
        let mut sandbox = ProxmoxSandbox {
            inner: self.clone(),
            node: node.name.clone(),
            vmid,
            memory_mb: req.memory_mb,
            cores: req.cores,
            sandbox_id: req.sandbox_id.clone(),
            hybrid_dir: None,
            exit: None,
            pending_released: false,
            warnings: clone_note.into_iter().collect(),
            started_at: None,
        };
        if let Err(e) = self.configure(&node.name, vmid, req).await {
            let _ = sandbox.teardown().await;
            return Err(e.into());
        }
        if let Some(dir) = self.hybrid_dir(vmid) {
            if let Err(source) = std::fs::create_dir_all(&dir) {
                let _ = sandbox.teardown().await;
                return Err(BackendError::Io { context: format!("creating {}", dir.display()), source });
            }
            sandbox.hybrid_dir = Some(dir);
        }
        Ok(sandbox)
    }

    /// Node loads and the VMIDs in use, from one `/cluster/resources`. Only these are
    /// kept: the listing itself grows with the cluster and must not live on in every
    /// sandbox being created.
    async fn cluster_view(&self) -> Result<(Vec<placement::NodeLoad>, HashSet<u32>), PveError> {
        let resources = self.client.call("listing cluster resources", Method::Get, "/cluster/resources", &[]).await?;
        let loads = placement::node_loads(&resources);
        let in_use = vm_entries(&resources).filter_map(vmid_of).collect();
        Ok((loads, in_use))
    }

    /// Linked clone of the node's template into a fresh VMID from the pool; an id
    /// someone else took first moves on to the next.
    async fn clone_vm(
        &self,
        node: &NodeConfig,
        req: &ProvisionRequest,
        in_use: &HashSet<u32>,
    ) -> Result<(u32, Option<String>), PveError> {
        let mut skipped = Vec::new();
        let cloned = self.clone_to_free_vmid(node, req, in_use, &mut skipped).await;
        // Ids other clients took were held only so the later tries skipped them: they
        // are freed however the clone ended.
        for id in skipped {
            self.vmids.release(id);
        }
        cloned
    }

    /// [`Self::clone_vm`]'s tries; the ids found taken are added to `skipped`.
    async fn clone_to_free_vmid(
        &self,
        node: &NodeConfig,
        req: &ProvisionRequest,
        in_use: &HashSet<u32>,
        skipped: &mut Vec<u32>,
    ) -> Result<(u32, Option<String>), PveError> {
        let template = node.template_for(req.template_vmid);
        for _ in 0..MAX_VMID_TRIES {
            let vmid = self.vmids.reserve(in_use).ok_or_else(|| {
                let [a, b] = self.config.vmid_range;
                PveError::Config(format!("every VMID in vmid_range [{a}, {b}] is in use: widen it"))
            })?;
            let op = format!("cloning template {template} on node {} to VM {vmid}", node.name);
            let name = req.sandbox_id.clone();
            let params = [("newid", vmid.to_string()), ("full", "0".to_owned()), ("name", name.clone())];
            let path = format!("/nodes/{}/qemu/{template}/clone", node.name);
            let ours = |cfg: Option<&Value>| is_our_clone(cfg, &name);
            let check = Check { path: format!("/nodes/{}/qemu/{vmid}/config", node.name), applied: &ours };
            let note = match self.client.call_once(&op, Method::Post, &path, &params, check).await {
                Ok(Outcome::Answered(data)) => {
                    let done = task::wait_answered(&self.client, &op, &data, self.task_timeout()).await;
                    match done {
                        Ok(done) => done.note,
                        // The clone was accepted, so its VM may exist.
                        Err(e) => {
                            self.abandon(&node.name, vmid).await;
                            return Err(e);
                        }
                    }
                }
                Ok(Outcome::AlreadyApplied) => None,
                Err(e) if e.api().is_some_and(error::ApiError::is_vmid_taken) => {
                    tracing::info!("{op}: VMID {vmid} was taken by another client; trying the next");
                    skipped.push(vmid);
                    continue;
                }
                Err(e) => {
                    // Retries ran out: the clone may or may not have happened.
                    self.abandon_if_ours(&node.name, vmid, &name).await;
                    return Err(e);
                }
            };
            let op = format!("waiting for VM {vmid}'s clone lock on node {}", node.name);
            if let Err(e) = self.wait_unlocked(&op, &node.name, vmid).await {
                self.abandon(&node.name, vmid).await;
                return Err(e);
            }
            return Ok((vmid, note));
        }
        Err(PveError::Other {
            op: format!("cloning template {template} on node {}", node.name),
            detail: format!("VMIDs {skipped:?} were all taken by other clients first (config file already exists)"),
        })
    }

    /// A failed clone may have left a VM: remove it, then free the id.
    async fn abandon(&self, node: &str, vmid: u32) {
        match destroy_vm(self, node, vmid).await {
            Ok(()) => self.vmids.release(vmid),
            Err(e) => {
                tracing::error!("removing the failed clone VM {vmid} on {node} (retried by the reconciler): {e}");
                self.remember_failed_cleanup(node, vmid);
            }
        }
    }

    /// After a clone whose effect is unknown: removes the VM only if it carries our
    /// name. Another client's VM with that id (it may have won a race for it) is left
    /// alone.
    async fn abandon_if_ours(&self, node: &str, vmid: u32, name: &str) {
        let op = format!("checking whether VM {vmid} on node {node} is the failed clone {name}");
        let path = format!("/nodes/{node}/qemu/{vmid}/config");
        match self.client.call(&op, Method::Get, &path, &[]).await {
            Ok(cfg) if is_our_clone(Some(&cfg), name) => self.abandon(node, vmid).await,
            Ok(_) => self.vmids.release(vmid),
            Err(e) if e.is_missing_vm() => self.vmids.release(vmid),
            // Unknown: keep the id held, so it is not offered again while it may be ours.
            Err(e) => tracing::warn!("{e}"),
        }
    }

    fn remember_failed_cleanup(&self, node: &str, vmid: u32) {
        self.failed_cleanups.lock().unwrap_or_else(PoisonError::into_inner).push((node.to_owned(), vmid));
    }

    /// Tries again to remove the VMs whose removal failed; returns those removed.
    pub(crate) async fn retry_failed_cleanups(&self) -> Vec<u32> {
        let pending = std::mem::take(&mut *self.failed_cleanups.lock().unwrap_or_else(PoisonError::into_inner));
        let mut removed = Vec::new();
        for (node, vmid) in pending {
            match destroy_vm(self, &node, vmid).await {
                Ok(()) => {
                    self.vmids.release(vmid);
                    removed.push(vmid);
                }
                Err(e) => {
                    tracing::warn!("removing VM {vmid} on {node} again: {e}");
                    self.remember_failed_cleanup(&node, vmid);
                }
            }
        }
        removed
    }

    /// Waits until the VM's config carries no `lock` (a clone holds one until done).
    async fn wait_unlocked(&self, op: &str, node: &str, vmid: u32) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/status/current");
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut pause = Duration::from_millis(50);
        loop {
            let status = self.client.call(op, Method::Get, &path, &[]).await?;
            let Some(lock) = status.get("lock").and_then(Value::as_str) else { return Ok(()) };
            if tokio::time::Instant::now() >= deadline {
                return Err(PveError::Other {
                    op: op.to_owned(),
                    detail: format!("still locked ({lock}) after {} s", LOCK_WAIT.as_secs()),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Name, resources, network, tags, description, and the vsock device.
    async fn configure(&self, node: &str, vmid: u32, req: &ProvisionRequest) -> Result<(), PveError> {
        let mut params: Vec<(&str, String)> = vec![
            ("name", req.sandbox_id.clone()),
            ("cores", req.cores.to_string()),
            ("memory", req.memory_mb.to_string()),
            ("tags", tags_for(&req.sandbox_id)),
            (
                "description",
                format!(
                    "AgentLab sandbox {} for job {} (agentlab job show {})",
                    req.sandbox_id, req.job_id, req.job_id
                ),
            ),
        ];
        match &req.bridge {
            Some(bridge) => params.push(("net0", format!("virtio,bridge={bridge}"))),
            None => params.push(("delete", "net0".to_owned())),
        }
        let path = format!("/nodes/{node}/qemu/{vmid}/config");
        let args = ("args", vsock_args(vmid));
        match self.args.via() {
            ArgsVia::Ticket => {
                // One update as root@pam carries everything, args included.
                params.push(args);
                let op = format!("configuring VM {vmid} on node {node} (as root@pam, for args)");
                self.args.set_config_as_root(&self.client, &op, node, vmid, &params).await
            }
            ArgsVia::Qm => {
                let op = format!("configuring VM {vmid} on node {node}");
                self.client.call(&op, Method::Put, &path, &params).await?;
                let op = format!("setting VM {vmid}'s vsock device on node {node} with qm");
                self.args.set_config_as_root(&self.client, &op, node, vmid, &[args]).await
            }
        }
    }
}

pub(super) fn vm_entries(resources: &Value) -> impl Iterator<Item = &Value> {
    resources.as_array().into_iter().flatten().filter(|r| r.get("type").and_then(Value::as_str) == Some("qemu"))
}

/// AgentLab's VMs in a `/cluster/resources` listing (tagged `agentlab`, not
/// templates): each entry with its VMID, node and tags.
pub(super) fn our_vms(resources: &Value) -> impl Iterator<Item = (&Value, u32, &str, &str)> {
    vm_entries(resources).filter_map(|v| {
        let tags = v.get("tags").and_then(Value::as_str).unwrap_or_default();
        if !is_ours(tags) || v.get("template").and_then(Value::as_u64) == Some(1) {
            return None;
        }
        Some((v, vmid_of(v)?, v.get("node").and_then(Value::as_str)?, tags))
    })
}

/// The VMID of one `/cluster/resources` entry.
pub(super) fn vmid_of(entry: &Value) -> Option<u32> {
    u32::try_from(entry.get("vmid").and_then(Value::as_u64)?).ok()
}

/// Whether a VM's config (`None`: no such VM) is the clone named `name`: the clone
/// carries the sandbox's name, so a VM with our id and that name is ours.
fn is_our_clone(config: Option<&Value>, name: &str) -> bool {
    config.and_then(|c| c.get("name")).and_then(Value::as_str) == Some(name)
}

/// Stops (gracefully, then hard) and deletes a VM with its disks. A VM that is
/// already gone counts as done.
async fn destroy_vm(inner: &Inner, node: &str, vmid: u32) -> Result<(), PveError> {
    let client = &inner.client;
    let op = format!("stopping VM {vmid} on node {node}");
    let path = format!("/nodes/{node}/qemu/{vmid}/status/shutdown");
    let params = [("timeout", inner.config.shutdown_timeout_secs.to_string()), ("forceStop", "1".to_owned())];
    let status_path = format!("/nodes/{node}/qemu/{vmid}/status/current");
    let stopped = |s: Option<&Value>| status_of(s) != Some("running");
    let check = Check { path: status_path.clone(), applied: &stopped };
    match client.call_once(&op, Method::Post, &path, &params, check).await {
        Ok(Outcome::Answered(data)) => {
            task::wait_answered(client, &op, &data, inner.task_timeout()).await?;
        }
        Ok(Outcome::AlreadyApplied) => {}
        Err(e) if e.is_missing_vm() => return Ok(()),
        Err(e) => return Err(e),
    }
    let op = format!("destroying VM {vmid} on node {node}");
    let path = format!("/nodes/{node}/qemu/{vmid}");
    let params = [("purge", "1".to_owned()), ("destroy-unreferenced-disks", "1".to_owned())];
    let gone = |s: Option<&Value>| s.is_none();
    match client.call_once(&op, Method::Delete, &path, &params, Check { path: status_path, applied: &gone }).await {
        Ok(Outcome::Answered(data)) => task::wait_answered(client, &op, &data, inner.task_timeout()).await.map(|_| ()),
        Ok(Outcome::AlreadyApplied) => Ok(()),
        Err(e) if e.is_missing_vm() => Ok(()),
        Err(e) => Err(e),
    }
}

fn status_of(current: Option<&Value>) -> Option<&str> {
    current.and_then(|c| c.get("status")).and_then(Value::as_str)
}

/// Whether a VM's status (current, or its `/cluster/resources` entry) is `running`.
fn runs(current: Option<&Value>) -> bool {
    status_of(current) == Some("running")
}

pub struct ProxmoxSandbox {
    inner: Arc<Inner>,
    node: String,
    vmid: u32,
    cores: u32,
    memory_mb: u32,
    sandbox_id: String,
    hybrid_dir: Option<PathBuf>,
    exit: Option<VmExit>,
    pending_released: bool,
    /// Tasks that succeeded with warnings, not yet taken for the record.
    warnings: Vec<String>,
    /// When the start was confirmed.
    started_at: Option<tokio::time::Instant>,
}

impl ProxmoxSandbox {
    /// Stops counting this sandbox's memory as promised to its node.
    fn release_pending(&mut self) {
        if !self.pending_released {
            self.pending_released = true;
            self.inner.add_pending(&self.node, -i64::from(self.memory_mb));
        }
    }

    /// Whether the VM's current status is `running` (unknown counts as not).
    async fn is_running(&self, op: &str) -> bool {
        let path = format!("/nodes/{}/qemu/{}/status/current", self.node, self.vmid);
        let status = self.inner.client.call(op, Method::Get, &path, &[]).await;
        status.is_ok_and(|s| runs(Some(&s)))
    }

    async fn teardown(&mut self) -> Result<(), PveError> {
        let result = destroy_vm(&self.inner, &self.node, self.vmid).await;
        match &result {
            Ok(()) => self.inner.vmids.release(self.vmid),
            Err(_) => self.inner.remember_failed_cleanup(&self.node, self.vmid),
        }
        self.release_pending();
        if let Some(dir) = self.hybrid_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        result
    }
}

#[async_trait]
impl Sandbox for ProxmoxSandbox {
    fn channel(&self) -> ChannelEndpoint {
        match &self.hybrid_dir {
            Some(dir) => ChannelEndpoint::Hybrid { uds: dir.join("vsock.sock") },
            None => ChannelEndpoint::Vsock { cid: self.vmid },
        }
    }

    async fn boot(&mut self) -> Result<(), BackendError> {
        let (node, vmid) = (self.node.as_str(), self.vmid);
        let client = &self.inner.client;
        let op = format!("starting VM {vmid} on node {node}");
        let path = format!("/nodes/{node}/qemu/{vmid}/status/start");
        let check = Check { path: format!("/nodes/{node}/qemu/{vmid}/status/current"), applied: &runs };
        let started = match client.call_once(&op, Method::Post, &path, &[], check).await {
            Ok(Outcome::Answered(data)) => {
                task::wait_answered(client, &op, &data, self.inner.task_timeout()).await.map(|done| done.note)
            }
            Ok(Outcome::AlreadyApplied) => Ok(None),
            Err(e) => Err(e),
        };
        match started {
            Ok(note) => self.warnings.extend(note),
            // A start repeated after its answer was lost fails once the first one has
            // run (PVE: the task fails with "VM N already running"): what counts is
            // whether the VM runs.
            Err(e) if self.is_running(&op).await => tracing::info!("{e}; the VM is running all the same"),
            Err(e) => return Err(e.into()),
        }
        self.started_at = Some(tokio::time::Instant::now());
        // Proxmox counts a running VM's memory itself from now on.
        self.release_pending();
        Ok(())
    }

    async fn exited(&mut self) -> VmExit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        // Only listings taken after the VM started say anything about it.
        let Some(started) = self.started_at else { return std::future::pending().await };
        let mut listings = watch::subscribe(&self.inner).await;
        loop {
            if listings.changed().await.is_err() {
                return std::future::pending().await;
            }
            let Some(listing) = listings.borrow_and_update().clone() else { continue };
            if listing.taken_at < started {
                continue;
            }
            let description = match listing.states.get(&self.vmid).map(String::as_str) {
                Some("running") => continue,
                Some(state) => format!("VM {} on node {} is {state}", self.vmid, self.node),
                None => format!("VM {} on node {} no longer exists (deleted outside AgentLab)", self.vmid, self.node),
            };
            let exit = VmExit { description };
            self.exit = Some(exit.clone());
            return exit;
        }
    }

    fn accel(&self) -> Option<String> {
        None
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn shape(&self) -> String {
        format!("VM {} on node {}, {} vCPU, {} MiB", self.vmid, self.node, self.cores, self.memory_mb)
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- proxmox ---\nVM {} on node {} ({}); see its task log and `qm config {}` on the node",
            self.vmid, self.node, self.sandbox_id, self.vmid
        )
    }

    fn dial_in_hint(&self) -> String {
        let channel = match &self.hybrid_dir {
            Some(dir) => format!("the hybrid vsock socket {}/vsock.sock_52000", dir.display()),
            None => format!("vsock CID {} port 52000", self.vmid),
        };
        format!(
            "VM {vmid} on node {node} was started but its agent never connected on {channel}: check that the template runs agentlab-agent at boot (systemctl status agentlab-agent in the guest), that `qm config {vmid}` shows args: {args}, and that vhost_vsock is loaded on {node} (lsmod | grep vhost_vsock)",
            vmid = self.vmid,
            node = self.node,
            args = vsock_args(self.vmid)
        )
    }

    async fn destroy(mut self: Box<Self>) -> Result<(), BackendError> {
        self.teardown().await.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_vhost_vsock_module_says_how_to_load_it() {
        let dir = tempfile::tempdir().unwrap();
        let (module, device) = (dir.path().join("vhost_vsock"), dir.path().join("vhost-vsock"));
        let err = vhost_vsock_check_at(&module, &device).unwrap_err();
        assert!(err.contains("run `modprobe vhost_vsock`"), "{err}");
        std::fs::create_dir(&module).unwrap();
        assert_eq!(vhost_vsock_check_at(&module, &device), Ok(()));
    }

    #[test]
    fn tags_round_trip_and_foreign_vms_are_not_ours() {
        assert_eq!(tags_for("sb-0123456789ab"), "agentlab;sb-0123456789ab");
        assert_eq!(sandbox_of("agentlab;sb-0123456789ab"), Some("sb-0123456789ab".into()));
        assert_eq!(sandbox_of("sb-0123456789ab;agentlab"), Some("sb-0123456789ab".into()));
        assert_eq!(sandbox_of("sb-0123456789ab"), None, "without the agentlab tag it is not ours");
        assert_eq!(sandbox_of("agentlab"), None);
        assert_eq!(sandbox_of("prod;web"), None);
    }
}
