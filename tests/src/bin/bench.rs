//! `make bench`: measures what docs/SPECIFICATION.md promises, each figure next to
//! a baseline measured in the same run.
//!
//! 1. QEMU start → agent Hello, against a bare static init that only dials the host.
//! 2. Submit → first output byte at the CLI, minus the boot time.
//! 3. The agent's static binary size and idle RSS.
//! 4. The secret redactor's throughput, against sed doing the same replacements.
//! 5. Job output and artifact push throughput through the whole path, against a raw
//!    copy of the same number of bytes through the same hybrid-vsock socket pair.
//!    `AGENTLAB_BENCH_ONLY=stream` runs only this section.
//! 6. The Proxmox backend against the stand-in in no-boot mode: API requests per
//!    lifecycle, lifecycles/s at 50 concurrent, daemon RSS at 500 live sandboxes.
//!    `AGENTLAB_BENCH_ONLY=proxmox` runs only this section.
//! 7. The Debian template: its size, and QEMU start → agent Hello with systemd starting
//!    the agent, against the micro image.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark aborts on any surprise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentlab_host::backend::qemu::{Accel, QemuBackend, QemuConfig};
use agentlab_host::backend::{Backend, ChannelEndpoint, ProvisionRequest};
use agentlab_host::channel::sanitize_guest_text;
use agentlab_host::config::DEFAULT_PROFILE;
use agentlab_host::profile::Resources;
use agentlab_protocol::transport::hybrid;
use agentlab_protocol::{AGENT_VSOCK_PORT, HostConnection, HostMessage, host_handshake};
use agentlab_tests::pve_bench::rss_kib;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOOT_RUNS: usize = 7;
const SUBMIT_RUNS: usize = 3;

struct Args {
    image_dir: PathBuf,
    profiles_dir: PathBuf,
    agent: PathBuf,
    baseline: PathBuf,
    template_dir: PathBuf,
}

