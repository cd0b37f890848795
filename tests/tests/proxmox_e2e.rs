//! End to end with the Proxmox backend: the real CLI and agentlabd (`--backend
//! proxmox`) against the PVE stand-in. In boot mode the stand-in's `status/start`
//! boots a real microVM with the real agent; in no-boot mode its guests are instant
//! fake agents, for the fault soak.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::Path;
use std::time::{Duration, Instant};

use agentlab_host::state::{JobState, SandboxState};
use agentlab_pve_standin::{FaultKind, GuestMode, NodeSpec, Options, StandIn};
use agentlab_tests::pve::{config_for, write_config_yaml};
use agentlab_tests::{Daemon, describe, image_dir};
use serde_json::Value;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A stand-in whose guests are real microVMs with the real agent, sockets in `dir`.
fn booting_standin(rt: &tokio::runtime::Runtime, dir: &Path) -> (StandIn, Options) {
    let options = Options {
        guest: GuestMode::Boot { hybrid_dir: dir.join("vsock"), image_dir: image_dir() },
        ..Options::default()
    };
    (rt.block_on(StandIn::start(options.clone())).unwrap(), options)
}

/// A stand-in whose guests are instant fake agents, with their sockets in `dir`.
fn fake_guest_standin(rt: &tokio::runtime::Runtime, dir: &Path) -> (StandIn, Options) {
    let options = Options { guest: GuestMode::Fake { hybrid_dir: dir.join("vsock") }, ..Options::default() };
    (rt.block_on(StandIn::start(options.clone())).unwrap(), options)
}

/// Starts agentlabd with the proxmox backend configured for `standin`.
fn daemon_for(standin: &StandIn, options: &Options, dir: &Path) -> Daemon {
    Daemon::start_with(&daemon_args(standin, options, dir).iter().map(String::as_str).collect::<Vec<_>>())
}

/// agentlabd's arguments for the proxmox backend against `standin` (config in `dir`).
fn daemon_args(standin: &StandIn, options: &Options, dir: &Path) -> Vec<String> {
    let config = config_for(standin, options, dir);
    let path = dir.join("config.yaml");
    write_config_yaml(&config, &path);
    vec!["--backend".into(), "proxmox".into(), "--config".into(), path.display().to_string()]
}

#[test]
fn a_job_submitted_with_the_proxmox_backend_runs_in_a_real_microvm_and_its_vm_is_destroyed() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (standin, options) = booting_standin(&rt, dir.path());
    let d = daemon_for(&standin, &options, dir.path());
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "echo hello-through-proxmox; uname -r; cat /proc/cmdline"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let kernel = std::fs::read_to_string(image_dir().join("kernel-release")).unwrap().trim().to_owned();
    assert!(text.starts_with(&format!("hello-through-proxmox\n{kernel}\n")), "{text}");
    assert_ne!(kernel, agentlab_tests::host_kernel());

    let jobs: Value = serde_json::from_slice(&d.cli(&["--json", "job", "list"]).stdout).unwrap();
    let job = d.job_json(jobs[0]["id"].as_str().unwrap());
    assert_eq!(job["state"], "COMPLETED");
    assert_eq!(job["guest_kernel"], kernel.as_str());
    let provisioned = job["events"].as_array().unwrap().iter().find(|e| e["kind"] == "sandbox.provisioned").unwrap();
    assert!(provisioned["message"].as_str().unwrap().contains("VM 100000 on node pve1"), "{provisioned}");
    d.wait_for_teardowns();
    let sandboxes: Value = serde_json::from_slice(&d.cli(&["--json", "sandbox", "list"]).stdout).unwrap();
    assert_eq!(sandboxes[0]["state"], "DESTROYED");
    assert_eq!(sandboxes[0]["backend"], "proxmox");
    // The VM is gone from Proxmox, and with it its microVM and devices.
    assert_eq!(standin.vms(), vec![]);
    assert_eq!(standin.validation_failures(), Vec::<String>::new());
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::read_dir(dir.path().join("vsock")).unwrap().flatten().any(|e| e.path().is_dir()) {
        assert!(Instant::now() < deadline, "the VM's hybrid vsock directory was not removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    // What went over the API: the lifecycle, in order.
    let calls: Vec<String> = standin
        .recorded()
        .into_iter()
        .filter(|r| !r.template.contains("/tasks/") && !r.template.ends_with("/status/current"))
        // The reconciler's passes.
        .filter(|r| r.params.get("type").is_none_or(|t| t != "vm"))
        .map(|r| format!("{} {}", r.method, r.template))
        .collect();
    assert_eq!(
        calls,
        [
            "GET /version",
            "GET /cluster/resources",
            "POST /nodes/{node}/qemu/{vmid}/clone",
            "POST /access/ticket",
            "PUT /nodes/{node}/qemu/{vmid}/config",
            "POST /nodes/{node}/qemu/{vmid}/status/start",
            "POST /nodes/{node}/qemu/{vmid}/status/shutdown",
            "DELETE /nodes/{node}/qemu/{vmid}",
        ]
    );
}

#[test]
fn an_agent_that_never_dials_in_is_explained_for_proxmox() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    // Guests that start but run nothing: no agent will dial in.
    let options = Options { guest: GuestMode::None, ..Options::default() };
    let standin = rt.block_on(StandIn::start(options.clone())).unwrap();
    let config = config_for(&standin, &options, dir.path());
    let path = dir.path().join("config.yaml");
    write_config_yaml(&config, &path);
    let d = Daemon::start_with(&["--backend", "proxmox", "--config", path.to_str().unwrap(), "--boot-timeout", "2s"]);
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the guest agent did not dial in within 2 s; VM 100000 on node pve1 was started but its agent never connected on the hybrid vsock socket"), "{err}");
    assert!(err.contains("that `qm config 100000` shows args: -device vhost-vsock-pci,guest-cid=100000"), "{err}");
    assert_eq!(standin.vms(), vec![]);
}

