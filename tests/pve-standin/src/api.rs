//! The API's behaviour: authentication, validation, faults, and the handlers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentlab_host::backend::proxmox::upid::Upid;
use serde_json::{Value, json};

use crate::faults::FaultKind;
use crate::{Cluster, Recorded, Shared, Task, Vm, guest};

/// How a request is answered.
#[derive(Debug)]
pub enum Reply {
    Data(Value),
    Error {
        status: u16,
        message: String,
        errors: BTreeMap<String, String>,
    },
    /// Close the connection without answering.
    Drop,
}

fn err(status: u16, message: impl Into<String>) -> Reply {
    Reply::Error { status, message: message.into(), errors: BTreeMap::new() }
}

/// PVE's answer to parameters that fail its schema: 400 with the errors map.
fn parameter_error(errors: BTreeMap<String, String>) -> Reply {
    Reply::Error { status: 400, message: "Parameter verification failed.".into(), errors }
}

fn missing_vm(node: &str, vmid: u32) -> Reply {
    err(500, format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"))
}

fn lock_timeout_text(vmid: u32) -> String {
    format!("can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout")
}

/// Credentials as they arrived.
#[derive(Default, Debug)]
pub struct Credentials {
    pub authorization: Option<String>,
    pub cookie: Option<String>,
    pub csrf: Option<String>,
}

/// What kind of call a route is, for faults.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    /// Changes something synchronously.
    Change,
    /// Changes something through a task.
    Task,
}

fn route_kind(method: &str, template: &str) -> Kind {
    match (method, template) {
        ("GET", _) => Kind::Read,
        ("PUT", "/nodes/{node}/qemu/{vmid}/config") => Kind::Change,
        ("POST", "/access/ticket") => Kind::Read,
        ("POST", t) if t.starts_with("/nodes/{node}/qemu/{vmid}/") => Kind::Task,
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => Kind::Task,
        _ => Kind::Change,
    }
}

