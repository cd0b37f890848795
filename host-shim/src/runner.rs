//! Drives one job through its sandbox's life: provision, boot, session, teardown.
//! Every failure ends the job with the underlying cause, never a bare "failed".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentlab_protocol::{
    ArtifactRequest, Enforcement, GUEST_SECRETS_DIR, Hello, HelloAck, HostConnection, HostMessage, JobOutcome,
    JobResult, JobSpec, OutputChunk, OutputStream, SecretBundle,
};
use agentlab_redact::{RedactStream, Redactor};
use tokio::sync::watch;

use crate::admission::{Admitted, Need};
use crate::agent_listener::{AgentListener, BoxedStream};
use crate::backend::{ProvisionRequest, Sandbox};
use crate::channel::{HostSession, SessionObserver, sanitize_guest_text};
use crate::daemon::Daemon;
use crate::joblog::JobLog;
use crate::leases::KeptSandbox;
use crate::profile::Profile;
use crate::state::{JobState, SandboxState};
use crate::store::{JobEnd, Store};

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
    /// Holds the reason once the job is to be cancelled (`agentlab job cancel`, an
    /// expired lease, `sandbox destroy --force`).
    pub cancelled: watch::Receiver<Option<String>>,
    /// Keep the sandbox after the job, until its lease ends.
    pub keepalive: bool,
    /// What the job is doing now, for followers' progress display.
    pub phase: watch::Sender<&'static str>,
}

/// A sandbox whose job reported: its agent's session is still open.
struct Held {
    session: HostSession<BoxedStream>,
    listener: AgentListener,
}

/// How a job ended, before it is written down.
struct Finish {
    job: JobState,
    sandbox: SandboxState,
    end: JobEnd,
    message: String,
    /// The job's end is in the database already.
    recorded: bool,
}

impl Finish {
    fn failed(sandbox: SandboxState, message: String) -> Finish {
        Finish {
            job: JobState::Failed,
            sandbox,
            end: JobEnd { error: Some(message.clone()), ..JobEnd::default() },
            message,
            recorded: false,
        }
    }

