//! Drives one job through its sandbox's life: provision, boot, session, teardown.
//! Every failure ends the job with the underlying cause, never a bare "failed".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentlab_protocol::{Enforcement, Hello, HelloAck, JobOutcome, JobResult, JobSpec, OutputChunk};

use crate::agent_listener::{AgentListener, BoxedStream};
use crate::backend::{ProvisionRequest, Sandbox};
use crate::channel::{HostSession, SessionObserver, sanitize_guest_text};
use crate::daemon::Daemon;
use crate::joblog::JobLog;
use crate::profile::Profile;
use crate::state::{JobState, SandboxState};
use crate::store::{JobEnd, Store};

/// Where the guest keeps file secrets (readable by the job only if the profile says so).
const GUEST_SECRETS_DIR: &str = "/run/agentlab/secrets";

/// The job's inner sandbox, from its profile.
fn sandbox_spec(profile: &Profile) -> agentlab_protocol::SandboxSpec {
    use crate::profile::NetworkMode;
    let policy = &profile.sandbox;
    agentlab_protocol::SandboxSpec {
        landlock: policy.landlock,
        user: policy.user.clone(),
        read_only_paths: policy.read_only_paths.clone(),
        read_write_paths: policy.read_write_paths.clone(),
        secrets_dir: policy.secrets_readable.then(|| GUEST_SECRETS_DIR.to_owned()),
        network_off: !matches!(profile.network.mode, NetworkMode::Nat | NetworkMode::Allowlist),
        rlimits: policy.rlimits.clone(),
    }
}

pub struct QueuedJob {
    pub job_id: String,
    pub profile: Profile,
    pub sandbox_id: String,
    pub command: String,
    pub timeout_ms: u64,
    pub upload: Option<PathBuf>,
    pub log: Arc<JobLog>,
}

/// How a job ended, before it is written down.
struct Finish {
    job: JobState,
    sandbox: SandboxState,
    end: JobEnd,
    message: String,
}

impl Finish {
    fn failed(sandbox: SandboxState, message: String) -> Finish {
        Finish {
            job: JobState::Failed,
            sandbox,
            end: JobEnd { error: Some(message.clone()), ..JobEnd::default() },
            message,
        }
    }
}

/// Records a sandbox state change. The runner cannot undo the change in the world if
/// recording it fails (illegal transition, database gone), so it logs and carries on.
fn set_sandbox(store: &Store, id: &str, to: SandboxState, message: Option<&str>) {
    if let Err(e) = store.transition_sandbox(id, to, message) {
        tracing::error!(sandbox = id, "recording {to}: {e}");
    }
}

/// Records a job state change; see [`set_sandbox`].
fn set_job(store: &Store, id: &str, to: JobState, end: Option<&JobEnd>, message: Option<&str>) {
    if let Err(e) = store.transition_job(id, to, end, message) {
        tracing::error!(job = id, "recording {to}: {e}");
    }
}

/// Keeps what the backend warned about (steps that succeeded with warnings).
fn record_warnings(store: &Store, job: &QueuedJob, vm: &mut dyn Sandbox) {
    for warning in vm.take_warnings() {
        let _ = store.record_event(Some(&job.job_id), Some(&job.sandbox_id), "sandbox.warning", &warning);
    }
}

pub async fn run(daemon: Arc<Daemon>, job: QueuedJob) {
    let finish = drive(&daemon, &job).await;
    set_job(&daemon.store, &job.job_id, finish.job, Some(&finish.end), Some(&finish.message));
    job.log.close();
    daemon.job_done(&job.job_id);
    if let Some(upload) = &job.upload {
        let _ = std::fs::remove_file(upload);
    }
    tracing::info!(job = %job.job_id, state = %finish.job, "{}", finish.message);
}