pub async fn handle(
    shared: &Arc<Shared>,
    method: &str,
    path: &str,
    query: Vec<(String, String)>,
    creds: Credentials,
) -> Reply {
    shared.lock().requests += 1;
    let Some(api_path) = path.strip_prefix("/api2/json") else {
        return err(501, format!("Method '{method} {path}' not implemented"));
    };
    let Some((template, path_params)) = shared.schema.route(api_path) else {
        return err(501, format!("Method '{method} {api_path}' not implemented"));
    };
    if !shared.schema.has_method(&template, method) {
        return err(501, format!("Method '{method} {api_path}' not implemented"));
    }
    let mut params = path_params;
    for (k, v) in query {
        if params.insert(k.clone(), v).is_some() {
            return parameter_error(BTreeMap::from([(k, "duplicate parameter".to_owned())]));
        }
    }
    let user = if (method, template.as_str()) == ("POST", "/access/ticket") {
        String::new()
    } else {
        match authenticate(shared, method, &creds) {
            Ok(user) => user,
            Err(reply) => return reply,
        }
    };
    if let Err(errors) = shared.schema.validate(&template, method, &params) {
        shared.lock().validation_failures.push(format!("{method} {template}: {errors:?}"));
        return parameter_error(errors);
    }
    shared.lock().recorded.push(Recorded { method: method.into(), template: template.clone(), params: params.clone() });

    let kind = route_kind(method, &template);
    let is_clone = template == "/nodes/{node}/qemu/{vmid}/clone";
    let has_vm = template.contains("{vmid}");
    let fault = {
        let mut faults = shared.faults();
        faults.take_planned(method, &template).or_else(|| {
            faults.draw(|f| match f {
                FaultKind::LockTimeout | FaultKind::VmLocked => has_vm && kind != Kind::Read,
                FaultKind::Internal => kind != Kind::Read,
                FaultKind::Proxy595 | FaultKind::Proxy596 | FaultKind::DropConnection => true,
                FaultKind::SlowTask | FaultKind::FailingTask => kind == Kind::Task,
                FaultKind::VmidRace => is_clone,
            })
        })
    };
    let vmid_param: u32 = params.get("vmid").and_then(|v| v.parse().ok()).unwrap_or(0);
    let scale = shared.options.lock_wait_scale;
    let mut task_extra = Duration::ZERO;
    let mut task_failure = None;
    let mut after: Option<Reply> = None;
    match fault {
        None => {}
        Some(FaultKind::LockTimeout) => {
            let wait = if is_clone { 1.0 } else { 10.0 };
            tokio::time::sleep(Duration::from_secs_f64(wait * scale)).await;
            let mut f = shared.faults();
            // A clone also allocates storage, under the storage's own lock.
            let text = if is_clone && f.coin() {
                "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout".to_owned()
            } else {
                lock_timeout_text(vmid_param)
            };
            let msg = f.record(FaultKind::LockTimeout, text);
            return err(500, msg);
        }
        Some(FaultKind::VmLocked) => {
            let msg = shared.faults().record(FaultKind::VmLocked, "VM is locked (backup)".into());
            return err(500, msg);
        }
        Some(FaultKind::Internal) => {
            let mut f = shared.faults();
            let n = f.next_number();
            let msg = f.record(FaultKind::Internal, format!("storage 'local-lvm' is not online (injected fault {n})"));
            return err(500, msg);
        }
        Some(FaultKind::Proxy595) => {
            let msg = shared
                .faults()
                .record(FaultKind::Proxy595, "Errors during connection establishment, proxy handshake".into());
            return err(595, msg);
        }
        Some(FaultKind::Proxy596) => {
            let msg = shared.faults().record(FaultKind::Proxy596, "Connection timed out".into());
            if kind == Kind::Read {
                return err(596, msg);
            }
            // The change happens; its answer is lost.
            after = Some(err(596, msg));
        }
        Some(FaultKind::DropConnection) => {
            let mut f = shared.faults();
            f.record(FaultKind::DropConnection, "connection closed before message completed".into());
            if kind == Kind::Read || f.coin() {
                return Reply::Drop;
            }
            after = Some(Reply::Drop);
        }
        Some(FaultKind::SlowTask) => {
            shared.faults().record(FaultKind::SlowTask, "slow task".into());
            task_extra = Duration::from_millis(1500);
        }
        Some(FaultKind::FailingTask) => {
            let mut f = shared.faults();
            let n = f.next_number();
            let msg = f
                .record(FaultKind::FailingTask, format!("command 'lvcreate' failed: exit code 5 (injected fault {n})"));
            task_failure = Some(msg);
        }
        Some(FaultKind::VmidRace) => {
            if let Some(newid) = params.get("newid").and_then(|v| v.parse::<u32>().ok()) {
                another_client_takes(shared, newid, params.get("node").cloned().unwrap_or_default());
                shared
                    .faults()
                    .record(FaultKind::VmidRace, format!("unable to create VM {newid}: config file already exists"));
            }
        }
    }
    let ctx = Ctx { shared: shared.clone(), user, task_extra, task_failure };
    let reply = dispatch(&ctx, method, &template, &params).await;
    match (after, &reply) {
        (Some(lost), Reply::Data(_)) => lost,
        _ => reply,
    }
}

/// "Another client" creates a VM with `vmid` now and removes it a moment later.
fn another_client_takes(shared: &Arc<Shared>, vmid: u32, node: String) {
    let mut c = shared.lock();
    if c.vms.contains_key(&vmid) {
        return;
    }
    let mut config = BTreeMap::new();
    config.insert("name".to_owned(), format!("other-client-{vmid}"));
    c.vms.insert(vmid, Vm { vmid, node, config, template: false, running: false, created: std::time::Instant::now() });
    drop(c);
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = shared.lock();
        if c.vms.get(&vmid).is_some_and(|v| v.config.get("name").is_some_and(|n| n.starts_with("other-client-"))) {
            c.vms.remove(&vmid);
        }
    });
}