    /// Stores the job's end (once): before its sandbox goes, so that a crash during the
    /// teardown cannot lose a result that came in.
    fn record(&mut self, store: &Store, job_id: &str) {
        if !self.recorded {
            set_job(store, job_id, self.job, Some(&self.end), Some(&self.message));
            self.recorded = true;
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
    let mut finish = drive(&daemon, &job).await;
    conclude(&daemon, &job, &mut finish);
}

/// Records how the job ended (if not yet) and lets go of it.
fn conclude(daemon: &Daemon, job: &QueuedJob, finish: &mut Finish) {
    finish.record(&daemon.store, &job.job_id);
    job.log.close();
    daemon.job_done(&job.job_id);
    if let Some(upload) = &job.upload {
        let _ = std::fs::remove_file(upload);
    }
    tracing::info!(job = %job.job_id, state = %finish.job, "{}", finish.message);
}

/// Why the job is cancelled, once it is; `None` if it no longer can be.
async fn cancelled_because(job: &QueuedJob) -> Option<String> {
    let mut cancelled = job.cancelled.clone();
    cancelled.wait_for(Option::is_some).await.ok().and_then(|reason| reason.clone())
}

/// Runs the job and tears its sandbox down; returns how it ended.
async fn drive(daemon: &Arc<Daemon>, job: &QueuedJob) -> Finish {
    let store = &daemon.store;
    let sb = job.sandbox_id.as_str();
    let record = |to: SandboxState, msg: Option<&str>| set_sandbox(store, sb, to, msg);

    let admitted = match admit(daemon, job).await {
        Ok(admitted) => admitted,
        Err(msg) => {
            record(SandboxState::Destroyed, Some(&msg));
            return Finish::failed(SandboxState::Destroyed, msg);
        }
    };
    record(SandboxState::Provisioning, None);
    job.phase.send_replace("provisioning");
    let secrets = match load_secrets(daemon, job).await {
        Ok(secrets) => secrets,
        Err(msg) => {
            record(SandboxState::Failed, Some(&msg));
            record(SandboxState::Destroyed, None);
            return Finish::failed(SandboxState::Failed, msg);
        }
    };
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
    let provisioning = std::time::Instant::now();
    let mut vm = match provisioned.await {
        Ok(vm) => {
            daemon.metrics.provisioned(provisioning.elapsed());
            crate::crashpoint::here("provisioned");
            vm
        }
        Err(e) => {
            daemon.metrics.backend_error("provision");
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

    let mut held = None;
    let finish = boot_and_run(daemon, job, vm.as_mut(), secrets, &mut held).await;
    teardown(daemon, job, vm, finish, held, admitted).await
}

/// After the session: the sandbox is kept (`--keepalive`) or destroyed.
async fn teardown(
    daemon: &Arc<Daemon>,
    job: &QueuedJob,
    vm: Box<dyn Sandbox>,
    mut finish: Finish,
    held: Option<Held>,
    admitted: Admitted,
) -> Finish {
    let (store, sb) = (&daemon.store, job.sandbox_id.as_str());
    finish.record(store, &job.job_id);
    crate::crashpoint::here("result-stored");
    job.phase.send_replace(TEARING_DOWN);
    set_sandbox(store, sb, finish.sandbox, Some(&finish.message));
    if let Some(held) = held {
        if job.keepalive && job.cancelled.borrow().is_none() {
            keep(daemon, job, vm, held, admitted);
            crate::crashpoint::here("kept");
            return finish;
        }
        let mut session = held.session;
        session.shutdown().await;
    }
    if destroy_vm(daemon, &job.job_id, sb, vm).await.is_ok() {
        set_sandbox(store, sb, SandboxState::Destroyed, None);
    }
    finish
}

/// Destroys a sandbox's VM. A failure is counted, logged and recorded as a
/// `sandbox.destroy_failed` event, and its message returned.
pub(crate) async fn destroy_vm(daemon: &Daemon, job_id: &str, sb: &str, vm: Box<dyn Sandbox>) -> Result<(), String> {
    vm.destroy().await.map_err(|e| {
        daemon.metrics.backend_error("destroy");
        let msg = format!("tearing sandbox {sb} down failed: {e}");
        tracing::error!("{msg}");
        let _ = daemon.store.record_event(Some(job_id), Some(sb), "sandbox.destroy_failed", &msg);
        msg
    })
}

/// Carries on with a job whose sandbox an earlier, killed agentlabd left running: waits
/// for its agent to dial back in, tells it how much output is stored, takes the rest
/// and the result, then collects the artifacts and tears down as usual.
pub async fn resume(
    daemon: Arc<Daemon>,
    job: QueuedJob,
    mut vm: Box<dyn Sandbox>,
    stored_through: Option<u64>,
    admitted: Admitted,
) {
    let finish = resume_session(&daemon, &job, vm.as_mut(), stored_through).await;
    let (finish, held) = finish;
    let mut finish = teardown(&daemon, &job, vm, finish, held, admitted).await;
    conclude(&daemon, &job, &mut finish);
}

/// Like [`resume`], for a VM the backend has to look up first (Proxmox, through its
/// API). The job is live meanwhile: followable, cancellable, counted by admission. A
/// VM that is gone or stopped fails the job with why; the reconciler destroys the rest.
pub async fn resume_when_found(daemon: Arc<Daemon>, job: QueuedJob, stored_through: Option<u64>, admitted: Admitted) {
    job.phase.send_replace("reconnecting");
    let found = tokio::select! {
        found = daemon.backend.reattach(&job.sandbox_id) => found,
        Some(reason) = cancelled_because(&job) => Err(reason),
    };
    match found {
        Ok(vm) => resume(daemon, job, vm, stored_through, admitted).await,
        Err(why) => {
            let reason = format!("agentlabd restarted and cannot take the job back: {why}");
            set_sandbox(&daemon.store, &job.sandbox_id, SandboxState::Failed, Some(&reason));
            let mut finish = Finish::failed(SandboxState::Failed, reason);
            conclude(&daemon, &job, &mut finish);
        }
    }
}

async fn resume_session(
    daemon: &Arc<Daemon>,
    job: &QueuedJob,
    vm: &mut dyn Sandbox,
    stored_through: Option<u64>,
) -> (Finish, Option<Held>) {
    let sb = job.sandbox_id.as_str();
    let mut listener = match AgentListener::listen(&vm.channel()) {
        Ok(l) => l,
        Err(e) => {
            return (
                Finish::failed(SandboxState::Failed, format!("cannot listen for sandbox {sb}'s agent: {e}")),
                None,
            );
        }
    };
    job.phase.send_replace("reconnecting");
    let stream = tokio::select! {
        accepted = tokio::time::timeout(RESUME_WAIT, listener.accept()) => match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return (Finish::failed(SandboxState::Failed, format!("accepting sandbox {sb}'s agent: {e}")), None),
            Err(_) => return (Finish::failed(
                SandboxState::Failed,
                format!("sandbox {sb}: its agent did not dial back in within {} s of agentlabd's restart", RESUME_WAIT.as_secs()),
            ), None),
        },
        exit = vm.exited() => return (Finish::failed(
            SandboxState::Failed,
            format!("sandbox {sb}: the VM stopped before its agent dialed back in: {}", exit.description),
        ), None),
    };
    let redactor = match load_secrets(daemon, job).await {
        Ok(bundle) => Redactor::new(bundle.values()),
        Err(msg) => return (Finish::failed(SandboxState::Failed, msg), None),
    };
    job.phase.send_replace("running");
    let mut held = None;
    let finish =
        run_session(daemon, job, vm, stream, listener, Start::Resume { stored_through }, redactor, &mut held).await;
    (finish, held)
}

/// Hands the sandbox to the daemon's kept set: the VM and its agent's session stay until
/// its lease ends or `agentlab sandbox destroy`.
fn keep(daemon: &Arc<Daemon>, job: &QueuedJob, vm: Box<dyn Sandbox>, held: Held, admitted: Admitted) {
    let (owner, job_id, sandbox_id) = (daemon.clone(), job.job_id.clone(), job.sandbox_id.clone());
    let mut listener = held.listener;
    let refuser = tokio::spawn(async move {
        match refuse_further_sessions(&mut listener, &owner.store, &job_id, &sandbox_id).await {}
    });
    let lease = daemon.store.sandbox(&job.sandbox_id).ok().and_then(|s| s.lease_expires_at_ms).map_or_else(
        || "it has no lease end".to_owned(),
        |ms| format!("its lease ends {}", crate::store::rfc3339_ms(ms)),
    );
    let msg = format!("kept after its job ({lease}); `agentlab sandbox destroy {}` ends it now", job.sandbox_id);
    let _ = daemon.store.record_event(Some(&job.job_id), Some(&job.sandbox_id), "sandbox.kept", &msg);
    let kept = KeptSandbox { job_id: job.job_id.clone(), vm, session: held.session, refuser, _admitted: admitted };
    daemon.kept.insert(&job.sandbox_id, kept);
}

/// Waits until the host's budget and the profile's limit leave room for the sandbox
/// (recording why, if it has to wait), or until the job is cancelled.
async fn admit(daemon: &Daemon, job: &QueuedJob) -> Result<Admitted, String> {
    let need = need_of(daemon, &job.profile);
    let on_wait = |why: String| {
        let _ = daemon.store.record_event(Some(&job.job_id), Some(&job.sandbox_id), "job.queued", &why);
    };
    tokio::select! {
        biased;
        Some(reason) = cancelled_because(job) => Err(format!("{reason} before it started")),
        admitted = daemon.admission.acquire(&job.job_id, need, on_wait) => admitted.map_err(|e| e.to_string()),
    }
}

/// What a sandbox of `profile` takes from the budget: what the backend grants it.
pub(crate) fn need_of(daemon: &Daemon, profile: &Profile) -> Need {
    let (cores, memory_mb) = daemon.backend.granted(profile.resources.cores, profile.resources.memory_mb);
    Need { cores, memory_mb: u64::from(memory_mb), profile: profile.name.clone(), profile_max: profile.max_sandboxes }
}

/// The profile's secrets bundle, decrypted into memory. A profile whose bundle does not
/// exist runs without secrets, and the job's events say how to create it.
async fn load_secrets(daemon: &Daemon, job: &QueuedJob) -> Result<SecretBundle, String> {
    let Some(name) = job.profile.secrets_bundle.clone() else {
        return Ok(SecretBundle::default());
    };
    let (store, wanted) = (daemon.secrets.clone(), name.clone());
    let loaded = tokio::task::spawn_blocking(move || store.load(&wanted))
        .await
        .map_err(|e| format!("loading secrets bundle {name:?}: {e}"))?;
    match loaded {
        Ok(Some(bundle)) => Ok(bundle),
        Ok(None) => {
            let msg = format!(
                "profile {} names secrets bundle {name:?}, which does not exist: the job runs without secrets (create it with `agentlab secrets set --bundle {name} --env NAME`)",
                job.profile.name
            );
            let _ = daemon.store.record_event(Some(&job.job_id), Some(&job.sandbox_id), "secrets.missing", &msg);
            Ok(SecretBundle::default())
        }
        Err(e) => Err(format!("cannot open secrets bundle {name:?} of profile {}: {e}", job.profile.name)),
    }
}

/// Boots the VM and runs the job's session. If the job reports, its session is left in
/// `held` (open), for the caller to close or keep.
async fn boot_and_run(
    daemon: &Daemon,
    job: &QueuedJob,
    vm: &mut dyn Sandbox,
    secrets: SecretBundle,
    held: &mut Option<Held>,
) -> Finish {
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
    job.phase.send_replace("booting");
    let booting = std::time::Instant::now();
    if let Err(e) = vm.boot().await {
        daemon.metrics.backend_error("boot");
        return Finish::failed(SandboxState::Failed, format!("booting sandbox {sb} failed: {e}\n{}", vm.diagnostics()));
    }
    crate::crashpoint::here("booting");
    record_warnings(store, job, vm);

    let boot_timeout = daemon.config.boot_timeout;
    let stream: BoxedStream = tokio::select! {
        biased;
        Some(reason) = cancelled_because(job) => {
            return Finish::failed(SandboxState::Failed, format!("sandbox {sb}: {reason} while it booted"));
        }
        accepted = tokio::time::timeout(boot_timeout, listener.accept()) => match accepted {
            Ok(Ok(stream)) => {
                daemon.metrics.booted(booting.elapsed());
                stream
            }
            Ok(Err(e)) => return Finish::failed(SandboxState::Failed, format!("accepting sandbox {sb}'s agent: {e}")),
            Err(_) => {
                daemon.metrics.backend_error("boot-timeout");
                return Finish::failed(
                SandboxState::Timeout,
                format!(
                    "sandbox {sb}: the guest agent did not dial in within {} s; {}\n{}",
                    boot_timeout.as_secs(),
                    vm.dial_in_hint(),
                    vm.diagnostics()
                ),
            )},
        },
        exit = vm.exited() => return Finish::failed(
            SandboxState::Failed,
            format!("sandbox {sb}: the VM stopped before its agent dialed in: {}\n{}", exit.description, vm.diagnostics()),
        ),
    };
    // Exactly one agent session per sandbox: the listener stays open only to turn any
    // later connection away (it could be the job posing as its agent) and record it.
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
    let redactor = Redactor::new(secrets.values());
    run_session(daemon, job, vm, stream, listener, Start::Fresh { spec: Box::new(spec), secrets }, redactor, held).await
}

/// How a session begins: a new job, or one taken back after a restart.
enum Start {
    Fresh { spec: Box<JobSpec>, secrets: SecretBundle },
    Resume { stored_through: Option<u64> },
}

/// The session with the agent, to the job's result and artifacts. If the job reports,
/// its session is left in `held` (open), for the caller to close or keep.
#[allow(clippy::too_many_arguments)]
async fn run_session(
    daemon: &Daemon,
    job: &QueuedJob,
    vm: &mut dyn Sandbox,
    stream: BoxedStream,
    mut listener: AgentListener,
    start: Start,
    redactor: Redactor,
    held: &mut Option<Held>,
) -> Finish {
    let (store, sb) = (&daemon.store, job.sandbox_id.as_str());
    // The agent enforces the job's timeout; the host only steps in if the guest
    // fails to report well after it.
    let watchdog = Duration::from_millis(job.timeout_ms) + daemon.config.kill_grace + daemon.config.report_slack;
    let resumed_at = match &start {
        Start::Resume { stored_through } => *stored_through,
        Start::Fresh { .. } => None,
    };
    let mut observer = Observer {
        daemon,
        job,
        output_bytes: 0,
        stdout: redactor.clone().into_stream(),
        stderr: redactor.clone().into_stream(),
        truncated: false,
        last_seq: resumed_at,
        unacked: 0,
    };
    let mut session = HostSession::new(stream).with_cancel(job.cancelled.clone());
    enum Ended {
        Reported(JobResult),
        Broken(String),
        Silent(String),
    }
    let ended = tokio::select! {
        biased;
        result = tokio::time::timeout(watchdog, async {
            match start {
                Start::Fresh { spec, secrets } => session.run(sb, *spec, secrets, job.upload.as_deref(), &mut observer).await,
                Start::Resume { stored_through } => session.resume(sb, &job.job_id, stored_through, &mut observer).await,
            }
        }) => match result {
            Ok(Ok(result)) => Ended::Reported(result),
            Ok(Err(e)) => Ended::Broken(e.to_string()),
            Err(_) => Ended::Silent(format!("the guest did not report a result within {} s of the job's start", watchdog.as_secs())),
        },
        exit = vm.exited() => Ended::Broken(format!("the VM stopped during the session: {}", exit.description)),
        never = refuse_further_sessions(&mut listener, store, &job.job_id, &job.sandbox_id) => match never {},
    };
    if let Err(e) = observer.finish() {
        tracing::error!(job = %job.job_id, "storing the last of the job's output: {e}");
    }
    let output_bytes = observer.output_bytes;
    let (reason, timed_out) = match ended {
        Ended::Reported(result) => {
            crate::crashpoint::here("result-received");
            let mut collecting =
                Collecting { daemon, job, session: &mut session, observer: &mut observer, listener: &mut listener };
            job.phase.send_replace(COLLECTING_ARTIFACTS);
            let stopped_by_cancel = matches!(result.outcome, JobOutcome::Cancelled { .. });
            collecting.artifacts(&redactor, vm, stopped_by_cancel).await;
            daemon.metrics.job_ran(Duration::from_millis(result.duration_ms));
            let cancel_reason = job.cancelled.borrow().clone();
            *held = Some(Held { session, listener });
            return finish_from_result(&result, output_bytes, cancel_reason.as_deref());
        }
        Ended::Broken(reason) => (reason, false),
        Ended::Silent(reason) => (reason, true),
    };
    daemon.metrics.backend_error("session");
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

/// How a reported job ended; `cancelled` is why it was cancelled, if it was.
fn finish_from_result(result: &JobResult, output_bytes: u64, cancelled: Option<&str>) -> Finish {
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
            let why = cancelled.unwrap_or("cancelled");
            (JobState::Failed, SandboxState::Completed, format!("{why}; stopped with {}", signal_name(*signal)))
        }
        JobOutcome::SpawnFailed { reason } => {
            (JobState::Failed, SandboxState::Failed, format!("the job could not start in the guest: {reason}"))
        }
    };
    if job != JobState::Completed {
        end.error = Some(message.clone());
    }
    Finish { job, sandbox, end, message, recorded: false }
}

fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned())
}