#[test]
fn a_missing_proxmox_section_and_a_bad_config_are_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, "{}\n").unwrap();
    let out = std::process::Command::new(agentlab_tests::bin("agentlabd"))
        .args(["--state-dir", dir.path().to_str().unwrap(), "--backend", "proxmox", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("--backend proxmox needs a `proxmox:` section in {}", path.display())), "{err}");
    std::fs::write(&path, "proxmox:\n  api_url: https://pve1:8006\n  token_id: a@pve!t\n  nodes: [{name: pve1}]\n  vmid_range: [100, 50]\n  tls: {insecure: true}\n").unwrap();
    let out = std::process::Command::new(agentlab_tests::bin("agentlabd"))
        .args(["--state-dir", dir.path().to_str().unwrap(), "--backend", "proxmox", "--config", path.to_str().unwrap()])
        .env("AGENTLAB_PVE_TOKEN_SECRET", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmid_range [100, 50] must be within 100..=999999999, first <= last"), "{err}");
}

/// 200 lifecycles with about 10% of requests meeting a fault of every kind.
#[test]
fn fault_soak_200_lifecycles_leave_no_vm_and_every_failure_names_the_injected_fault() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        guest: GuestMode::Fake { hybrid_dir: dir.path().join("vsock") },
        fault_rate: 0.1,
        fault_kinds: FaultKind::ALL.to_vec(),
        fault_seed: std::env::var("AGENTLAB_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(2026),
        lock_wait_scale: 0.05,
        task_duration: Duration::from_millis(10),
        // Room for 200 sandboxes of 4 GiB at once.
        nodes: vec![NodeSpec { maxmem: 4 << 40, ..NodeSpec::new("pve1") }],
        ..Options::default()
    };
    let standin = rt.block_on(StandIn::start(options.clone())).unwrap();
    let d = daemon_for(&standin, &options, dir.path());
    const JOBS: usize = 200;
    for i in 0..JOBS {
        let out = d.cli(&["--json", "job", "submit", "--cmd", &format!("echo soak-{i}")]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    let store = agentlab_host::store::Store::open(&d.state.path().join("agentlab.db")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let jobs = loop {
        let jobs = store.jobs(10_000).unwrap();
        assert_eq!(jobs.len(), JOBS);
        if jobs.iter().all(|j| j.state.is_terminal()) {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "jobs still running: {:?}",
            jobs.iter().filter(|j| !j.state.is_terminal()).map(|j| (&j.id, j.state)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Teardowns that met a permanent fault are finished by the reconciler (grace 2 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = standin.vms();
        let unsettled: Vec<_> = store
            .sandboxes()
            .unwrap()
            .into_iter()
            .filter(|s| s.state != SandboxState::Destroyed)
            .map(|s| (s.id, s.state))
            .collect();
        if left.is_empty() && unsettled.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: VMs {left:?}, sandboxes {unsettled:?}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let injected = standin.injected();
    let failed: Vec<_> = jobs.iter().filter(|j| j.state != JobState::Completed).collect();
    for job in &failed {
        let error = job.error.as_deref().unwrap_or_default();
        assert!(
            injected.iter().any(|(_, message)| error.contains(message.as_str())),
            "job {} failed without an injected Proxmox message: {error}",
            job.id
        );
    }
    let completed = JOBS - failed.len();
    let kinds: std::collections::BTreeSet<String> = injected.iter().map(|(k, _)| format!("{k:?}")).collect();
    eprintln!(
        "soak: {completed} completed, {} failed, {} faults injected in {} requests ({kinds:?})",
        failed.len(),
        injected.len(),
        standin.requests()
    );
    assert_eq!(kinds.len(), FaultKind::ALL.len(), "every kind of fault was injected: {kinds:?}");
    assert!(completed >= JOBS / 2, "only {completed} of {JOBS} completed");
    assert_eq!(standin.validation_failures(), Vec::<String>::new());
}

/// The daemon's own reconciler (every second here): a VM deleted behind its back fails
/// its job with that reason, a tagged orphan goes after the grace period (2 s), and an
/// untagged VM stays.
#[test]
fn the_daemons_reconciler_handles_a_vanished_vm_and_an_orphan_and_leaves_untagged_vms() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (standin, options) = fake_guest_standin(&rt, dir.path());
    standin.plant_vm(100_900, "pve1", "sb-0000000000ff", Some("agentlab;sb-0000000000ff"));
    standin.plant_vm(555, "pve1", "databases", None);
    let d = daemon_for(&standin, &options, dir.path());
    let (job_id, sandbox_id) = d.submit_running("sleep 60");
    let vmid =
        standin.vms().iter().find(|v| v.tags.as_deref() == Some(&format!("agentlab;{sandbox_id}"))).unwrap().vmid;
    assert!(standin.delete_behind_back(vmid));
    let job = d.wait_for_job_end(&job_id);
    assert_eq!(job["state"], "FAILED");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains(&format!("VM {vmid} on node pve1 no longer exists (deleted outside AgentLab)")), "{error}");
    let vanished = job["events"].as_array().unwrap().iter().find(|e| e["kind"] == "sandbox.vm_vanished");
    assert_eq!(
        vanished.map(|e| e["message"].as_str()),
        Some(Some(
            "its VM vanished: no VM tagged with this sandbox is listed in /cluster/resources (deleted outside AgentLab?)"
        )),
        "the reconciler marked it: {job}"
    );
    // The orphan goes; the untagged VM stays.
    let deadline = Instant::now() + Duration::from_secs(30);
    while standin.vms().iter().any(|v| v.vmid == 100_900) {
        assert!(Instant::now() < deadline, "the orphan was not destroyed: {}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<u32> = standin.vms().iter().map(|v| v.vmid).collect();
    assert_eq!(left, vec![555]);
}

/// Waits until the sandbox is DESTROYED and the stand-in has no VM left.
fn wait_until_destroyed(d: &Daemon, standin: &StandIn, sandbox_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sandboxes: Value = serde_json::from_slice(&d.cli(&["--json", "sandbox", "list"]).stdout).unwrap();
        let sb = sandboxes.as_array().unwrap().iter().find(|s| s["id"] == sandbox_id).unwrap().clone();
        if standin.vms().is_empty() && sb["state"] == "DESTROYED" {
            break;
        }
        assert!(Instant::now() < deadline, "VMs {:?}, sandbox {sb}\n{}", standin.vms(), d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kill -9` of agentlabd mid-job: the restarted daemon finds the job's VM through the
/// API, the real agent re-dials, and the job ends with every line of its output once.
#[test]
fn after_a_daemon_crash_the_restarted_daemon_takes_the_proxmox_job_back() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (standin, options) = booting_standin(&rt, dir.path());
    let mut d = daemon_for(&standin, &options, dir.path());
    let (job_id, sandbox_id) = d.submit_running("for i in $(seq 1 40); do echo line-$i; sleep 0.1; done");
    d.wait_for_output(&job_id);

    d.kill_and_restart();
    let job = d.wait_for_job_end(&job_id);
    assert_eq!(job["state"], "COMPLETED", "{job:#}\n{}", d.log());
    let expected: String = (1..=40).map(|i| format!("line-{i}\n")).collect();
    let logs = d.cli(&["logs", &job_id]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), expected);
    let resuming = agentlab_tests::event_messages(&job, "job.resuming");
    assert_eq!(resuming.len(), 1, "{job:#}");
    assert!(resuming[0].starts_with("agentlabd restarted; waiting for the agent to dial back in"), "{resuming:?}");
    wait_until_destroyed(&d, &standin, &sandbox_id);
    assert_eq!(standin.validation_failures(), Vec::<String>::new());
}

/// A Proxmox VM that is gone or stopped when agentlabd comes back: the job fails with
/// that reason at once, and the reconciler settles the sandbox.
#[test]
fn after_a_daemon_crash_a_job_whose_vm_went_fails_with_the_reason() {
    a_job_whose_vm_changed_while_agentlabd_was_down_fails(
        |standin, vmid| assert!(standin.delete_behind_back(vmid)),
        |sandbox_id, _| format!("no VM tagged with sandbox {sandbox_id} is listed in /cluster/resources"),
    );
}

#[test]
fn after_a_daemon_crash_a_job_whose_vm_stopped_fails_with_the_reason() {
    a_job_whose_vm_changed_while_agentlabd_was_down_fails(
        |standin, vmid| standin.shared.lock().vms.get_mut(&vmid).unwrap().running = false,
        |_, vmid| format!("its VM {vmid} on node pve1 is stopped"),
    );
}

fn a_job_whose_vm_changed_while_agentlabd_was_down_fails(
    change: impl FnOnce(&StandIn, u32),
    why: impl FnOnce(&str, u32) -> String,
) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (standin, options) = fake_guest_standin(&rt, dir.path());
    let mut d = daemon_for(&standin, &options, dir.path());
    let (job_id, sandbox_id) = d.submit_running("sleep 60");
    assert_eq!(standin.vms().len(), 1);

    d.kill();
    let vmid = standin.vms()[0].vmid;
    change(&standin, vmid);
    d.restart();
    let job = d.wait_for_job_end(&job_id);
    assert_eq!(job["state"], "FAILED");
    assert_eq!(job["error"], format!("agentlabd restarted and cannot take the job back: {}", why(&sandbox_id, vmid)));
    wait_until_destroyed(&d, &standin, &sandbox_id);
}

/// Tasks that end `WARNINGS: N` succeed, and their warnings land in the job's record.
#[test]
fn task_warnings_are_kept_with_the_job_and_it_still_completes() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        guest: GuestMode::Fake { hybrid_dir: dir.path().join("vsock") },
        task_warnings: true,
        ..Options::default()
    };
    let standin = rt.block_on(StandIn::start(options.clone())).unwrap();
    let d = daemon_for(&standin, &options, dir.path());
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "echo warned"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "fake-agent ran: echo warned\n");
    let jobs: Value = serde_json::from_slice(&d.cli(&["--json", "job", "list"]).stdout).unwrap();
    let job = d.job_json(jobs[0]["id"].as_str().unwrap());
    assert_eq!(job["state"], "COMPLETED");
    let warnings = agentlab_tests::event_messages(&job, "sandbox.warning");
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with("cloning template 9000 on node pve1 to VM 100000: task UPID:pve1:"),
        "{warnings:?}"
    );
    assert!(warnings[1].starts_with("starting VM 100000 on node pve1: task UPID:pve1:"), "{warnings:?}");
    assert!(warnings.iter().all(|w| w.contains("succeeded with 1 warning(s)") && w.ends_with("TASK WARNINGS: 1")));
    assert_eq!(standin.vms(), vec![]);
}

/// The stand-in as a program: it prints how to reach it, and serves.
#[test]
fn the_pve_standin_binary_prints_its_address_fingerprint_and_token_and_serves() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(agentlab_tests::bin("pve-standin"))
        .args(["--nodes", "2", "--pve", "8"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let info: Value = serde_json::from_str(&line).unwrap();
    let (token_id, secret) = info["token"].as_str().unwrap().split_once('=').unwrap();
    use agentlab_host::backend::proxmox::client::{ConnectionConfig, Method, PveClient, Secret};
    let client = PveClient::new(&ConnectionConfig {
        api_url: info["url"].as_str().unwrap().to_owned(),
        token_id: token_id.to_owned(),
        token_secret: Secret(secret.to_owned()),
        tls: agentlab_host::backend::proxmox::tls::TlsConfig {
            fingerprint: Some(info["fingerprint"].as_str().unwrap().to_owned()),
            ..Default::default()
        },
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        retry: Default::default(),
    })
    .unwrap();
    let rt = runtime();
    let nodes = rt.block_on(client.call("listing nodes", Method::Get, "/nodes", &[])).unwrap();
    let names: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(names, ["pve1", "pve2"]);
    let version = rt.block_on(client.call("version", Method::Get, "/version", &[])).unwrap();
    assert_eq!(version["release"], "8.0");
    let _ = child.kill();
    let _ = child.wait();
}