/// Runs the job and tears its sandbox down; returns how it ended.
async fn drive(daemon: &Daemon, job: &QueuedJob) -> Finish {
    let store = &daemon.store;
    let sb = job.sandbox_id.as_str();
    let record = |to: SandboxState, msg: Option<&str>| set_sandbox(store, sb, to, msg);

    record(SandboxState::Provisioning, None);
    let provisioned = async {
        daemon.backend.preflight().await?;
        let console_log = daemon.config.job_dir(&job.job_id).join("console.log");
        let resources = &job.profile.resources;
        let req = ProvisionRequest {
            sandbox_id: sb.to_owned(),
            job_id: job.job_id.clone(),
            template_vmid: job.profile.template_vmid,
            bridge: (job.profile.network.mode != crate::profile::NetworkMode::Off)
                .then(|| job.profile.network.bridge.clone()),
            console_log,
            cores: resources.cores,
            memory_mb: resources.memory_mb,
        };
        daemon.backend.provision(&req).await
    };
    let mut vm = match provisioned.await {
        Ok(vm) => vm,
        Err(e) => {
            let msg = format!("provisioning sandbox {sb} failed: {e}");
            record(SandboxState::Failed, Some(&msg));
            record(SandboxState::Destroyed, None);
            return Finish::failed(SandboxState::Failed, msg);
        }
    };
    if let Some(accel) = vm.accel() {
        let _ = store.set_sandbox_accel(sb, &accel);
    }
    let _ = store.record_event(
        Some(&job.job_id),
        Some(sb),
        "sandbox.provisioned",
        &format!("profile {}: {}", job.profile.name, vm.shape()),
    );
    record_warnings(store, job, vm.as_mut());

    let finish = boot_and_run(daemon, job, vm.as_mut()).await;
    record(finish.sandbox, Some(&finish.message));
    match vm.destroy().await {
        Ok(()) => record(SandboxState::Destroyed, None),
        Err(e) => {
            let msg = format!("tearing sandbox {sb} down failed: {e}");
            tracing::error!("{msg}");
            let _ = store.record_event(Some(&job.job_id), Some(sb), "sandbox.destroy_failed", &msg);
        }
    }
    finish
}

async fn boot_and_run(daemon: &Daemon, job: &QueuedJob, vm: &mut dyn Sandbox) -> Finish {
    let store = &daemon.store;
    let sb = job.sandbox_id.as_str();
    // Listen before the VM starts: the agent dials as soon as its kernel is up.
    let mut listener = match AgentListener::listen(&vm.channel()) {
        Ok(l) => l,
        Err(e) => {
            return Finish::failed(SandboxState::Failed, format!("cannot listen for sandbox {sb}'s agent: {e}"));
        }
    };
    set_sandbox(store, sb, SandboxState::Booting, None);
    if let Err(e) = vm.boot().await {
        return Finish::failed(SandboxState::Failed, format!("booting sandbox {sb} failed: {e}\n{}", vm.diagnostics()));
    }
    record_warnings(store, job, vm);

    let boot_timeout = daemon.config.boot_timeout;
    let stream: BoxedStream = tokio::select! {
        biased;
        accepted = tokio::time::timeout(boot_timeout, listener.accept()) => match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Finish::failed(SandboxState::Failed, format!("accepting sandbox {sb}'s agent: {e}")),
            Err(_) => return Finish::failed(
                SandboxState::Timeout,
                format!(
                    "sandbox {sb}: the guest agent did not dial in within {} s; {}\n{}",
                    boot_timeout.as_secs(),
                    vm.dial_in_hint(),
                    vm.diagnostics()
                ),
            ),
        },
        exit = vm.exited() => return Finish::failed(
            SandboxState::Failed,
            format!("sandbox {sb}: the VM stopped before its agent dialed in: {}\n{}", exit.description, vm.diagnostics()),
        ),
    };
    // Exactly one agent session per sandbox: stop listening before talking.
    listener.close();

    let spec = JobSpec {
        job_id: job.job_id.clone(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), job.command.clone()],
        env: Vec::new(),
        workdir: job.profile.repo.clone_path.clone(),
        timeout_ms: job.timeout_ms,
        kill_grace_ms: u64::try_from(daemon.config.kill_grace.as_millis()).unwrap_or(u64::MAX),
        workdir_upload_bytes: match &job.upload {
            Some(p) => std::fs::metadata(p).ok().map(|m| m.len()),
            None => None,
        },
        sandbox: sandbox_spec(&job.profile),
    };
    // The agent enforces the job's timeout; the host only steps in if the guest
    // fails to report well after it.
    let watchdog = Duration::from_millis(job.timeout_ms) + daemon.config.kill_grace + daemon.config.report_slack;
    let mut observer = Observer { daemon, job, output_bytes: 0 };
    let mut session = HostSession::new(stream);
    enum Ended {
        Reported(JobResult),
        Broken(String),
        Silent(String),
    }
    let ended = tokio::select! {
        biased;
        result = tokio::time::timeout(watchdog, session.run(sb, spec, job.upload.as_deref(), &mut observer)) => match result {
            Ok(Ok(result)) => Ended::Reported(result),
            Ok(Err(e)) => Ended::Broken(e.to_string()),
            Err(_) => Ended::Silent(format!("the guest did not report a result within {} s of the job's start", watchdog.as_secs())),
        },
        exit = vm.exited() => Ended::Broken(format!("the VM stopped during the session: {}", exit.description)),
    };
    let output_bytes = observer.output_bytes;
    let (reason, timed_out) = match ended {
        Ended::Reported(result) => {
            session.shutdown().await;
            return finish_from_result(&result, output_bytes);
        }
        Ended::Broken(reason) => (reason, false),
        Ended::Silent(reason) => (reason, true),
    };
    let _ = store.record_event(Some(&job.job_id), Some(sb), "sandbox.diagnostics", &vm.diagnostics());
    let mut finish = Finish::failed(SandboxState::Failed, format!("sandbox {sb}: {reason}"));
    finish.end.output_bytes = output_bytes;
    if timed_out {
        finish.sandbox = SandboxState::Timeout;
        // Only a job that started can time out; one that never did simply failed.
        if store.job(&job.job_id).is_ok_and(|j| j.state == JobState::Running) {
            finish.job = JobState::Timeout;
        }
    }
    finish
}

