//! `make bench`'s Proxmox section: agentlabd with the proxmox backend against the
//! stand-in in no-boot mode (instant fake agents on hybrid vsock), so the figures are
//! the shim's own cost, not a guest's boot.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentlab_host::state::{JobState, SandboxState};
use agentlab_host::store::Store;
use agentlab_pve_standin::{GuestMode, NodeSpec, Options, StandIn};

use crate::pve::{config_for, write_config_yaml};

const SEQUENTIAL: usize = 20;
const CONCURRENT: usize = 50;
const LIVE: usize = 500;

struct Agentlabd {
    child: Child,
    socket: std::path::PathBuf,
    db: std::path::PathBuf,
    bin_dir: std::path::PathBuf,
}

impl Agentlabd {
    fn submit(&self, cmd: &str, follow: bool) {
        let mut c = Command::new(self.bin_dir.join("agentlab"));
        c.arg("--socket").arg(&self.socket);
        if follow {
            c.args(["job", "submit", "--follow", "--cmd", cmd]);
        } else {
            c.args(["--json", "job", "submit", "--cmd", cmd]);
        }
        let out = c.stdout(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// `agentlab job submit` started, not waited for.
    fn spawn_submit(&self, cmd: &str) -> Child {
        Command::new(self.bin_dir.join("agentlab"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["--json", "job", "submit", "--cmd", cmd])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait_for(&self, what: &str, done: impl Fn(&Store) -> bool) {
        let store = Store::open(&self.db).unwrap();
        let deadline = Instant::now() + Duration::from_secs(600);
        while !done(&store) {
            assert!(Instant::now() < deadline, "bench: {what} did not happen within 600 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agentlabd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// API requests the shim's lifecycles made (the shared VM listings of the reconciler
/// and the state watch, and the one-off root@pam login, aside).
fn lifecycle_requests(standin: &StandIn) -> usize {
    standin
        .recorded()
        .iter()
        .filter(|r| r.params.get("type").is_none_or(|t| t != "vm") && r.template != "/access/ticket")
        .count()
}

fn status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(field)).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

/// The resident memory of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

pub async fn proxmox_figures(bin_dir: &Path, profiles_dir: &Path) {
    let scratch = tempfile::Builder::new().prefix("agentlab-bench-pve-").tempdir().unwrap();
    let options = Options {
        guest: GuestMode::Fake { hybrid_dir: scratch.path().join("vsock") },
        nodes: vec![NodeSpec { maxmem: 16 << 40, ..NodeSpec::new("pve1") }],
        task_duration: Duration::from_millis(10),
        ..Options::default()
    };
    let standin = StandIn::start(options.clone()).await.unwrap();
    let mut config = config_for(&standin, &options, scratch.path());
    config.reconcile_interval_secs = 3600;
    config.status_poll_secs = 5;
    let config_path = scratch.path().join("config.yaml");
    write_config_yaml(&config, &config_path);
    let state = scratch.path().join("state");
    let socket = state.join("agentlabd.sock");
    let child = Command::new(bin_dir.join("agentlabd"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--profiles-dir")
        .arg(profiles_dir)
        .args(["--backend", "proxmox", "--config"])
        .arg(&config_path)
        .env("AGENTLAB_LOG", "error")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Agentlabd { child, socket: socket.clone(), db: state.join("agentlab.db"), bin_dir: bin_dir.to_owned() };
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kib(d.child.id());
    println!(
        "proxmox: stand-in in no-boot mode (fake agents, {} ms tasks), one node",
        options.task_duration.as_millis()
    );

    // Requests per lifecycle and the one-at-a-time rate.
    let before = lifecycle_requests(&standin);
    let started = Instant::now();
    let d_ref = &d;
    tokio::task::block_in_place(|| {
        for i in 0..SEQUENTIAL {
            d_ref.submit(&format!("echo seq-{i}"), true);
        }
    });
    let sequential_s = started.elapsed().as_secs_f64();
    let per_lifecycle = (lifecycle_requests(&standin) - before) as f64 / SEQUENTIAL as f64;
    println!("proxmox: API requests per sandbox lifecycle {per_lifecycle:8.1}    (mean of {SEQUENTIAL}; goal <= 12)");
    assert!(standin.vms().is_empty());

    // Lifecycles per second, 50 submitted at once (the CLIs started together), against
    // one at a time; median of 3 rounds.
    let mut rates = Vec::new();
    for round in 0..3 {
        let started = Instant::now();
        tokio::task::block_in_place(|| {
            let clis: Vec<Child> =
                (0..CONCURRENT).map(|i| d_ref.spawn_submit(&format!("echo par-{round}-{i}"))).collect();
            for mut cli in clis {
                assert!(cli.wait().unwrap().success());
            }
            d_ref.wait_for("50 concurrent lifecycles", |s| {
                let jobs = s.jobs(10_000).unwrap();
                let sandboxes = s.sandboxes().unwrap();
                jobs.iter().all(|j| j.state.is_terminal())
                    && sandboxes.iter().all(|sb| sb.state == SandboxState::Destroyed)
            });
        });
        rates.push(CONCURRENT as f64 / started.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    let rate = rates[1];
    let sequential_rate = SEQUENTIAL as f64 / sequential_s;
    println!(
        "proxmox: lifecycles/s at {CONCURRENT} concurrent       {rate:8.1}    (median of 3: {:.1} {:.1} {:.1}; {:.1}x one at a time: {sequential_rate:.1}/s)",
        rates[0],
        rates[1],
        rates[2],
        rate / sequential_rate
    );
    let failed =
        Store::open(&d.db).unwrap().jobs(10_000).unwrap().iter().filter(|j| j.state != JobState::Completed).count();
    assert_eq!(failed, 0, "lifecycles failed without any fault injected");
    assert!(standin.vms().is_empty());

    // Daemon memory with 500 sandboxes alive (jobs that sleep).
    tokio::task::block_in_place(|| {
        for i in 0..LIVE {
            d_ref.submit(&format!("echo live-{i}; sleep 600"), false);
        }
        d_ref.wait_for("500 live sandboxes", |s| {
            s.sandboxes().unwrap().iter().filter(|sb| sb.state == SandboxState::Running).count() == LIVE
        });
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let live_rss = rss_kib(d.child.id());
    eprintln!("proxmox: (agentlabd threads with {LIVE} live: {})", status_field(d.child.id(), "Threads:"));
    println!(
        "proxmox: agentlabd RSS, {LIVE} live sandboxes    {live_rss:8} KiB ({:.1}x idle {idle_rss} KiB; {:.1} KiB per sandbox)",
        live_rss as f64 / idle_rss as f64,
        (live_rss.saturating_sub(idle_rss)) as f64 / LIVE as f64
    );
    drop(d);
    drop(standin);
}