fn authenticate(shared: &Shared, method: &str, creds: &Credentials) -> Result<String, Reply> {
    let o = &shared.options;
    if let Some(auth) = &creds.authorization {
        let expected = format!("PVEAPIToken={}={}", o.token_id, o.token_secret);
        return if *auth == expected { Ok(o.token_id.clone()) } else { Err(err(401, "authentication failure")) };
    }
    if let Some(cookie) = &creds.cookie {
        let ticket =
            cookie.split(';').map(str::trim).find_map(|c| c.strip_prefix("PVEAuthCookie=")).unwrap_or_default();
        let c = shared.lock();
        let Some((_, csrf)) = c.tickets.iter().find(|(t, _)| t == ticket) else {
            return Err(err(401, "invalid PVE ticket"));
        };
        if method != "GET" && creds.csrf.as_deref() != Some(csrf.as_str()) {
            return Err(err(401, "Permission check failed (invalid csrf token)"));
        }
        return Ok("root@pam".into());
    }
    Err(err(401, "No ticket"))
}

struct Ctx {
    shared: Arc<Shared>,
    user: String,
    task_extra: Duration,
    task_failure: Option<String>,
}

fn int(params: &BTreeMap<String, String>, name: &str) -> u32 {
    params.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn boolean(params: &BTreeMap<String, String>, name: &str) -> Option<bool> {
    params.get(name).map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

async fn dispatch(ctx: &Ctx, method: &str, template: &str, p: &BTreeMap<String, String>) -> Reply {
    let node = p.get("node").cloned().unwrap_or_default();
    let vmid = int(p, "vmid");
    match (method, template) {
        ("GET", "/version") => Reply::Data(
            json!({"version": format!("{}.0.3", ctx.shared.options.schema_version), "release": format!("{}.0", ctx.shared.options.schema_version), "repoid": "standin"}),
        ),
        ("GET", "/nodes") => {
            let c = ctx.shared.lock();
            Reply::Data(Value::Array(c.nodes.iter().map(|n| json!({"node": n.name, "status": "online", "mem": n.mem, "maxmem": n.maxmem, "cpu": n.cpu, "maxcpu": n.maxcpu})).collect()))
        }
        ("POST", "/access/ticket") => ticket(ctx, p),
        ("GET", "/cluster/resources") => resources(ctx, p.get("type").map(String::as_str)),
        ("GET", "/cluster/nextid") => nextid(ctx, p.get("vmid").and_then(|v| v.parse().ok())),
        ("GET", "/nodes/{node}/tasks/{upid}/status") => task_status(ctx, &node, &p["upid"]),
        ("GET", "/nodes/{node}/tasks/{upid}/log") => task_log(
            ctx,
            &node,
            &p["upid"],
            int(p, "start") as usize,
            p.get("limit").map_or(50, |_| int(p, "limit")) as usize,
        ),
        ("GET", "/nodes/{node}/qemu/{vmid}/config") => with_vm(ctx, &node, vmid, |vm| {
            let mut cfg: serde_json::Map<String, Value> =
                vm.config.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
            cfg.insert(
                "digest".into(),
                Value::String(format!("{:040x}", vm.config.len() as u64 * 7919 + u64::from(vmid))),
            );
            Reply::Data(Value::Object(cfg))
        }),
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current") => with_vm(ctx, &node, vmid, |vm| {
            let mut s = json!({
                "vmid": vmid,
                "status": if vm.running { "running" } else { "stopped" },
                "qmpstatus": if vm.running { "running" } else { "stopped" },
                "name": vm.config.get("name"),
                "uptime": if vm.running { vm.created.elapsed().as_secs() } else { 0 },
            });
            if let Some(lock) = vm.lock() {
                s["lock"] = Value::String(lock.to_owned());
            }
            if vm.template {
                s["template"] = json!(1);
            }
            Reply::Data(s)
        }),
        ("PUT", "/nodes/{node}/qemu/{vmid}/config") => set_config(ctx, &node, vmid, p).await,
        ("POST", "/nodes/{node}/qemu/{vmid}/clone") => clone(ctx, &node, vmid, p).await,
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start") => start(ctx, &node, vmid),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown") => stop(ctx, &node, vmid, "qmshutdown", p),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/stop") => stop(ctx, &node, vmid, "qmstop", p),
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => destroy(ctx, &node, vmid),
        _ => err(501, format!("Method '{method} {template}' is not implemented by the stand-in")),
    }
}