fn parse_args() -> Args {
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        image_dir: PathBuf::from("build/image"),
        profiles_dir: PathBuf::from("profiles"),
        agent: PathBuf::from("target/x86_64-unknown-linux-musl/release/agentlab-agent"),
        baseline: PathBuf::from("target/x86_64-unknown-linux-musl/release/baseline-init"),
        template_dir: PathBuf::from("build/template"),
    };
    while let Some(flag) = args.next() {
        let value = PathBuf::from(args.next().unwrap_or_else(|| panic!("{flag} needs a value")));
        match flag.as_str() {
            "--image-dir" => out.image_dir = value,
            "--profiles-dir" => out.profiles_dir = value,
            "--agent" => out.agent = value,
            "--baseline" => out.baseline = value,
            "--template-dir" => out.template_dir = value,
            other => panic!("unknown flag {other}"),
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = parse_args();
    let bin_dir = std::env::current_exe().unwrap().parent().unwrap().to_owned();
    if std::env::var("AGENTLAB_BENCH_ONLY").as_deref() == Ok("proxmox") {
        agentlab_tests::pve_bench::proxmox_figures(&bin_dir, &args.profiles_dir).await;
        return;
    }
    let scratch = tempfile::Builder::new().prefix("agentlab-bench-").tempdir().unwrap();
    println!("AgentLab benchmarks ({} runs per boot figure, TCG unless KVM probes fine)", BOOT_RUNS);

    // 1. Boot to Hello, agent image against the baseline image, interleaved.
    let baseline_dir = scratch.path().join("baseline-image");
    std::fs::create_dir_all(&baseline_dir).unwrap();
    std::os::unix::fs::symlink(
        std::path::absolute(args.image_dir.join("vmlinux")).unwrap(),
        baseline_dir.join("vmlinux"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        std::path::absolute(args.image_dir.join("baseline-initrd.img")).unwrap(),
        baseline_dir.join("initrd.img"),
    )
    .unwrap();
    // Both images boot in the shape of the default profile, as a user's job would.
    let profiles = agentlab_host::profile::load_dir(&args.profiles_dir).unwrap();
    let shape = profiles.get(DEFAULT_PROFILE).unwrap().resources.clone();
    println!("boot shape: profile {DEFAULT_PROFILE}, {} vCPU, {} MiB", shape.cores, shape.memory_mb);
    if std::env::var("AGENTLAB_BENCH_ONLY").as_deref() == Ok("stream") {
        throughput_figures(&args.image_dir, &baseline_dir, &shape, scratch.path()).await;
        return;
    }
    let agent_backend = backend(&args.image_dir, scratch.path());
    let baseline_backend = backend(&baseline_dir, scratch.path());
    let (mut agent_ms, mut baseline_ms) = (Vec::new(), Vec::new());
    for run in 0..BOOT_RUNS {
        agent_ms.push(boot_to_first_message(&agent_backend, &shape, &format!("agent-{run}"), true).await);
        baseline_ms.push(boot_to_first_message(&baseline_backend, &shape, &format!("baseline-{run}"), false).await);
    }
    let (agent, baseline) = (median(agent_ms.clone()), median(baseline_ms.clone()));
    println!("boot: QEMU start -> agent Hello           {agent:8.0} ms (median; runs {})", fmt_runs(&agent_ms));
    println!("boot: QEMU start -> baseline init dial-in {baseline:8.0} ms (median; runs {})", fmt_runs(&baseline_ms));
    println!("boot: ratio agent / baseline              {:8.3}x   (goal <= 1.05x)", agent / baseline);

    // 2. Submit to first output byte through the real daemon and CLI.
    let mut overheads = Vec::new();
    let mut totals = Vec::new();
    let mut boots = Vec::new();
    for _ in 0..SUBMIT_RUNS {
        let (total, boot) = submit_to_first_byte(&args.image_dir, &args.profiles_dir);
        totals.push(total);
        boots.push(boot);
        overheads.push(total - boot);
    }
    let (total, boot, overhead) = (median(totals), median(boots), median(overheads.clone()));
    println!("submit: CLI submit -> first output byte   {total:8.0} ms (median)");
    println!("submit: of which guest boot (BOOTING->READY) {boot:5.0} ms");
    println!(
        "submit: AgentLab overhead (total - boot)  {overhead:8.0} ms (runs {}); {:.3}x of the boot",
        fmt_runs(&overheads),
        overhead / boot
    );

    // 3. Agent binary size and idle RSS, against the baseline init and a static busybox.
    let agent_size = std::fs::metadata(&args.agent).unwrap().len();
    let baseline_size = std::fs::metadata(&args.baseline).unwrap().len();
    println!(
        "agent: static binary size                 {:8.0} KiB ({:.2}x the baseline init's {} KiB)",
        agent_size as f64 / 1024.0,
        agent_size as f64 / baseline_size as f64,
        baseline_size / 1024
    );
    redaction_figures();
    throughput_figures(&args.image_dir, &baseline_dir, &shape, scratch.path()).await;
    let agent_rss = idle_agent_rss_kib(&args.agent, scratch.path()).await;
    let busybox_rss = idle_rss_kib(Command::new("/bin/busybox").args(["sleep", "30"]));
    println!(
        "agent: idle RSS (handshake done, waiting)  {agent_rss:8} KiB ({:.2}x a static busybox sleep's {busybox_rss} KiB)",
        agent_rss as f64 / busybox_rss as f64
    );
    agentlab_tests::pve_bench::proxmox_figures(&bin_dir, &args.profiles_dir).await;
    template_figures(&args, scratch.path(), &shape).await;
}

/// Boots of the systemd template are slow under TCG; fewer runs keep `make bench` short.
const TEMPLATE_BOOT_RUNS: usize = 3;

/// Figure 5: the template's size, and its boot to the agent's Hello (systemd starts the
/// agent from its unit) against the micro image's (the agent is PID 1), interleaved.
async fn template_figures(args: &Args, scratch: &Path, shape: &Resources) {
    let disk = args.template_dir.join("disk.qcow2");
    assert!(disk.is_file(), "{} is not built: run make template (make bench does)", disk.display());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(args.template_dir.join("manifest.json")).unwrap()).unwrap();
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let qcow2 = std::fs::metadata(&disk).unwrap().len();
    let micro: u64 =
        ["vmlinux", "initrd.img"].iter().map(|f| std::fs::metadata(args.image_dir.join(f)).unwrap().len()).sum();
    println!(
        "template: disk.qcow2 {:8.0} MiB (virtual {}, {} packages); {:.1}x the micro image's vmlinux + initrd ({:.0} MiB)",
        mib(qcow2),
        manifest["disk_virtual_size"].as_str().expect("manifest.json names the disk's virtual size"),
        manifest["packages"].as_object().expect("manifest.json lists the packages").len(),
        qcow2 as f64 / micro as f64,
        mib(micro)
    );
    let template_backend = backend(&args.template_dir, scratch);
    let micro_backend = backend(&args.image_dir, scratch);
    let (mut systemd_ms, mut micro_ms) = (Vec::new(), Vec::new());
    for run in 0..TEMPLATE_BOOT_RUNS {
        systemd_ms.push(boot_to_first_message(&template_backend, shape, &format!("template-{run}"), true).await);
        micro_ms.push(boot_to_first_message(&micro_backend, shape, &format!("micro-{run}"), true).await);
    }
    let (systemd, micro) = (median(systemd_ms.clone()), median(micro_ms.clone()));
    println!("template: QEMU start -> agent Hello (systemd) {systemd:8.0} ms (median; runs {})", fmt_runs(&systemd_ms));
    println!("template: QEMU start -> agent Hello (micro)   {micro:8.0} ms (median; runs {})", fmt_runs(&micro_ms));
    println!("template: ratio systemd template / micro image {:8.2}x", systemd / micro);
}

fn fmt_runs(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ")
}

fn backend(image_dir: &Path, scratch: &Path) -> QemuBackend {
    backend_with_cmdline(image_dir, scratch, "")
}

fn backend_with_cmdline(image_dir: &Path, scratch: &Path, extra_cmdline: &str) -> QemuBackend {
    QemuBackend::new(QemuConfig {
        qemu: PathBuf::from("qemu-system-x86_64"),
        vhost_device_vsock: PathBuf::from("vhost-device-vsock"),
        image_dir: image_dir.to_owned(),
        run_dir: scratch.join("sandboxes"),
        accel: Accel::Auto,
        max_cpus: 64,
        max_memory_mb: 262_144,
        extra_cmdline: extra_cmdline.to_owned(),
    })
}

/// A bench VM of the qemu backend and its console log, both gone after `destroy`.
struct BenchVm {
    vm: Box<dyn agentlab_host::backend::Sandbox>,
    console: PathBuf,
}

impl BenchVm {
    /// Provisions and boots `name` in `shape`; returns it, the guest's first connection
    /// to the agent port, and when the boot began (after the listener was up).
    async fn boot(backend: &QemuBackend, shape: &Resources, name: &str) -> (Self, tokio::net::UnixStream, Instant) {
        let console = std::env::temp_dir().join(format!("agentlab-bench-{name}-{}.log", std::process::id()));
        let mut vm = backend
            .provision(&ProvisionRequest {
                sandbox_id: name.to_owned(),
                job_id: format!("bench-{name}"),
                template_vmid: 9000,
                bridge: None,
                console_log: console.clone(),
                cores: shape.cores,
                memory_mb: shape.memory_mb,
            })
            .await
            .unwrap();
        let ChannelEndpoint::Hybrid { uds } = vm.channel() else { panic!("qemu backend uses hybrid vsock") };
        let listener = hybrid::listen(&uds, AGENT_VSOCK_PORT).unwrap();
        let started = Instant::now();
        vm.boot().await.unwrap();
        static SHOWN: std::sync::Once = std::sync::Once::new();
        SHOWN.call_once(|| println!("accelerator: {} (the backend's probe chose it)", vm.accel().unwrap_or_default()));
        let (stream, _) = tokio::time::timeout(Duration::from_secs(120), listener.accept())
            .await
            .unwrap_or_else(|_| panic!("{name}: no dial-in within 120 s\n{}", vm.diagnostics()))
            .unwrap();
        (Self { vm, console }, stream, started)
    }

    async fn destroy(self) {
        self.vm.destroy().await.unwrap();
        let _ = std::fs::remove_file(&self.console);
    }
}

/// Milliseconds from spawning QEMU to the guest's first bytes on the agent port.
async fn boot_to_first_message(backend: &QemuBackend, shape: &Resources, name: &str, is_agent: bool) -> f64 {
    let (vm, mut stream, started) = BenchVm::boot(backend, shape, name).await;
    let elapsed;
    if is_agent {
        let mut conn = HostConnection::new(stream);
        let (hello, _) = host_handshake(&mut conn, name).await.unwrap();
        elapsed = started.elapsed();
        assert!(!sanitize_guest_text(&hello.kernel_release).is_empty());
        conn.send(HostMessage::Shutdown).await.unwrap();
    } else {
        let mut buf = [0u8; 6];
        stream.read_exact(&mut buf).await.unwrap();
        elapsed = started.elapsed();
        assert_eq!(&buf, b"HELLO\n");
        stream.shutdown().await.unwrap();
    }
    vm.destroy().await;
    elapsed.as_secs_f64() * 1000.0
}

/// Runs one job through a fresh daemon; returns (submit→first byte, boot) in ms.
fn submit_to_first_byte(image_dir: &Path, profiles_dir: &Path) -> (f64, f64) {
    let bin_dir = std::env::current_exe().unwrap().parent().unwrap().to_owned();
    let state = tempfile::Builder::new().prefix("agentlab-bench-state-").tempdir().unwrap();
    let socket = state.path().join("agentlabd.sock");
    let mut daemon = Command::new(bin_dir.join("agentlabd"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("--image-dir")
        .arg(image_dir)
        .arg("--profiles-dir")
        .arg(profiles_dir)
        .env("AGENTLAB_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let mut cli = Command::new(bin_dir.join("agentlab"))
        .arg("--socket")
        .arg(&socket)
        .args(["job", "submit", "--follow", "--quiet", "--cmd", "echo first-byte"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(cli.stdout.as_mut().unwrap(), &mut first).unwrap();
    let total = started.elapsed().as_secs_f64() * 1000.0;
    assert!(cli.wait().unwrap().success());
    let out = Command::new(bin_dir.join("agentlab"))
        .arg("--socket")
        .arg(&socket)
        .args(["--json", "job", "list"])
        .output()
        .unwrap();
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = jobs[0]["id"].as_str().unwrap();
    let out = Command::new(bin_dir.join("agentlab"))
        .arg("--socket")
        .arg(&socket)
        .args(["--json", "job", "show", id])
        .output()
        .unwrap();
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let at = |to: &str| {
        job["events"].as_array().unwrap().iter().find(|e| e["kind"] == "sandbox.state" && e["to_state"] == to).unwrap()
            ["at_ms"]
            .as_i64()
            .unwrap()
    };
    let boot = (at("READY") - at("BOOTING")) as f64;
    let _ = daemon.kill();
    let _ = daemon.wait();
    (total, boot)
}

fn idle_rss_kib(cmd: &mut Command) -> u64 {
    let mut child = cmd.stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    rss
}

/// The agent on this host over `--unix`, after its handshake, waiting for a job.
async fn idle_agent_rss_kib(agent: &Path, scratch: &Path) -> u64 {
    let sock = scratch.join("rss-agent.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let mut child = tokio::process::Command::new(agent)
        .arg("run")
        .arg("--unix")
        .arg(&sock)
        .arg("--status-socket")
        .arg(scratch.join("rss-status.sock"))
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let mut conn = HostConnection::new(stream);
    host_handshake(&mut conn, "sb-rss").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss = rss_kib(child.id().unwrap());
    conn.send(HostMessage::Shutdown).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    rss
}

/// Figure 4: the streaming redactor against a `sed` pipeline doing the same
/// replacements, like the Go predecessor's bash runner. sed manages well under
/// 1 MB/s with this many patterns, so it gets a 4 MiB sample of the same text.
fn redaction_figures() {
    const SECRETS: usize = 100;
    let ours = agentlab_redact::bench::measure_throughput(SECRETS, 1 << 30);
    println!(
        "redact: {SECRETS} secrets ({} patterns), 1 GiB of mixed log text  {:8.0} MB/s (goal >= 1000)",
        ours.patterns, ours.mb_per_s
    );
    // No figure without its baseline.
    let sed = agentlab_redact::bench::measure_sed(SECRETS, 4 << 20).expect("GNU sed runs for the baseline");
    println!(
        "redact: GNU sed, same patterns, 4 MiB sample       {:8.2} MB/s; ratio {:.0}x (goal >= 50x)",
        sed.mb_per_s,
        ours.mb_per_s / sed.mb_per_s
    );
}

/// Bytes streamed by each throughput figure.
const STREAM_BYTES: u64 = 128 * 1024 * 1024;
const THROUGHPUT_RUNS: usize = 5;

/// Figure 5: a job's output (guest redaction, acknowledged chunks over hybrid vsock,
/// host redaction, the job's log file) and an artifact push (tar, SHA-256, chunks,
/// acknowledgements, a file) against the baseline init writing the same bytes raw
/// through the same kind of socket pair, in MB/s.
async fn throughput_figures(image_dir: &Path, baseline_dir: &Path, shape: &Resources, scratch: &Path) {
    let raw_backend = backend_with_cmdline(baseline_dir, scratch, &format!("agentlab_raw_bytes={STREAM_BYTES}"));
    let agent_backend = backend(image_dir, scratch);
    let (mut raw, mut logs, mut artifacts) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..THROUGHPUT_RUNS {
        raw.push(raw_copy_mb_per_s(&raw_backend, shape, &format!("raw-{run}")).await);
        let (log, artifact) = job_stream_mb_per_s(&agent_backend, shape, scratch, &format!("stream-{run}")).await;
        logs.push(log);
        artifacts.push(artifact);
    }
    let raw_all = raw.clone();
    let (raw, log, artifact) = (median(raw), median(logs.clone()), median(artifacts.clone()));
    let mib = STREAM_BYTES >> 20;
    println!("stream: raw copy, guest -> host, {mib} MiB     {raw:8.1} MB/s (median; runs {})", fmt_runs(&raw_all));
    println!(
        "stream: job stdout -> host log, {mib} MiB     {log:8.1} MB/s (runs {}); {:.0}% of raw (goal >= 70%)",
        fmt_runs(&logs),
        100.0 * log / raw
    );
    println!(
        "stream: artifact push, {mib} MiB file       {artifact:8.1} MB/s (runs {}); {:.0}% of raw (goal >= 80%)",
        fmt_runs(&artifacts),
        100.0 * artifact / raw
    );
}

/// The baseline init writes [`STREAM_BYTES`] after its greeting; MB/s from the first
/// byte after it to the last.
async fn raw_copy_mb_per_s(backend: &QemuBackend, shape: &Resources, name: &str) -> f64 {
    let (vm, mut stream, _) = BenchVm::boot(backend, shape, name).await;
    let mut hello = [0u8; 6];
    stream.read_exact(&mut hello).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut started = None;
    while got < STREAM_BYTES {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "{name}: the raw stream ended after {got} bytes");
        started.get_or_insert_with(Instant::now);
        got += n as u64;
    }
    let secs = started.unwrap().elapsed().as_secs_f64();
    stream.shutdown().await.unwrap();
    vm.destroy().await;
    STREAM_BYTES as f64 / secs / 1e6
}

/// Records when output arrived and stores it the way agentlabd does.
struct StreamTimer {
    log: agentlab_host::joblog::JobLog,
    stream: agentlab_redact::RedactStream<'static>,
    first: Option<Instant>,
    last: Option<Instant>,
    bytes: u64,
}

impl agentlab_host::channel::SessionObserver for StreamTimer {
    fn handshake_done(&mut self, _: &agentlab_protocol::Hello, _: &agentlab_protocol::HelloAck) {}
    fn secrets_delivered(&mut self, _: &agentlab_protocol::SecretBundle) {}
    fn secrets_refused(&mut self, _: &str) {}
    fn job_started(&mut self, _: u32) {}
    fn output(&mut self, chunk: &agentlab_protocol::OutputChunk) -> std::io::Result<bool> {
        self.first.get_or_insert_with(Instant::now);
        let mut clean = Vec::with_capacity(chunk.data.len());
        self.stream.push(&chunk.data, &mut clean);
        self.bytes += clean.len() as u64;
        self.log.append(chunk.stream, &clean)?;
        self.last = Some(Instant::now());
        Ok(true)
    }
}

/// One VM, one job: it writes [`STREAM_BYTES`] to stdout, then the same amount into a
/// file the host collects as an artifact. Returns (output MB/s, artifact MB/s). The job
/// has a secret, so both redaction passes do real work.
async fn job_stream_mb_per_s(backend: &QemuBackend, shape: &Resources, scratch: &Path, name: &str) -> (f64, f64) {
    use agentlab_protocol::{
        ArtifactRequest, JobSpec, SandboxSpec, SecretBundle, SecretBytes, SecretEntry, SecretKind,
    };
    let (vm, stream, _) = BenchVm::boot(backend, shape, name).await;
    let secret = "sk-bench-0123456789abcdef";
    let secrets = SecretBundle {
        name: "bench".into(),
        entries: vec![SecretEntry {
            kind: SecretKind::Env,
            name: "API_KEY".into(),
            value: SecretBytes::copy_from(secret.as_bytes()),
        }],
    };
    // dd with 1 MiB blocks: busybox head's small writes would measure the job itself.
    let cmd = format!(
        "dd if=/dev/zero bs=1M count={mib} 2>/dev/null; mkdir -p out && dd if=/dev/zero bs=1M count={mib} of=out/big.bin 2>/dev/null",
        mib = STREAM_BYTES >> 20
    );
    let spec = JobSpec {
        timeout_ms: 600_000,
        kill_grace_ms: 1000,
        ..agentlab_tests::sh_job(&format!("job-{name}"), Path::new("/workspace"), &cmd, SandboxSpec::default())
    };
    let mut timer = StreamTimer {
        log: agentlab_host::joblog::JobLog::create(&scratch.join(format!("{name}.log")), u64::MAX).unwrap(),
        stream: agentlab_redact::Redactor::new([secret]).into_stream(),
        first: None,
        last: None,
        bytes: 0,
    };
    let mut session = agentlab_host::channel::HostSession::new(stream);
    let result = session.run(name, spec, secrets, None, &mut timer).await.unwrap();
    assert_eq!(result.outcome, agentlab_protocol::JobOutcome::Exited { code: 0 }, "{name}");
    assert_eq!(timer.bytes, STREAM_BYTES, "{name}: the log holds every byte");
    let log_secs = (timer.last.unwrap() - timer.first.unwrap()).as_secs_f64();

    let mut sink = std::fs::File::create(scratch.join(format!("{name}.tar"))).unwrap();
    let request = ArtifactRequest { globs: vec!["out/**".into()], max_bytes: STREAM_BYTES * 2 };
    let pushing = Instant::now();
    let summary = session.collect_artifacts(request, &mut sink, &mut timer).await.unwrap().unwrap();
    let push_secs = pushing.elapsed().as_secs_f64();
    assert!(summary.bytes > STREAM_BYTES, "{name}: {} bytes pushed", summary.bytes);
    session.shutdown().await;
    drop(session);
    vm.destroy().await;
    let _ = std::fs::remove_file(scratch.join(format!("{name}.tar")));
    let _ = std::fs::remove_file(scratch.join(format!("{name}.log")));
    (STREAM_BYTES as f64 / log_secs / 1e6, STREAM_BYTES as f64 / push_secs / 1e6)
}
