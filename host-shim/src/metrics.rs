//! The Prometheus (OpenMetrics) text endpoint, off unless `--metrics-listen` names an
//! address. Sandboxes by state and jobs by state are counted in the database at each
//! scrape; durations, errors and bytes are recorded as they happen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::daemon::Daemon;
use crate::state::{JobState, SandboxState};

/// Longest request head read from a scraper.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// What the daemon records as it works.
pub struct Metrics {
    registry: Registry,
    sandboxes: Family<StateLabel, Gauge>,
    jobs: Family<StateLabel, Gauge>,
    provision: Histogram,
    boot: Histogram,
    job: Histogram,
    backend_errors: Family<KindLabel, Counter>,
    log_bytes: Counter,
    artifact_bytes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("agentlab");
        let sandboxes = Family::<StateLabel, Gauge>::default();
        let jobs = Family::<StateLabel, Gauge>::default();
        // 0.1 s to ~30 min.
        let seconds = || Histogram::new(exponential_buckets(0.1, 2.0, 15));
        let (provision, boot, job) = (seconds(), seconds(), seconds());
        let backend_errors = Family::<KindLabel, Counter>::default();
        let (log_bytes, artifact_bytes) = (Counter::default(), Counter::default());
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        registry.register("jobs", "Jobs by state", jobs.clone());
        registry.register("provision_seconds", "Time to provision a sandbox's VM", provision.clone());
        registry.register("boot_seconds", "Time from VM start to the agent's dial-in", boot.clone());
        registry.register("job_seconds", "Job run time as the agent measured it", job.clone());
        registry.register("backend_errors", "Backend failures by kind", backend_errors.clone());
        registry.register("log_bytes", "Bytes of job output stored", log_bytes.clone());
        registry.register("artifact_bytes", "Bytes of artifacts stored", artifact_bytes.clone());
        Metrics { registry, sandboxes, jobs, provision, boot, job, backend_errors, log_bytes, artifact_bytes }
    }

    pub fn provisioned(&self, took: Duration) {
        self.provision.observe(took.as_secs_f64());
    }

    pub fn booted(&self, took: Duration) {
        self.boot.observe(took.as_secs_f64());
    }

    pub fn job_ran(&self, took: Duration) {
        self.job.observe(took.as_secs_f64());
    }

    /// A backend failure: `provision`, `boot`, `boot-timeout`, `session` or `destroy`.
    pub fn backend_error(&self, kind: &str) {
        self.backend_errors.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }

    pub fn log_stored(&self, bytes: usize) {
        self.log_bytes.inc_by(bytes as u64);
    }

    pub fn artifacts_stored(&self, bytes: u64) {
        self.artifact_bytes.inc_by(bytes);
    }

    /// The text exposition, with the state counts read from the database now.
    pub fn render(&self, daemon: &Daemon) -> String {
        for state in SandboxState::ALL.iter() {
            self.sandboxes.get_or_create(&StateLabel { state: state.as_str().to_owned() }).set(0);
        }
        for state in JobState::ALL.iter() {
            self.jobs.get_or_create(&StateLabel { state: state.as_str().to_owned() }).set(0);
        }
        if let Ok(counts) = daemon.store.count_by_state() {
            for (state, n) in counts.sandboxes {
                self.sandboxes.get_or_create(&StateLabel { state }).set(n);
            }
            for (state, n) in counts.jobs {
                self.jobs.get_or_create(&StateLabel { state }).set(n);
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `GET /metrics` on `addr` until the daemon stops.
pub async fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(&daemon, stream)).await;
        });
    }
}

/// Binds the metrics address; says where it is.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    Ok(listener)
}

async fn answer(daemon: &Daemon, mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let (status, content_type, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET /metrics?") {
        ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", daemon.metrics.render(daemon))
    } else {
        ("404 Not Found", "text/plain; charset=utf-8", "only /metrics is served here\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