/// The phase between a job's result and its teardown, in which a cancel stops the push.
pub const COLLECTING_ARTIFACTS: &str = "collecting artifacts";
/// The phase after the push, while the artifacts are unpacked and recorded.
pub const STORING_ARTIFACTS: &str = "storing artifacts";
/// The last phase: the job's record is complete, its sandbox goes.
pub const TEARING_DOWN: &str = "tearing down";
/// How long the guest may take to push its artifacts.
const ARTIFACT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a restarted agentlabd waits for a running sandbox's agent to dial back in
/// (the agent re-dials every 200 ms).
const RESUME_WAIT: Duration = Duration::from_secs(60);
/// Most guest-reported lines (skipped or rejected artifacts) recorded as events.
const MAX_ARTIFACT_EVENTS: usize = 32;

/// The artifact phase, after the result is in: the job's outcome no longer depends on
/// it, so every failure here is an event, not a failed job.
struct Collecting<'a, 'd> {
    daemon: &'d Daemon,
    job: &'d QueuedJob,
    session: &'a mut HostSession<BoxedStream>,
    observer: &'a mut Observer<'d>,
    listener: &'a mut AgentListener,
}

impl Collecting<'_, '_> {
    fn event(&self, kind: &str, message: &str) {
        let _ = self.daemon.store.record_event(Some(&self.job.job_id), Some(&self.job.sandbox_id), kind, message);
    }

