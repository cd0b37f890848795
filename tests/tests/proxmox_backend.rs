//! The Proxmox backend against the stand-in, library level: the lifecycle, what the
//! client sends, TLS pinning, errors, retries, VMIDs, placement and the reconciler.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::Path;
use std::time::Duration;

use agentlab_host::backend::proxmox::ProxmoxBackend;
use agentlab_host::backend::proxmox::client::{Method, PveClient};
use agentlab_host::backend::proxmox::config::ProxmoxConfig;
use agentlab_host::backend::proxmox::tls::TlsConfig;
use agentlab_host::backend::{Backend, ChannelEndpoint, ProvisionRequest};
use agentlab_pve_standin::{FaultKind, NodeSpec, Options, StandIn};
use agentlab_tests::pve::{config_for, pinned_tls, write_config_yaml};

fn request(n: u32) -> ProvisionRequest {
    ProvisionRequest {
        sandbox_id: format!("sb-{n:012x}"),
        job_id: format!("job-{n:012x}"),
        template_vmid: 9000,
        bridge: Some("vmbr1".into()),
        console_log: std::path::PathBuf::from("/dev/null"),
        cores: 2,
        memory_mb: 2048,
    }
}

async fn setup(options: Options, dir: &Path) -> (StandIn, ProxmoxConfig) {
    let standin = StandIn::start(options.clone()).await.unwrap();
    let config = config_for(&standin, &options, dir);
    (standin, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifecycle_clones_configures_starts_and_destroys_within_twelve_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (standin, config) = setup(Options::default(), dir.path()).await;
    let backend = ProxmoxBackend::new(config).unwrap();
    let before = backend.client().requests_sent();
    let mut vm = backend.provision(&request(1)).await.unwrap();
    let vms = standin.vms();
    assert_eq!(vms.len(), 1);
    let vmid = vms[0].vmid;
    assert!((100_000..=100_999).contains(&vmid), "{vmid} from the configured range");
    assert_eq!(vm.channel(), ChannelEndpoint::Hybrid { uds: dir.path().join(format!("vsock/vm-{vmid}/vsock.sock")) });
    let cfg = standin.shared.lock().vms[&vmid].config.clone();
    assert_eq!(cfg["name"], "sb-000000000001");
    assert_eq!(cfg["cores"], "2");
    assert_eq!(cfg["memory"], "2048");
    assert_eq!(cfg["net0"], "virtio,bridge=vmbr1");
    assert_eq!(cfg["tags"], "agentlab;sb-000000000001");
    assert_eq!(cfg["args"], format!("-device vhost-vsock-pci,guest-cid={vmid}"));
    assert!(cfg["description"].contains("job-000000000001"), "{cfg:?}");
    assert!(!cfg.contains_key("lock"), "configured only after the clone lock cleared");
    vm.boot().await.unwrap();
    assert!(standin.vms()[0].running);
    vm.destroy().await.unwrap();
    assert_eq!(standin.vms(), vec![]);
    let used = backend.client().requests_sent() - before;
    // One ticket request is made once per daemon, not per lifecycle.
    assert!(used <= 13, "{used} requests for one lifecycle (12 + the one-off ticket)");
    // Which calls those were; only the number of task polls depends on timing.
    let calls: Vec<String> = standin
        .recorded()
        .into_iter()
        .filter(|r| !r.template.contains("/tasks/"))
        .map(|r| format!("{} {}", r.method, r.template))
        .collect();
    assert_eq!(
        calls,
        [
            "GET /cluster/resources",
            "POST /nodes/{node}/qemu/{vmid}/clone",
            "GET /nodes/{node}/qemu/{vmid}/status/current",
            "POST /access/ticket",
            "PUT /nodes/{node}/qemu/{vmid}/config",
            "POST /nodes/{node}/qemu/{vmid}/status/start",
            "POST /nodes/{node}/qemu/{vmid}/status/shutdown",
            "DELETE /nodes/{node}/qemu/{vmid}",
        ]
    );
    assert_eq!(standin.validation_failures(), Vec::<String>::new());

    // The UPIDs: clone's task on the source node with the source vmid, type qmclone,
    // user the full token id.
    let recorded = standin.recorded();
    let clone_status =
        recorded.iter().find(|r| r.template.ends_with("/status") && r.params["upid"].contains(":qmclone:")).unwrap();
    assert!(clone_status.params["upid"].ends_with(":qmclone:9000:agentlab@pve!shim:"), "{:?}", clone_status.params);
    assert_eq!(clone_status.params["node"], "pve1");
    let delete = recorded.iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!((delete.params["purge"].as_str(), delete.params["destroy-unreferenced-disks"].as_str()), ("1", "1"));
    let clone = recorded.iter().find(|r| r.template.ends_with("/clone")).unwrap();
    assert_eq!(clone.params["full"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_the_client_sends_validates_against_the_pve8_schema_too() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { schema_version: 8, ..Options::default() };
    let (standin, config) = setup(options, dir.path()).await;
    let backend = ProxmoxBackend::new(config).unwrap();
    for n in 0..3 {
        let mut req = request(n);
        if n == 2 {
            req.bridge = None; // the `delete=net0` form
        }
        let mut vm = backend.provision(&req).await.unwrap();
        vm.boot().await.unwrap();
        vm.destroy().await.unwrap();
    }
    let mut reconciler = agentlab_host::backend::proxmox::reconcile::Reconciler::new(Duration::from_secs(60));
    let store = agentlab_host::store::Store::open(&dir.path().join("db")).unwrap();
    reconciler.pass(&backend, &store).await.unwrap();
    assert_eq!(standin.validation_failures(), Vec::<String>::new());
    let recorded = standin.recorded();
    assert!(recorded.len() >= 30, "{} requests", recorded.len());
    // And the same requests against the PVE 9 schema.
    let pve9 = agentlab_pve_standin::schema::Schema::load(9).unwrap();
    for r in &recorded {
        pve9.validate(&r.template, &r.method, &r.params)
            .unwrap_or_else(|e| panic!("{} {}: {e:?}", r.method, r.template));
    }
    let kinds: std::collections::BTreeSet<String> =
        recorded.iter().map(|r| format!("{} {}", r.method, r.template)).collect();
    for expected in [
        "POST /nodes/{node}/qemu/{vmid}/clone",
        "PUT /nodes/{node}/qemu/{vmid}/config",
        "POST /nodes/{node}/qemu/{vmid}/status/start",
        "POST /nodes/{node}/qemu/{vmid}/status/shutdown",
        "DELETE /nodes/{node}/qemu/{vmid}",
        "GET /nodes/{node}/tasks/{upid}/status",
        "GET /cluster/resources",
        "POST /access/ticket",
    ] {
        assert!(kinds.contains(expected), "{expected} not exercised: {kinds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_written_for_agentlabd_loads_as_the_same_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (_standin, mut config) = setup(Options::default(), dir.path()).await;
    let path = dir.path().join("config.yaml");
    write_config_yaml(&config, &path);
    // Every field away from config_for's values and the defaults, the rest of TLS too.
    config.token_secret_file = None;
    config.tls = TlsConfig { ca_file: Some(dir.path().join("ca \"1\".pem")), fingerprint: None, insecure: true };
    config.connect_timeout_secs = 7;
    config.request_timeout_secs = 11;
    config.nodes[0].templates.insert(9001, 9101);
    config.vmid_range = [200, 300];
    config.args_via = agentlab_host::backend::proxmox::config::ArgsVia::Qm;
    config.qm_command = vec!["ssh".into(), "root@pve1".into(), "qm".into()];
    config.root_password_file = None;
    config.channel = agentlab_host::backend::proxmox::config::ChannelMode::Vsock;
    config.hybrid_dir = None;
    config.task_timeout_secs = 13;
    config.shutdown_timeout_secs = 17;
    config.reconcile_interval_secs = 19;
    config.orphan_grace_secs = 23;
    config.retry_attempts = 3;
    config.status_poll_secs = 29;
    write_config_yaml(&config, &path);
}

/// A client pinned to the stand-in's certificate that tries each call `attempts` times.
fn client_with_retry(standin: &StandIn, options: &Options, attempts: u32) -> PveClient {
    let retry = agentlab_host::backend::proxmox::client::RetryPolicy { max_attempts: attempts, ..Default::default() };
    connect(standin, options, pinned_tls(standin), retry).unwrap()
}

fn client_with(standin: &StandIn, options: &Options, tls: TlsConfig) -> Result<PveClient, String> {
    connect(standin, options, tls, Default::default())
}

fn connect(
    standin: &StandIn,
    options: &Options,
    tls: TlsConfig,
    retry: agentlab_host::backend::proxmox::client::RetryPolicy,
) -> Result<PveClient, String> {
    let conn = agentlab_host::backend::proxmox::client::ConnectionConfig {
        api_url: standin.url(),
        token_id: options.token_id.clone(),
        token_secret: agentlab_host::backend::proxmox::client::Secret(options.token_secret.clone()),
        tls,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(30),
        retry,
    };
    PveClient::new(&conn).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_pinned_and_insecure_is_the_only_way_around_it() {
    let options = Options::default();
    let standin = StandIn::start(options.clone()).await.unwrap();
    let pinned = client_with(&standin, &options, pinned_tls(&standin)).unwrap();
    let v = pinned.call("reading the version", Method::Get, "/version", &[]).await.unwrap();
    assert_eq!(v["release"], "9.0");

    let wrong =
        client_with(&standin, &options, TlsConfig { fingerprint: Some("AB".repeat(32)), ..TlsConfig::default() })
            .unwrap();
    let e = wrong.call("reading the version", Method::Get, "/version", &[]).await.unwrap_err().to_string();
    assert!(e.starts_with("reading the version: cannot reach the Proxmox API"), "{e}");
    assert!(e.contains(&format!("fingerprint is {}, not the pinned one", standin.fingerprint)), "{e}");
    assert!(!e.contains(" attempts)"), "a refused certificate is not retried: {e}");

    // The stand-in's self-signed certificate is not a CA anyone trusts.
    let ca_dir = tempfile::tempdir().unwrap();
    let other_ca = rcgen_free_ca(ca_dir.path());
    let ca = client_with(&standin, &options, TlsConfig { ca_file: Some(other_ca), ..TlsConfig::default() }).unwrap();
    let e = ca.call("reading the version", Method::Get, "/version", &[]).await.unwrap_err().to_string();
    assert!(e.starts_with("reading the version: cannot reach the Proxmox API"), "{e}");
    assert!(e.contains("invalid peer certificate"), "{e}");
    assert!(!e.contains(" attempts)"), "a refused certificate is not retried: {e}");

    let insecure = client_with(&standin, &options, TlsConfig { insecure: true, ..TlsConfig::default() }).unwrap();
    let v = insecure.call("reading the version", Method::Get, "/version", &[]).await.unwrap();
    assert_eq!(v["release"], "9.0");
}

/// `/cluster/nextid` answers an integer or a string depending on the version: accept both.
fn lenient_u64(value: &serde_json::Value) -> Option<u64> {
    value.as_u64().or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

/// Waits (at most 5 s) for the stand-in's VMs to go, then checks none is left.
async fn wait_until_no_vms(standin: &StandIn) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !standin.vms().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(standin.vms(), vec![]);
}

/// A PEM CA certificate that did not sign the stand-in's certificate.
fn rcgen_free_ca(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("ca.pem");
    let ca = rcgen::generate_simple_self_signed(vec!["unrelated-ca".into()]).unwrap();
    std::fs::write(&path, ca.cert.pem()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_operation_the_vmid_and_proxmoxs_own_words() {
    let options = Options::default();
    let standin = StandIn::start(options.clone()).await.unwrap();
    let client = client_with(&standin, &options, pinned_tls(&standin)).unwrap();
    // A token may not set args, even though the call is otherwise fine.
    standin.plant_vm(123, "pve1", "plain", None);
    let e = client
        .call(
            "setting VM 123's vsock device",
            Method::Put,
            "/nodes/pve1/qemu/123/config",
            &[("args", "-device vhost-vsock-pci,guest-cid=123".into())],
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "setting VM 123's vsock device: Proxmox refused: HTTP 500 only root can set 'args' config"
    );
    // A missing VM: 500 with the config path, no 404.
    let e = client
        .call("reading VM 124's status", Method::Get, "/nodes/pve1/qemu/124/status/current", &[])
        .await
        .unwrap_err();
    assert!(e.is_missing_vm());
    assert_eq!(
        e.to_string(),
        "reading VM 124's status: Proxmox refused: HTTP 500 Configuration file 'nodes/pve1/qemu-server/124.conf' does not exist"
    );
    // A parameter the schema does not know: 400 with the errors map.
    let e = client
        .call("cloning", Method::Post, "/nodes/pve1/qemu/9000/clone", &[("newid", "99".into()), ("linked", "1".into())])
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "cloning: Proxmox refused: HTTP 400 Parameter verification failed.; parameter 'linked': property is not defined in schema and the schema does not allow additional properties; parameter 'newid': value must have a minimum value of 100"
    );
    // Linked clones come from templates only.
    let e = client
        .call(
            "cloning VM 123",
            Method::Post,
            "/nodes/pve1/qemu/123/clone",
            &[("newid", "200".into()), ("full", "0".into())],
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Linked clone feature is not supported for 'VM 123'"), "{e}");
    // A running VM is not destroyed.
    standin.shared.lock().vms.get_mut(&123).unwrap().running = true;
    let e = client.call("destroying VM 123", Method::Delete, "/nodes/pve1/qemu/123", &[]).await.unwrap_err();
    assert!(e.to_string().ends_with("HTTP 500 VM 123 is running - destroy failed"), "{e}");
    // Bad token.
    let mut bad = options.clone();
    bad.token_secret = "wrong".into();
    let bad = client_with(&standin, &bad, TlsConfig { insecure: true, ..TlsConfig::default() }).unwrap();
    let e = bad.call("listing nodes", Method::Get, "/nodes", &[]).await.unwrap_err();
    assert_eq!(e.to_string(), "listing nodes: Proxmox refused: HTTP 401 authentication failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_fails_with_its_exit_status_and_log_and_leaves_no_vm() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { fault_rate: 1.0, fault_kinds: vec![FaultKind::FailingTask], ..Options::default() };
    let (standin, config) = setup(options, dir.path()).await;
    let backend = ProxmoxBackend::new(config).unwrap();
    standin.set_fault_rate(1.0);
    let e = backend.provision(&request(7)).await.err().unwrap().to_string();
    assert!(e.starts_with("cloning template 9000 on node pve1 to VM 100000: task UPID:pve1:"), "{e}");
    assert!(
        e.contains(
            ":qmclone:9000:agentlab@pve!shim: failed: command 'lvcreate' failed: exit code 5 (injected fault 1)"
        ),
        "{e}"
    );
    assert!(e.contains("--- task log (last lines) ---\nTASK ERROR: command 'lvcreate' failed"), "{e}");
    // Proxmox removes a failed clone's VM itself (as the task ends); nothing is left.
    wait_until_no_vms(&standin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmid_taken_by_another_client_moves_the_clone_to_the_next_id() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { fault_rate: 1.0, fault_kinds: vec![FaultKind::VmidRace], ..Options::default() };
    let (standin, config) = setup(options, dir.path()).await;
    let backend = ProxmoxBackend::new(config).unwrap();
    standin.set_fault_rate(1.0);
    // Every clone finds its id taken: the backend tries the next ids, then says so.
    let e = backend.provision(&request(8)).await.err().unwrap().to_string();
    assert!(e.contains("were all taken by other clients first (config file already exists)"), "{e}");
    assert!(e.contains("[100000, 100001, 100002, 100003, 100004, 100005, 100006, 100007]"), "{e}");
    // Only the first attempt races: the clone lands on the next id.
    standin.set_fault_rate(0.0);
    standin.plant_vm(100_008, "pve1", "other-client-100008", None);
    let mut vm = backend.provision(&request(9)).await.unwrap();
    let ours: Vec<u32> = standin.vms().iter().filter(|v| v.tags.is_some()).map(|v| v.vmid).collect();
    assert_eq!(ours, vec![100_009], "100008 was taken and is skipped");
    vm.boot().await.unwrap();
    vm.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmids_taken_by_other_clients_are_freed_however_the_clone_fails() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { fault_rate: 1.0, fault_kinds: vec![FaultKind::VmidRace], ..Options::default() };
    let (standin, mut config) = setup(options, dir.path()).await;
    config.vmid_range = [100_000, 100_001];
    let backend = ProxmoxBackend::new(config).unwrap();
    // Both ids are taken by the other client, and then there is none left to try.
    let e = backend.provision(&request(1)).await.err().unwrap().to_string();
    assert_eq!(e, "Proxmox configuration: every VMID in vmid_range [100000, 100001] is in use: widen it");
    // The other client's VMs go (after 300 ms): both ids are free again.
    standin.set_fault_rate(0.0);
    wait_until_no_vms(&standin).await;
    let a = backend.provision(&request(2)).await.unwrap();
    let b = backend.provision(&request(3)).await.unwrap();
    let mut vmids: Vec<u32> = standin.vms().iter().map(|v| v.vmid).collect();
    vmids.sort_unstable();
    assert_eq!(vmids, [100_000, 100_001]);
    a.destroy().await.unwrap();
    b.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeouts_proxy_errors_and_lost_answers_are_retried_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        fault_rate: 0.3,
        fault_kinds: vec![
            FaultKind::LockTimeout,
            FaultKind::VmLocked,
            FaultKind::Proxy595,
            FaultKind::Proxy596,
            FaultKind::DropConnection,
        ],
        lock_wait_scale: 0.01,
        fault_seed: 7,
        ..Options::default()
    };
    let (standin, config) = setup(options, dir.path()).await;
    let backend = ProxmoxBackend::new(config).unwrap();
    for n in 0..10 {
        let mut vm = backend.provision(&request(n)).await.unwrap();
        vm.boot().await.unwrap();
        vm.destroy().await.unwrap();
    }
    assert_eq!(standin.vms(), vec![]);
    let injected = standin.injected();
    for kind in [FaultKind::LockTimeout, FaultKind::Proxy595, FaultKind::Proxy596, FaultKind::DropConnection] {
        assert!(injected.iter().any(|(k, _)| *k == kind), "{kind:?} never injected: {injected:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_answer_was_lost_and_that_was_repeated_still_boots() {
    let dir = tempfile::tempdir().unwrap();
    // Tasks outlast the client's look at the VM after the lost answer (within 200 ms),
    // so it finds the VM not running yet and starts it again.
    let options = Options { task_duration: Duration::from_secs(1), ..Options::default() };
    let (standin, config) = setup(options, dir.path()).await;
    let backend = ProxmoxBackend::new(config).unwrap();
    let mut vm = backend.provision(&request(1)).await.unwrap();
    let vmid = standin.vms()[0].vmid;
    standin.fault_next("POST", "/nodes/{node}/qemu/{vmid}/status/start", FaultKind::Proxy596);
    vm.boot().await.unwrap();
    assert!(standin.vms()[0].running);
    assert_eq!(standin.injected(), vec![(FaultKind::Proxy596, "Connection timed out".to_owned())]);
    let starts = standin.recorded().iter().filter(|r| r.template.ends_with("/status/start")).count();
    assert_eq!(starts, 2, "the start whose answer was lost is repeated");
    // As on PVE, the second start's task is what fails.
    let mut ends: Vec<Option<String>> = standin
        .shared
        .lock()
        .tasks
        .values()
        .filter(|t| t.upid.kind == "qmstart")
        .map(|t| t.exitstatus.clone())
        .collect();
    ends.sort();
    assert_eq!(ends, [Some("OK".to_owned()), Some(format!("VM {vmid} already running"))]);
    vm.destroy().await.unwrap();
    assert_eq!(standin.vms(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_spreads_by_free_memory_and_uses_each_nodes_template() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        nodes: vec![NodeSpec::new("pve1"), NodeSpec::new("pve2"), NodeSpec::new("pve3")],
        templates: vec![(9000, "pve1".into()), (9001, "pve2".into()), (9002, "pve3".into())],
        ..Options::default()
    };
    let (standin, config) = setup(options, dir.path()).await;
    let backend = ProxmoxBackend::new(config).unwrap();
    standin.set_node_load("pve1", 60 << 30, 0.2);
    standin.set_node_load("pve2", 10 << 30, 0.2);
    standin.set_node_load("pve3", 30 << 30, 0.2);
    let a = backend.provision(&request(1)).await.unwrap();
    assert!(a.shape().contains("on node pve2"), "{}", a.shape());
    // pve2 is now 2 GiB fuller in the shim's books; load pve3 less than pve2.
    standin.set_node_load("pve3", 5 << 30, 0.2);
    let b = backend.provision(&request(2)).await.unwrap();
    assert!(b.shape().contains("on node pve3"), "{}", b.shape());
    // Each clone came from its node's own template.
    let clones: Vec<(String, String)> = standin
        .recorded()
        .into_iter()
        .filter(|r| r.template.ends_with("/clone"))
        .map(|r| (r.params["node"].clone(), r.params["vmid"].clone()))
        .collect();
    assert_eq!(clones, vec![("pve2".to_owned(), "9001".to_owned()), ("pve3".to_owned(), "9002".to_owned())]);
    // A full cluster is explained.
    for n in ["pve1", "pve2", "pve3"] {
        standin.set_node_load(n, 64 << 30, 0.9);
    }
    let e = backend.provision(&request(3)).await.err().unwrap().to_string();
    assert!(
        e.starts_with("placing sandbox sb-000000000003: no node can take a 2048 MiB sandbox (pve1: 0 MiB free"),
        "{e}"
    );
    a.destroy().await.unwrap();
    b.destroy().await.unwrap();
    assert_eq!(standin.vms(), vec![]);
}

/// A job and its sandbox in the store, the sandbox driven to `to`.
fn record_sandbox(store: &agentlab_host::store::Store, n: u32, path: &[agentlab_host::state::SandboxState]) -> String {
    let (job, sb) = (format!("job-{n:012x}"), format!("sb-{n:012x}"));
    store
        .create_job(&agentlab_host::store::NewJob {
            job_id: &job,
            sandbox_id: &sb,
            backend: "proxmox",
            command: "true",
            repo: None,
            timeout_ms: 1000,
            profile: "yolo-ephemeral",
            keepalive: false,
            lease_expires_at_ms: None,
        })
        .unwrap();
    for state in path {
        store.transition_sandbox(&sb, *state, None).unwrap();
    }
    sb
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_marks_vanished_vms_destroys_tagged_orphans_and_leaves_untagged_vms_alone() {
    use agentlab_host::state::{JobState, SandboxState::*};
    use agentlab_host::store::JobEnd;
    let dir = tempfile::tempdir().unwrap();
    let (standin, config) = setup(Options::default(), dir.path()).await;
    let backend = ProxmoxBackend::new(config).unwrap();
    let store = agentlab_host::store::Store::open(&dir.path().join("agentlab.db")).unwrap();

    // 1. A running sandbox whose VM someone deletes behind the shim's back.
    let vanishing = record_sandbox(&store, 1, &[Provisioning, Booting, Ready, Running]);
    let mut vm1 = backend.provision(&request(1)).await.unwrap();
    vm1.boot().await.unwrap();
    let vmid1 = standin.vms()[0].vmid;
    // 2. A running sandbox whose VM is fine.
    let live = record_sandbox(&store, 2, &[Provisioning, Booting, Ready, Running]);
    let mut vm2 = backend.provision(&request(2)).await.unwrap();
    vm2.boot().await.unwrap();
    // 3. A finished job whose teardown failed: its VM is an orphan now.
    let finished = record_sandbox(&store, 3, &[Provisioning, Booting, Ready, Running, Completed]);
    store.transition_job("job-000000000003", JobState::Running, None, None).unwrap();
    store.transition_job("job-000000000003", JobState::Completed, Some(&JobEnd::default()), None).unwrap();
    let vm3 = backend.provision(&request(3)).await.unwrap();
    // 4. A tagged VM nobody knows (a previous daemon's), and 5. two VMs that are not ours.
    standin.plant_vm(100_900, "pve1", "sb-0000000000ff", Some("agentlab;sb-0000000000ff"));
    standin.plant_vm(777, "pve1", "databases", None);
    standin.plant_vm(778, "pve1", "web", Some("prod;sb-000000000002"));
    assert!(standin.delete_behind_back(vmid1));

    let mut reconciler = agentlab_host::backend::proxmox::reconcile::Reconciler::new(Duration::from_secs(1));
    let first = reconciler.pass(&backend, &store).await.unwrap();
    assert_eq!(first.vanished, vec![vanishing.clone()]);
    assert_eq!(first.destroyed, Vec::<u32>::new(), "orphans get their grace period first");
    let vmid3 = standin.vms().iter().find(|v| v.name.as_deref() == Some(finished.as_str())).unwrap().vmid;
    let mut waiting = first.waiting.clone();
    waiting.sort_unstable();
    assert_eq!(waiting, vec![vmid3, 100_900]);
    let view = store.sandboxes().unwrap().into_iter().find(|s| s.id == vanishing).unwrap();
    assert_eq!(view.state, Failed);
    let job = store.job("job-000000000001").unwrap();
    let event = job.events.iter().find(|e| e.kind == "sandbox.vm_vanished").unwrap();
    assert!(event.message.as_deref().unwrap().starts_with("its VM vanished"), "{event:?}");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = reconciler.pass(&backend, &store).await.unwrap();
    let mut destroyed = second.destroyed.clone();
    destroyed.sort_unstable();
    assert_eq!(destroyed, vec![vmid3, 100_900]);
    let mut left: Vec<(u32, Option<String>)> = standin.vms().into_iter().map(|v| (v.vmid, v.tags)).collect();
    left.sort_unstable();
    let live_vmid = left.iter().find(|(_, t)| t.as_deref() == Some(&format!("agentlab;{live}"))).unwrap().0;
    assert_eq!(
        left,
        vec![
            (777, None),
            (778, Some("prod;sb-000000000002".to_owned())),
            (live_vmid, Some(format!("agentlab;{live}"))),
        ],
        "untagged and foreign VMs and the live sandbox's VM are untouched"
    );
    let view = store.sandboxes().unwrap().into_iter().find(|s| s.id == finished).unwrap();
    assert_eq!(view.state, Destroyed, "the finished sandbox is settled with its VM");
    drop(vm3);
    vm2.destroy().await.unwrap();
    // The vanished VM's teardown finds nothing to do.
    vm1.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn args_via_qm_runs_qm_set_and_a_failure_is_explained_and_cleaned_up() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (standin, mut config) = setup(Options::default(), dir.path()).await;
    // Stands in for the node's `qm`: records its arguments, fails on demand.
    let qm = dir.path().join("qm");
    let log = dir.path().join("qm.log");
    let fail = dir.path().join("qm-fail");
    std::fs::write(
        &qm,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nif [ -e {} ]; then echo \"400 Parameter verification failed.\" >&2; exit 255; fi\n",
            log.display(),
            fail.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&qm, std::fs::Permissions::from_mode(0o755)).unwrap();
    config.args_via = agentlab_host::backend::proxmox::config::ArgsVia::Qm;
    config.qm_command = vec![qm.display().to_string()];
    let backend = ProxmoxBackend::new(config).unwrap();
    let vm = backend.provision(&request(1)).await.unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "set 100000 --args -device vhost-vsock-pci,guest-cid=100000\n");
    // The token set everything else, and never tried args; no root ticket was needed.
    let recorded = standin.recorded();
    let put = recorded.iter().find(|r| r.method == "PUT").unwrap();
    assert!(!put.params.contains_key("args"), "{:?}", put.params);
    assert_eq!(put.params["tags"], "agentlab;sb-000000000001");
    assert!(recorded.iter().all(|r| r.template != "/access/ticket"));
    vm.destroy().await.unwrap();

    std::fs::write(&fail, "").unwrap();
    let e = backend.provision(&request(2)).await.err().unwrap().to_string();
    assert_eq!(
        e,
        format!(
            "setting VM 100001's vsock device on node pve1 with qm: `{} set 100001 --args -device vhost-vsock-pci,guest-cid=100001` failed (exit status: 255): 400 Parameter verification failed.",
            qm.display()
        )
    );
    assert_eq!(standin.vms(), vec![], "the half-made VM is destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stand_in_locks_like_pve_and_nextid_reserves_nothing() {
    let options = Options { task_duration: Duration::from_millis(400), lock_wait_scale: 0.05, ..Options::default() };
    let standin = StandIn::start(options.clone()).await.unwrap();
    let client = client_with(&standin, &options, pinned_tls(&standin)).unwrap();

    // nextid hands the same id to everyone until a VM takes it.
    let a = client.call("nextid", Method::Get, "/cluster/nextid", &[]).await.unwrap();
    let b = client.call("nextid", Method::Get, "/cluster/nextid", &[]).await.unwrap();
    assert_eq!((lenient_u64(&a), lenient_u64(&b)), (Some(100), Some(100)));
    let e = client.call("nextid", Method::Get, "/cluster/nextid", &[("vmid", "9000".into())]).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "nextid: Proxmox refused: HTTP 400 Parameter verification failed.; parameter 'vmid': VM 9000 already exists"
    );

    // During a clone the new VM carries `lock: clone`, and config changes are refused.
    let upid = client
        .call("cloning", Method::Post, "/nodes/pve1/qemu/9000/clone", &[("newid", "300".into()), ("full", "0".into())])
        .await
        .unwrap();
    let upid = upid.as_str().unwrap().to_owned();
    assert!(upid.starts_with("UPID:pve1:") && upid.ends_with(":qmclone:9000:agentlab@pve!shim:"), "{upid}");
    let status = client.call("status", Method::Get, "/nodes/pve1/qemu/300/status/current", &[]).await.unwrap();
    assert_eq!(status["lock"], "clone");
    // One attempt, to see Proxmox's refusal itself (the backend retries it).
    let once = client_with_retry(&standin, &options, 1);
    let e = once.call("configuring VM 300", Method::Put, "/nodes/pve1/qemu/300/config", &[("cores", "2".into())]).await;
    assert_eq!(e.unwrap_err().to_string(), "configuring VM 300: Proxmox refused: HTTP 500 VM is locked (clone)");
    // Retried, it goes through once the clone is done.
    client
        .call("configuring VM 300", Method::Put, "/nodes/pve1/qemu/300/config", &[("cores", "2".into())])
        .await
        .unwrap();
    let task = agentlab_host::backend::proxmox::upid::Upid::parse(&upid).unwrap();
    agentlab_host::backend::proxmox::task::wait(&client, "cloning", &task, Duration::from_secs(10)).await.unwrap();
    let status = client.call("status", Method::Get, "/nodes/pve1/qemu/300/status/current", &[]).await.unwrap();
    assert!(status.get("lock").is_none(), "{status}");

    // A held config lock: PUT waits 10 s (x0.05 here) per attempt, and after the
    // attempts the error carries the lock file's path and the attempt count.
    standin.shared.lock().file_locks.insert(300, u64::MAX);
    let started = std::time::Instant::now();
    let e = client
        .call("configuring VM 300", Method::Put, "/nodes/pve1/qemu/300/config", &[("cores", "2".into())])
        .await
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() >= Duration::from_millis(6 * 500), "{:?}", started.elapsed());
    assert_eq!(
        e,
        "configuring VM 300: Proxmox refused: HTTP 500 can't lock file '/var/lock/qemu-server/lock-300.conf' - got timeout (after 6 attempts)"
    );
    // Tasks take the lock too: a start waits for it inside its task, then fails.
    let upid = client.call("starting VM 300", Method::Post, "/nodes/pve1/qemu/300/status/start", &[]).await.unwrap();
    let task = agentlab_host::backend::proxmox::upid::Upid::parse(upid.as_str().unwrap()).unwrap();
    assert_eq!((task.kind.as_str(), task.id.as_str()), ("qmstart", "300"));
    let e = agentlab_host::backend::proxmox::task::wait(&client, "starting VM 300", &task, Duration::from_secs(10))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "starting VM 300: task {task} failed: can't lock file '/var/lock/qemu-server/lock-300.conf' - got timeout"
        )),
        "{e}"
    );
    assert!(e.ends_with("TASK ERROR: can't lock file '/var/lock/qemu-server/lock-300.conf' - got timeout"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_pve_without_json_messages_still_gives_its_text_and_warnings_are_success() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { legacy_errors: true, task_warnings: true, ..Options::default() };
    let (standin, config) = setup(options.clone(), dir.path()).await;
    let client = client_with_retry(&standin, &options, 1);
    let e = client.call("reading VM 124's status", Method::Get, "/nodes/pve1/qemu/124/status/current", &[]).await;
    assert_eq!(
        e.unwrap_err().to_string(),
        "reading VM 124's status: Proxmox refused: HTTP 500 Configuration file 'nodes/pve1/qemu-server/124.conf' does not exist"
    );
    // Every task ends `WARNINGS: 1`: the lifecycle goes through all the same.
    let backend = ProxmoxBackend::new(config).unwrap();
    let mut vm = backend.provision(&request(1)).await.unwrap();
    let warnings = vm.take_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("cloning template 9000 on node pve1 to VM 100000: task UPID:pve1:"),
        "{warnings:?}"
    );
    assert!(
        warnings[0]
            .contains(":qmclone:9000:agentlab@pve!shim: succeeded with 1 warning(s)\n--- task log (last lines) ---\n"),
        "{warnings:?}"
    );
    assert!(
        warnings[0].ends_with("WARN: volume 'local-lvm:vm-disk' is not fully trimmed\nTASK WARNINGS: 1"),
        "{warnings:?}"
    );
    assert_eq!(vm.take_warnings(), Vec::<String>::new(), "each warning is taken once");
    vm.boot().await.unwrap();
    assert!(vm.take_warnings()[0].starts_with("starting VM 100000 on node pve1: task"));
    vm.destroy().await.unwrap();
    assert_eq!(standin.vms(), vec![]);
    let statuses =
        standin.shared.lock().tasks.values().map(|t| t.exitstatus.clone().unwrap_or_default()).collect::<Vec<_>>();
    assert!(statuses.len() >= 4 && statuses.iter().all(|s| s == "WARNINGS: 1"), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shared_listing_watches_every_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (standin, mut config) = setup(Options::default(), dir.path()).await;
    config.status_poll_secs = 1;
    let backend = ProxmoxBackend::new(config).unwrap();
    let mut vms = Vec::new();
    for n in 0..20 {
        let mut vm = backend.provision(&request(n)).await.unwrap();
        vm.boot().await.unwrap();
        vms.push(vm);
    }
    let listings = || standin.recorded().iter().filter(|r| r.params.get("type").is_some_and(|t| t == "vm")).count();
    let before = listings();
    // 20 watchers for 3.5 s: none of their VMs stops.
    let watched = futures::future::join_all(
        vms.iter_mut().map(|vm| tokio::time::timeout(Duration::from_millis(3500), vm.exited())),
    )
    .await;
    assert!(watched.iter().all(Result::is_err), "a running VM was reported stopped");
    let polls = listings() - before;
    assert!((3..=5).contains(&polls), "{polls} listings for 20 VMs over 3.5 s at one per second");
    // A VM stopped outside AgentLab is noticed by the next listing.
    let vmid = standin.vms()[3].vmid;
    standin.shared.lock().vms.get_mut(&vmid).unwrap().running = false;
    let exit = tokio::time::timeout(Duration::from_secs(5), vms[3].exited()).await.unwrap();
    assert_eq!(exit.description, format!("VM {vmid} on node pve1 is stopped"));
    for vm in vms {
        vm.destroy().await.unwrap();
    }
    assert_eq!(standin.vms(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_root_ticket_is_renewed_once_and_a_wrong_password_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let (standin, config) = setup(Options::default(), dir.path()).await;
    let backend = ProxmoxBackend::new(config.clone()).unwrap();
    backend.provision(&request(1)).await.unwrap().destroy().await.unwrap();
    // Every ticket issued so far stops working.
    standin.shared.lock().tickets.clear();
    backend.provision(&request(2)).await.unwrap().destroy().await.unwrap();
    let logins = standin.recorded().iter().filter(|r| r.template == "/access/ticket").count();
    assert_eq!(logins, 2, "one login, one renewal");

    std::fs::write(config.root_password_file.as_ref().unwrap(), "wrong").unwrap();
    let backend = ProxmoxBackend::new(config).unwrap();
    let e = backend.provision(&request(3)).await.err().unwrap().to_string();
    assert_eq!(e, "logging in as root@pam to set VM 100000's args: Proxmox refused: HTTP 401 authentication failure");
    assert_eq!(standin.vms(), vec![], "the VM made before the failed login is destroyed");
}