/// The guest's account of its sandbox, bounded and cleaned before it is stored.
fn sanitized_enforcement(e: &Enforcement) -> Enforcement {
    const MAX_NOTES: usize = 16;
    Enforcement {
        user: sanitize_guest_text(&e.user),
        notes: e.notes.iter().take(MAX_NOTES).map(|n| sanitize_guest_text(n)).collect(),
        ..e.clone()
    }
}

fn finish_from_result(result: &JobResult, output_bytes: u64) -> Finish {
    let enforcement = serde_json::to_string(&sanitized_enforcement(&result.enforcement)).ok();
    let mut end = JobEnd { duration_ms: Some(result.duration_ms), output_bytes, enforcement, ..JobEnd::default() };
    let (job, sandbox, message) = match &result.outcome {
        JobOutcome::Exited { code: 0 } => {
            end.exit_code = Some(0);
            (JobState::Completed, SandboxState::Completed, "exited with code 0".to_owned())
        }
        JobOutcome::Exited { code } => {
            end.exit_code = Some(*code);
            (JobState::Failed, SandboxState::Completed, format!("exited with code {code}"))
        }
        JobOutcome::Signaled { signal } => {
            end.signal = Some(*signal);
            (JobState::Failed, SandboxState::Completed, format!("killed by signal {signal} ({})", signal_name(*signal)))
        }
        JobOutcome::TimedOut { signal } => {
            end.signal = Some(*signal);
            let msg = format!("timed out after {} ms; stopped with {}", result.duration_ms, signal_name(*signal));
            (JobState::Timeout, SandboxState::Timeout, msg)
        }
        JobOutcome::Cancelled { signal } => {
            end.signal = Some(*signal);
            (JobState::Failed, SandboxState::Completed, format!("cancelled; stopped with {}", signal_name(*signal)))
        }
        JobOutcome::SpawnFailed { reason } => {
            (JobState::Failed, SandboxState::Failed, format!("the job could not start in the guest: {reason}"))
        }
    };
    if job != JobState::Completed {
        end.error = Some(message.clone());
    }
    Finish { job, sandbox, end, message }
}

fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned())
}

struct Observer<'a> {
    daemon: &'a Daemon,
    job: &'a QueuedJob,
    output_bytes: u64,
}

impl SessionObserver for Observer<'_> {
    fn handshake_done(&mut self, hello: &Hello, ack: &HelloAck) {
        let store = &self.daemon.store;
        let kernel = sanitize_guest_text(&hello.kernel_release);
        let agent = sanitize_guest_text(&hello.agent_version);
        let _ = store.set_guest_info(&self.job.job_id, &kernel, &agent);
        let msg = format!("agent {agent} on kernel {kernel}, protocol v{}", ack.version);
        set_sandbox(store, &self.job.sandbox_id, SandboxState::Ready, Some(&msg));
    }

    fn job_started(&mut self, pid: u32) {
        let store = &self.daemon.store;
        let msg = format!("guest pid {pid}");
        set_sandbox(store, &self.job.sandbox_id, SandboxState::Running, None);
        set_job(store, &self.job.job_id, JobState::Running, None, Some(&msg));
    }

    fn output(&mut self, chunk: &OutputChunk) -> std::io::Result<()> {
        self.output_bytes += chunk.data.len() as u64;
        self.job.log.append(chunk.stream, &chunk.data)
    }
}