    /// Collects and stores the artifacts; `stopped_by_cancel`: the job itself ended by a
    /// cancel, whose answer was to stop the job, not its artifacts.
    async fn artifacts(&mut self, redactor: &Redactor, vm: &mut dyn Sandbox, stopped_by_cancel: bool) {
        let wanted = &self.job.profile.artifacts;
        let max_bytes = u64::from(wanted.max_mb) * 1024 * 1024;
        let request = ArtifactRequest { globs: wanted.globs.clone(), max_bytes };
        let job_dir = self.daemon.config.job_dir(&self.job.job_id);
        let part = job_dir.join("artifacts.tar.part");
        let mut sink = match std::fs::File::create(&part) {
            Ok(f) => f,
            Err(e) => return self.event("artifacts.failed", &format!("cannot create {}: {e}", part.display())),
        };
        let (daemon, job) = (self.daemon, self.job);
        let mut cancelled = job.cancelled.clone();
        let cancel_only = |why: &str| format!("{why} after the job ended; its artifacts were not collected");
        // A cancel that stopped the job has had its answer; only a new one stops the push.
        // One that came after the job ended, before the push, stops it before it starts.
        if let Some(why) = cancelled.borrow_and_update().clone()
            && !stopped_by_cancel
        {
            return self.event("artifacts.cancelled", &cancel_only(&why));
        }
        let failed = |msg: String| ("artifacts.failed", msg);
        let collected = tokio::select! {
            biased;
            r = tokio::time::timeout(ARTIFACT_TIMEOUT, self.session.collect_artifacts(request, &mut sink, &mut *self.observer)) => match r {
                Ok(r) => r.map_err(|e| failed(e.to_string())),
                Err(_) => Err(failed(format!("the artifacts did not arrive within {} s", ARTIFACT_TIMEOUT.as_secs()))),
            },
            exit = vm.exited() => Err(failed(format!("the VM stopped while pushing artifacts: {}", exit.description))),
            Ok(()) = cancelled.changed() => {
                let why = cancelled.borrow().clone().unwrap_or_default();
                Err(("artifacts.cancelled", format!("{why} while the guest pushed its artifacts; none were stored")))
            },
            never = refuse_further_sessions(&mut *self.listener, &daemon.store, &job.job_id, &job.sandbox_id) => match never {},
        };
        drop(sink);
        // From here a cancel has nothing left to stop (see `Daemon::cancel_with`).
        job.phase.send_replace(STORING_ARTIFACTS);
        match collected {
            Ok(None) => self.event(
                "artifacts.unsupported",
                "the guest agent cannot push artifacts: rebuild the image with a current agent",
            ),
            Ok(Some(summary)) => {
                for line in summary.skipped.iter().take(MAX_ARTIFACT_EVENTS) {
                    self.event("artifacts.skipped", &sanitize_guest_text(line));
                }
                self.store(&part, &job_dir.join("artifacts"), max_bytes, redactor).await;
            }
            Err((kind, msg)) => self.event(kind, &msg),
        }
        let _ = std::fs::remove_file(&part);
    }