fn with_vm(ctx: &Ctx, node: &str, vmid: u32, f: impl FnOnce(&Vm) -> Reply) -> Reply {
    let c = ctx.shared.lock();
    match c.vms.get(&vmid).filter(|vm| vm.node == node) {
        Some(vm) => f(vm),
        None => missing_vm(node, vmid),
    }
}

fn ticket(ctx: &Ctx, p: &BTreeMap<String, String>) -> Reply {
    let o = &ctx.shared.options;
    let user = p.get("username").cloned().unwrap_or_default();
    let user = match p.get("realm") {
        Some(realm) if !user.contains('@') => format!("{user}@{realm}"),
        _ => user,
    };
    if user != "root@pam" || p.get("password") != Some(&o.root_password) {
        return err(401, "authentication failure");
    }
    let n: u64 = rand::random();
    let ticket = format!("PVE:root@pam:{:08X}::{n:016x}", now_secs());
    let csrf = format!("{:08X}:{:016x}", now_secs(), n.rotate_left(17));
    ctx.shared.lock().tickets.push((ticket.clone(), csrf.clone()));
    Reply::Data(json!({"username": "root@pam", "ticket": ticket, "CSRFPreventionToken": csrf}))
}

fn resources(ctx: &Ctx, kind: Option<&str>) -> Reply {
    let c = ctx.shared.lock();
    let mut out = Vec::new();
    if kind.is_none() || kind == Some("node") {
        for n in &c.nodes {
            out.push(json!({"id": format!("node/{}", n.name), "type": "node", "node": n.name, "status": "online", "mem": n.mem, "maxmem": n.maxmem, "cpu": n.cpu, "maxcpu": n.maxcpu, "level": ""}));
        }
    }
    if kind.is_none() || kind == Some("vm") {
        for vm in c.vms.values() {
            let mut v = json!({
                "id": format!("qemu/{}", vm.vmid), "type": "qemu", "vmid": vm.vmid, "node": vm.node,
                "name": vm.config.get("name"), "status": if vm.running { "running" } else { "stopped" },
                "template": u8::from(vm.template), "maxmem": vm.config.get("memory").and_then(|m| m.parse::<u64>().ok()).unwrap_or(512) << 20,
                "uptime": if vm.running { vm.created.elapsed().as_secs() } else { 0 },
            });
            if let Some(tags) = vm.config.get("tags") {
                v["tags"] = Value::String(tags.clone());
            }
            if let Some(lock) = vm.lock() {
                v["lock"] = Value::String(lock.to_owned());
            }
            out.push(v);
        }
    }
    Reply::Data(Value::Array(out))
}

fn nextid(ctx: &Ctx, asked: Option<u32>) -> Reply {
    let c = ctx.shared.lock();
    if let Some(id) = asked {
        if c.vms.contains_key(&id) {
            return parameter_error(BTreeMap::from([("vmid".to_owned(), format!("VM {id} already exists"))]));
        }
        return Reply::Data(Value::String(id.to_string()));
    }
    let id = (100..).find(|id| !c.vms.contains_key(id)).unwrap_or(100);
    Reply::Data(Value::String(id.to_string()))
}

fn task_status(ctx: &Ctx, node: &str, upid: &str) -> Reply {
    let c = ctx.shared.lock();
    let Some(t) = c.tasks.get(upid).filter(|t| t.upid.node == node) else {
        return err(
            500,
            format!(
                "unable to open file '/var/log/pve/tasks/active' for task {upid} on node {node} - No such file or directory"
            ),
        );
    };
    let u = &t.upid;
    let mut v = json!({
        "upid": u.as_str(), "node": u.node, "type": u.kind, "id": u.id, "user": u.user,
        "pid": u.pid, "pstart": u.pstart, "starttime": u.starttime,
        "status": if t.exitstatus.is_some() { "stopped" } else { "running" },
    });
    if let Some(e) = &t.exitstatus {
        v["exitstatus"] = Value::String(e.clone());
    }
    Reply::Data(v)
}

