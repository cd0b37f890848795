//! `agentlabd`: the host shim.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agentlab_host::backend::Backend;
use agentlab_host::backend::proxmox::ProxmoxBackend;
use agentlab_host::backend::proxmox::config::{ChannelMode, ConfigFile};
use agentlab_host::backend::qemu::{Accel, QemuBackend};
use agentlab_host::config::{DEFAULT_IMAGE_DIR, DEFAULT_PROFILES_DIR, DEFAULT_SOCKET, DEFAULT_STATE_DIR, DaemonConfig};
use agentlab_host::daemon::Daemon;
use clap::Parser;

#[derive(Parser)]
#[command(name = "agentlabd", version, about = "AgentLab host shim: runs jobs in disposable VMs")]
struct Args {
    /// Keep everything (database, logs, sockets, and the API socket unless --socket is
    /// given) under this directory. Lets agentlabd run unprivileged.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The API socket [default: /run/agentlab/agentlabd.sock, or STATE_DIR/agentlabd.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Directory holding the micro image (vmlinux, initrd.img) built by image/build.sh.
    #[arg(long, env = "AGENTLAB_IMAGE_DIR", default_value = DEFAULT_IMAGE_DIR)]
    image_dir: PathBuf,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// The vhost-device-vsock binary.
    #[arg(long, default_value = "vhost-device-vsock")]
    vhost_device_vsock: PathBuf,
    /// Accelerator: auto uses KVM only if a probe boot under it succeeds.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Directory of profile files (`*.yaml`); every one must be valid for agentlabd to start.
    #[arg(long, env = "AGENTLAB_PROFILES_DIR", default_value = DEFAULT_PROFILES_DIR)]
    profiles_dir: PathBuf,
    /// Most vCPUs a local microVM gets, whatever its profile asks [default: this host's CPUs].
    #[arg(long)]
    max_vm_cpus: Option<u32>,
    /// Most memory a local microVM gets, MiB, whatever its profile asks.
    #[arg(long, default_value_t = 8192)]
    max_vm_memory_mb: u32,
    /// How long a guest may take to boot and dial in.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90s")]
    boot_timeout: Duration,
    /// Most output stored per job, MiB; beyond it the output is dropped after a marker.
    #[arg(long, default_value_t = 1024)]
    max_log_mb: u64,
    /// vCPUs all sandboxes together may have; more jobs wait in the queue
    /// [default: 4 per host CPU with the qemu backend, none with proxmox].
    #[arg(long)]
    budget_cores: Option<u32>,
    /// Memory all sandboxes together may have, MiB [default: 90% of the host's with the
    /// qemu backend, none with proxmox].
    #[arg(long)]
    budget_memory_mb: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given), e.g. 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// How often expired sandbox leases are looked for.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    lease_check_interval: Duration,
    /// Where sandboxes come from: local microVMs, or Proxmox VE (configured in --config).
    #[arg(long, value_enum, default_value_t = BackendKind::Qemu)]
    backend: BackendKind,
    /// The daemon's settings file; the proxmox backend reads its `proxmox:` section.
    #[arg(long, env = "AGENTLAB_CONFIG", default_value = "/etc/agentlab/config.yaml")]
    config: PathBuf,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "AGENTLAB_LOG", default_value = "info")]
    log: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BackendKind {
    Qemu,
    Proxmox,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Under systemd, stderr goes to the journal, which stamps each line itself and
    // shows escape codes raw: plain lines without timestamps then.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentlabd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("agentlabd: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let state_dir = args.state_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let socket = match (&args.socket, &args.state_dir) {
        (Some(socket), _) => socket.clone(),
        (None, Some(dir)) => dir.join("agentlabd.sock"),
        (None, None) => PathBuf::from(DEFAULT_SOCKET),
    };
    let state_dir = std::path::absolute(&state_dir).map_err(|e| format!("--state-dir: {e}"))?;
    let image_dir = std::path::absolute(&args.image_dir).map_err(|e| format!("--image-dir: {e}"))?;
    let mut config = DaemonConfig::new(&state_dir, &socket, &image_dir);
    config.qemu.qemu = args.qemu;
    config.qemu.vhost_device_vsock = args.vhost_device_vsock;
    config.qemu.accel = args.accel;
    config.qemu.max_memory_mb = args.max_vm_memory_mb;
    if let Some(cpus) = args.max_vm_cpus {
        config.qemu.max_cpus = cpus;
    }
    config.profiles_dir = std::path::absolute(&args.profiles_dir).map_err(|e| format!("--profiles-dir: {e}"))?;
    config.boot_timeout = args.boot_timeout;
    config.max_log_bytes = args.max_log_mb.saturating_mul(1024 * 1024);
    if args.backend == BackendKind::Proxmox {
        // A cluster's capacity is placement's business (it reads /cluster/resources):
        // no budget of this host's size applies unless one is given.
        config.budget = agentlab_host::admission::Budget::UNLIMITED;
    }
    if let Some(cores) = args.budget_cores {
        config.budget.cores = cores;
    }
    if let Some(mb) = args.budget_memory_mb {
        config.budget.memory_mb = mb;
    }

    let (backend, proxmox): (Arc<dyn Backend>, _) = match args.backend {
        BackendKind::Qemu => (Arc::new(QemuBackend::new(config.qemu.clone())), None),
        BackendKind::Proxmox => {
            let file = ConfigFile::load(&args.config).map_err(|e| format!("--config {e}"))?;
            let pve = file.proxmox.ok_or_else(|| {
                format!(
                    "--backend proxmox needs a `proxmox:` section in {} (see docs/PROXMOX.md)",
                    args.config.display()
                )
            })?;
            if pve.channel == ChannelMode::Vsock {
                tracing::info!(
                    "vsock channel: one AF_VSOCK listener on port {}, guests get CID = VMID",
                    agentlab_protocol::AGENT_VSOCK_PORT
                );
            }
            let backend = Arc::new(ProxmoxBackend::new(pve).map_err(|e| e.to_string())?);
            match backend.check_api().await {
                Ok(version) => tracing::info!("Proxmox VE API reachable: {version}"),
                Err(e) => tracing::warn!("jobs will fail until this is fixed: {e}"),
            }
            (backend.clone() as Arc<dyn Backend>, Some(backend))
        }
    };
    let daemon = Daemon::open(config, backend.clone()).map_err(|e| e.to_string())?;
    if let Err(e) = backend.preflight().await {
        // Not fatal: the daemon still serves state; each job fails with this reason.
        tracing::warn!("the {} backend is not ready, jobs will fail until this is fixed: {e}", backend.name());
    }
    if let Some(pve) = proxmox {
        tokio::spawn(agentlab_host::backend::proxmox::reconcile::run_forever(pve, daemon.clone()));
    }
    tokio::spawn(agentlab_host::leases::reaper(daemon.clone(), args.lease_check_interval));
    if let Some(addr) = args.metrics_listen {
        let metrics = agentlab_host::metrics::bind(addr).await.map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
        tokio::spawn(agentlab_host::metrics::serve(daemon.clone(), metrics));
    }
    let listener = agentlab_host::server::bind(&socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
    tracing::info!("agentlabd serving on {} (state in {})", socket.display(), state_dir.display());
    // systemd Type=notify: ready once the socket takes connections (no-op without NOTIFY_SOCKET).
    let status = format!("serving on {}", socket.display());
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]) {
        tracing::warn!("telling systemd we are ready: {e}");
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
    tokio::select! {
        () = agentlab_host::server::serve(daemon, listener) => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = terminate.recv() => tracing::info!("SIGTERM; stopping"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