    /// Unpacks the verified stream (off the async threads) and records what it held.
    async fn store(&mut self, tar: &std::path::Path, dest: &std::path::Path, max_bytes: u64, redactor: &Redactor) {
        // A job taken back after a restart pushes its artifacts again: the new push
        // replaces whatever the earlier one stored.
        if dest.exists() {
            let _ = std::fs::remove_dir_all(dest);
        }
        let _ = self.daemon.store.clear_artifacts(&self.job.job_id);
        let (tar_, dest_, redactor_) = (tar.to_owned(), dest.to_owned(), redactor.clone());
        let unpacked =
            tokio::task::spawn_blocking(move || crate::artifacts::unpack(&tar_, &dest_, max_bytes, &redactor_)).await;
        let unpacked = match unpacked {
            Ok(Ok(unpacked)) => unpacked,
            Ok(Err(e)) => return self.event("artifacts.failed", &format!("unpacking into {}: {e}", dest.display())),
            Err(e) => return self.event("artifacts.failed", &format!("the unpacking task failed: {e}")),
        };
        for line in unpacked.rejected.iter().take(MAX_ARTIFACT_EVENTS) {
            self.event("artifacts.rejected", line);
        }
        if unpacked.rejected.len() > MAX_ARTIFACT_EVENTS {
            self.event("artifacts.rejected", &format!("… and {} more", unpacked.rejected.len() - MAX_ARTIFACT_EVENTS));
        }
        self.daemon.metrics.artifacts_stored(unpacked.stored.iter().map(|a| a.bytes).sum());
        if let Err(e) = self.daemon.store.add_artifacts(&self.job.job_id, &self.job.sandbox_id, &unpacked.stored) {
            self.event("artifacts.failed", &format!("recording the artifacts: {e}"));
        }
        crate::crashpoint::here("artifacts-stored");
    }
}