fn task_log(ctx: &Ctx, node: &str, upid: &str, start: usize, limit: usize) -> Reply {
    let c = ctx.shared.lock();
    let Some(t) = c.tasks.get(upid).filter(|t| t.upid.node == node) else {
        return err(500, format!("task log of {upid} not found on node {node}"));
    };
    let lines: Vec<Value> =
        t.log.iter().enumerate().skip(start).take(limit).map(|(n, l)| json!({"n": n + 1, "t": l})).collect();
    Reply::Data(Value::Array(lines))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Takes a VM config file lock, waiting at most `wait` like PVE's lock_file.
async fn file_lock(shared: &Shared, vmid: u32, wait: Duration) -> Result<u64, Reply> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        {
            let mut c = shared.lock();
            if !c.file_locks.contains_key(&vmid) {
                c.next_lock_owner += 1;
                let owner = c.next_lock_owner;
                c.file_locks.insert(vmid, owner);
                return Ok(owner);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(err(500, lock_timeout_text(vmid)));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn file_unlock(shared: &Shared, vmid: u32, owner: u64) {
    let mut c = shared.lock();
    if c.file_locks.get(&vmid) == Some(&owner) {
        c.file_locks.remove(&vmid);
    }
}

const SET_ONLY_BY_ROOT: [&str; 2] = ["args", "hookscript"];

async fn set_config(ctx: &Ctx, node: &str, vmid: u32, p: &BTreeMap<String, String>) -> Reply {
    if ctx.user != "root@pam" {
        for key in SET_ONLY_BY_ROOT {
            if p.contains_key(key) {
                return err(500, format!("only root can set '{key}' config"));
            }
        }
        if p.contains_key("skiplock") {
            return err(500, "Only root may use this option.");
        }
    }
    if ctx.shared.lock().vms.get(&vmid).filter(|v| v.node == node).is_none() {
        return missing_vm(node, vmid);
    }
    let wait = Duration::from_secs_f64(10.0 * ctx.shared.options.lock_wait_scale);
    let owner = match file_lock(&ctx.shared, vmid, wait).await {
        Ok(o) => o,
        Err(reply) => return reply,
    };
    let reply = {
        let mut c = ctx.shared.lock();
        match c.vms.get_mut(&vmid).filter(|v| v.node == node) {
            None => missing_vm(node, vmid),
            Some(vm) if vm.lock().is_some() && boolean(p, "skiplock") != Some(true) => {
                err(500, format!("VM is locked ({})", vm.lock().unwrap_or_default()))
            }
            Some(vm) => {
                if let Some(list) = p.get("delete") {
                    for key in list.split([',', ';', ' ']).filter(|k| !k.is_empty()) {
                        vm.config.remove(key);
                    }
                }
                for (k, v) in p {
                    if !["node", "vmid", "delete", "digest", "skiplock"].contains(&k.as_str()) {
                        vm.config.insert(k.clone(), v.clone());
                    }
                }
                Reply::Data(Value::Null)
            }
        }
    };
    file_unlock(&ctx.shared, vmid, owner);
    reply
}

/// Registers a task and runs `work` after the task duration; returns its UPID.
fn spawn_task<F>(ctx: &Ctx, node: &str, kind: &str, id: &str, work: F) -> Reply
where
    F: std::future::Future<Output = Result<Vec<String>, String>> + Send + 'static,
{
    let shared = ctx.shared.clone();
    let (pid, pstart, starttime) = {
        let mut c = shared.lock();
        c.next_pid += 1;
        (c.next_pid, 0x01C0_0000 + u64::from(c.next_pid % 4096), now_secs())
    };
    let text = format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{}:", ctx.user);
    // Parsing it with the client's own parser keeps the stand-in's UPIDs well-formed.
    let upid = Upid::parse(&text).expect("the stand-in writes well-formed UPIDs");
    shared.lock().tasks.insert(text.clone(), Task { upid, exitstatus: None, log: Vec::new() });
    let delay = shared.options.task_duration + ctx.task_extra;
    let failure = ctx.task_failure.clone();
    let warnings = shared.options.task_warnings;
    let key = text.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let result = match failure {
            Some(f) => Err(f),
            None => work.await,
        };
        let mut c = shared.lock();
        if let Some(t) = c.tasks.get_mut(&key) {
            match result {
                Ok(mut log) if warnings => {
                    t.log.append(&mut log);
                    t.log.push("WARN: volume 'local-lvm:vm-disk' is not fully trimmed".into());
                    t.log.push("TASK WARNINGS: 1".into());
                    t.exitstatus = Some("WARNINGS: 1".into());
                }
                Ok(mut log) => {
                    t.log.append(&mut log);
                    t.log.push("TASK OK".into());
                    t.exitstatus = Some("OK".into());
                }
                Err(e) => {
                    t.log.push(format!("TASK ERROR: {e}"));
                    t.exitstatus = Some(e);
                }
            }
        }
    });
    Reply::Data(Value::String(text))
}

async fn clone(ctx: &Ctx, node: &str, vmid: u32, p: &BTreeMap<String, String>) -> Reply {
    let newid = int(p, "newid");
    let full = boolean(p, "full");
    let source = ctx.shared.lock().vms.get(&vmid).filter(|v| v.node == node).cloned();
    let Some(source) = source else { return missing_vm(node, vmid) };
    if full == Some(false) && !source.template {
        return err(500, format!("Linked clone feature is not supported for 'VM {vmid}': it is not a template"));
    }
    if let Some(lock) = source.lock() {
        return err(500, format!("VM is locked ({lock})"));
    }
    // Clone waits only 1 s for the source's lock.
    let wait = Duration::from_secs_f64(ctx.shared.options.lock_wait_scale);
    let owner = match file_lock(&ctx.shared, vmid, wait).await {
        Ok(o) => o,
        Err(reply) => return reply,
    };
    let created = {
        let mut c = ctx.shared.lock();
        match c.vms.entry(newid) {
            std::collections::btree_map::Entry::Occupied(_) => {
                Err(err(500, format!("unable to create VM {newid}: config file already exists")))
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                let mut config = source.config.clone();
                config.remove("template");
                if let Some(disk) = config.get_mut("scsi0") {
                    *disk = format!("local-lvm:base-{vmid}-disk-0/vm-{newid}-disk-0,size=4G");
                }
                if let Some(name) = p.get("name") {
                    config.insert("name".into(), name.clone());
                }
                config.insert("lock".into(), "clone".into());
                let target = p.get("target").cloned().unwrap_or_else(|| node.to_owned());
                let created = std::time::Instant::now();
                slot.insert(Vm { vmid: newid, node: target, config, template: false, running: false, created });
                Ok(())
            }
        }
    };
    // Hold the source lock briefly, as the copy of its config does.
    tokio::time::sleep(Duration::from_millis(2)).await;
    file_unlock(&ctx.shared, vmid, owner);
    if let Err(reply) = created {
        return reply;
    }
    let shared = ctx.shared.clone();
    let failing = ctx.task_failure.is_some();
    let shared_on_fail = ctx.shared.clone();
    if failing {
        // The failed clone's VM is removed when its task ends, as PVE does.
        let delay = ctx.shared.options.task_duration + ctx.task_extra;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            shared_on_fail.lock().vms.remove(&newid);
        });
    }
    spawn_task(ctx, node, "qmclone", &vmid.to_string(), async move {
        let mut c = shared.lock();
        match c.vms.get_mut(&newid) {
            Some(vm) => {
                vm.config.remove("lock");
                Ok(vec![format!("create linked clone of drive scsi0 (local-lvm:base-{vmid}-disk-0)")])
            }
            None => Err(format!("VM {newid} vanished during the clone")),
        }
    })
}