/// Turns away every connection after the first and records it (the first 16; a
/// guest opening thousands must not fill the database). Never returns.
async fn refuse_further_sessions(
    listener: &mut AgentListener,
    store: &Store,
    job_id: &str,
    sandbox_id: &str,
) -> std::convert::Infallible {
    const MAX_RECORDED: u32 = 16;
    // Long enough for a guest under TCG to send its Hello after the connection is up.
    const REFUSAL_WAIT: Duration = Duration::from_secs(5);
    let reason = format!(
        "sandbox {} already has its agent session; a second connection to the agent port is refused",
        sandbox_id
    );
    let mut refused = 0u32;
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                // A lasting failure (out of descriptors) must not spin this loop.
                tracing::warn!("accepting on the agent socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        refused += 1;
        if refused <= MAX_RECORDED {
            let _ = store.record_event(Some(job_id), Some(sandbox_id), "channel.refused", &reason);
        }
        // Its Hello is read (one bounded frame, briefly) so that the answer reaches it
        // rather than a reset: a real agent that lost the race then logs why it stops.
        let mut conn = HostConnection::new(stream);
        let reject = HostMessage::HelloReject {
            reason: reason.clone(),
            min_version: agentlab_protocol::MIN_PROTOCOL_VERSION,
            max_version: agentlab_protocol::PROTOCOL_VERSION,
        };
        let _ = tokio::time::timeout(REFUSAL_WAIT, async {
            let _ = conn.recv().await;
            let _ = conn.send(reject).await;
        })
        .await;
    }
}

struct Observer<'a> {
    daemon: &'a Daemon,
    job: &'a QueuedJob,
    output_bytes: u64,
    /// The host's own pass over the guest's (already redacted) output, one per stream,
    /// before anything is stored: a guest that failed to redact does not get its
    /// secrets into the log.
    stdout: RedactStream<'static>,
    stderr: RedactStream<'static>,
    truncated: bool,
    /// The last chunk received, and how many since the last acknowledgement.
    last_seq: Option<u64>,
    unacked: u64,
}

/// Chunks after which held-back bytes are released rather than keep the agent waiting.
const FORCE_RELEASE_AFTER: u64 = agentlab_protocol::CHUNK_WINDOW / 2;

impl Observer<'_> {
    fn store(&mut self, stream: OutputStream, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.output_bytes += data.len() as u64;
        let stored = self.job.log.append(stream, data)?;
        if stored {
            self.daemon.metrics.log_stored(data.len());
        } else if !self.truncated {
            self.truncated = true;
            let msg = format!(
                "the output reached {} bytes, the log's limit (agentlabd --max-log-mb); the rest is dropped",
                self.daemon.config.max_log_bytes
            );
            let _ = self.daemon.store.record_event(
                Some(&self.job.job_id),
                Some(&self.job.sandbox_id),
                "log.truncated",
                &msg,
            );
        }
        Ok(())
    }

    /// Stores what the redactors still hold; the output is complete.
    fn finish(&mut self) -> std::io::Result<()> {
        self.flush()?;
        match self.last_seq {
            Some(seq) => self.job.log.checkpoint(seq),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        self.stdout.flush(&mut out);
        self.stderr.flush(&mut err);
        self.store(OutputStream::Stdout, &out)?;
        self.store(OutputStream::Stderr, &err)
    }
}