/// The VM a task is asked for: missing or locked, it is refused before any task starts.
fn unlocked_vm<'a>(c: &'a Cluster, node: &str, vmid: u32) -> Result<&'a Vm, Reply> {
    let Some(vm) = c.vms.get(&vmid).filter(|v| v.node == node) else { return Err(missing_vm(node, vmid)) };
    match vm.lock() {
        Some(lock) => Err(err(500, format!("VM is locked ({lock})"))),
        None => Ok(vm),
    }
}

/// Starts a `kind` task on VM `vmid` whose work, made from the shared state, runs under
/// the VM's config lock.
fn spawn_vm_task<W, F>(ctx: &Ctx, node: &str, vmid: u32, kind: &str, work: W) -> Reply
where
    W: FnOnce(Arc<Shared>) -> F,
    F: std::future::Future<Output = Result<Vec<String>, String>> + Send + 'static,
{
    let work = work(ctx.shared.clone());
    spawn_task(ctx, node, kind, &vmid.to_string(), with_config_lock(ctx.shared.clone(), vmid, work))
}

fn start(ctx: &Ctx, node: &str, vmid: u32) -> Reply {
    let (cores, memory, args) = {
        let c = ctx.shared.lock();
        let vm = match unlocked_vm(&c, node, vmid) {
            Ok(vm) => vm,
            Err(reply) => return reply,
        };
        if vm.template {
            return err(500, "you can't start a vm if it's a template");
        }
        let cores = vm.config.get("cores").and_then(|c| c.parse().ok()).unwrap_or(1);
        let memory = vm.config.get("memory").and_then(|m| m.trim_start_matches("current=").parse().ok()).unwrap_or(512);
        (cores, memory, vm.config.get("args").cloned())
    };
    spawn_vm_task(ctx, node, vmid, "qmstart", move |shared| async move {
        // As PVE: the API forks the task without looking; the task finds the VM running.
        if shared.lock().vms.get(&vmid).is_some_and(|v| v.running) {
            return Err(format!("VM {vmid} already running"));
        }
        let cid = args.as_deref().and_then(guest::cid_from_args);
        let handle = guest::start(shared.clone(), vmid, cid, cores, memory).await?;
        let mut c = shared.lock();
        match c.vms.get_mut(&vmid) {
            Some(vm) => {
                vm.running = true;
                if let Some(h) = handle {
                    c.guests.insert(vmid, h);
                }
                Ok(vec![format!("start VM {vmid}: UPID")])
            }
            None => Err(format!("VM {vmid} vanished during start")),
        }
    })
}