impl SessionObserver for Observer<'_> {
    fn handshake_done(&mut self, hello: &Hello, ack: &HelloAck) {
        let store = &self.daemon.store;
        let kernel = sanitize_guest_text(&hello.kernel_release);
        let agent = sanitize_guest_text(&hello.agent_version);
        let _ = store.set_guest_info(&self.job.job_id, &kernel, &agent);
        let msg = format!("agent {agent} on kernel {kernel}, protocol v{}", ack.version);
        // A resumed session finds the sandbox running already.
        if store.sandbox(&self.job.sandbox_id).is_ok_and(|s| s.state.can_become(SandboxState::Ready)) {
            set_sandbox(store, &self.job.sandbox_id, SandboxState::Ready, Some(&msg));
        } else {
            let _ = store.record_event(Some(&self.job.job_id), Some(&self.job.sandbox_id), "channel.resumed", &msg);
        }
        crate::crashpoint::here("handshake");
    }

    fn secrets_delivered(&mut self, bundle: &SecretBundle) {
        let names: Vec<String> = bundle.entries.iter().map(|e| format!("{} {}", e.kind.as_str(), e.name)).collect();
        let msg = if bundle.entries.is_empty() {
            "none: the job has no secrets".to_owned()
        } else {
            format!("bundle {}: {}", bundle.name, names.join(", "))
        };
        let _ = self.daemon.store.record_event(
            Some(&self.job.job_id),
            Some(&self.job.sandbox_id),
            "secrets.delivered",
            &msg,
        );
    }

    fn secrets_refused(&mut self, reason: &str) {
        let _ = self.daemon.store.record_event(
            Some(&self.job.job_id),
            Some(&self.job.sandbox_id),
            "secrets.refused",
            reason,
        );
    }

    fn job_started(&mut self, pid: u32) {
        self.job.phase.send_replace("running");
        let store = &self.daemon.store;
        let msg = format!("guest pid {pid}");
        set_sandbox(store, &self.job.sandbox_id, SandboxState::Running, None);
        set_job(store, &self.job.job_id, JobState::Running, None, Some(&msg));
        crate::crashpoint::here("job-started");
    }

    /// A chunk is acknowledged once everything through it is in the log (with a
    /// checkpoint): while the redactor holds back a possible secret prefix, the chunk
    /// stays the agent's to resend after a crash. After [`FORCE_RELEASE_AFTER`] chunks
    /// without that, the held bytes are released, so the agent's window never stalls.
    fn output(&mut self, chunk: &OutputChunk) -> std::io::Result<bool> {
        let mut clean = Vec::with_capacity(chunk.data.len());
        match chunk.stream {
            OutputStream::Stdout => self.stdout.push(&chunk.data, &mut clean),
            OutputStream::Stderr => self.stderr.push(&chunk.data, &mut clean),
        }
        self.store(chunk.stream, &clean)?;
        self.last_seq = Some(chunk.seq);
        let complete = self.stdout.held() == 0 && self.stderr.held() == 0;
        if !complete && self.unacked < FORCE_RELEASE_AFTER {
            self.unacked += 1;
            return Ok(false);
        }
        if !complete {
            self.flush()?;
        }
        self.job.log.checkpoint(chunk.seq)?;
        if chunk.seq == 2 {
            crate::crashpoint::here("mid-stream");
        }
        self.unacked = 0;
        Ok(true)
    }
}