fn stop(ctx: &Ctx, node: &str, vmid: u32, kind: &str, p: &BTreeMap<String, String>) -> Reply {
    if let Err(reply) = unlocked_vm(&ctx.shared.lock(), node, vmid) {
        return reply;
    }
    let timeout = Duration::from_secs(u64::from(int(p, "timeout")).max(1));
    spawn_vm_task(ctx, node, vmid, kind, move |shared| async move {
        let running = shared.lock().vms.get(&vmid).is_some_and(|v| v.running);
        if !running {
            return Ok(vec![format!("VM {vmid} not running")]);
        }
        let handle = shared.lock().guests.remove(&vmid);
        if let Some(h) = handle {
            h.stop_and_wait(timeout).await;
        }
        if let Some(vm) = shared.lock().vms.get_mut(&vmid) {
            vm.running = false;
        }
        Ok(vec![format!("VM {vmid} stopped")])
    })
}

fn destroy(ctx: &Ctx, node: &str, vmid: u32) -> Reply {
    match unlocked_vm(&ctx.shared.lock(), node, vmid) {
        Err(reply) => return reply,
        Ok(vm) if vm.running => return err(500, format!("VM {vmid} is running - destroy failed")),
        Ok(_) => {}
    }
    spawn_vm_task(ctx, node, vmid, "qmdestroy", move |shared| async move {
        let mut c = shared.lock();
        match c.vms.get(&vmid) {
            Some(vm) if vm.running => Err(format!("VM {vmid} is running - destroy failed")),
            Some(_) => {
                c.vms.remove(&vmid);
                Ok(vec![
                    format!("Removing image: 100% complete...done."),
                    format!("purging VM {vmid} from related configurations.."),
                ])
            }
            None => Err(format!("Configuration file 'nodes/.../qemu-server/{vmid}.conf' does not exist")),
        }
    })
}

/// A task's work under the VM's config file lock, as qemu-server's tasks run: waits
/// 10 s (scaled) for it, else fails with PVE's lock timeout text.
async fn with_config_lock<F>(shared: Arc<Shared>, vmid: u32, work: F) -> Result<Vec<String>, String>
where
    F: std::future::Future<Output = Result<Vec<String>, String>>,
{
    let wait = Duration::from_secs_f64(10.0 * shared.options.lock_wait_scale);
    let Ok(owner) = file_lock(&shared, vmid, wait).await else { return Err(lock_timeout_text(vmid)) };
    let result = work.await;
    file_unlock(&shared, vmid, owner);
    result
}
