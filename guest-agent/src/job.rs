//! Runs the job: its own process group, output streamed as acknowledged chunks while
//! it runs, wall-clock timeout (SIGTERM, then SIGKILL after the grace period), and
//! cancellation from the host. The job starts inside its sandbox (see [`crate::sandbox`]).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use agentlab_protocol::{
    Enforcement, GuestMessage, HostMessage, JobOutcome, JobResult, JobSpec, OutputStream, ProtocolError,
};
use agentlab_redact::Redactor;
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use crate::error::AgentError;
use crate::link::{Event, Link};
use crate::output::{self, Pieces};
use crate::sandbox::{AGENT_PID_ENV, LAUNCHER_SUBCOMMAND, LauncherReport, POLICY_ENV, prepare};
use crate::status::StatusBoard;

/// After the job's main process exits, how long its pipes may stay open before the
/// agent stops reading them (a daemon that escaped the process group holds them).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// How long the launcher may take to sandbox itself and exec the job.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Cap on what the agent reads from the report pipe.
const MAX_REPORT_BYTES: u64 = 64 * 1024;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Timeout,
    Cancel,
}

/// What the job gets of its secrets: the launcher's directory of environment secrets,
/// and the redactor every output byte passes through before it leaves the guest.
pub struct JobSecrets {
    pub env_dir: Option<PathBuf>,
    pub redactor: Redactor,
}

/// Runs the job to its end. The host may go away meanwhile: the job runs on and its
/// output waits in the link (see [`Link`]); only a host that never comes back stops it.
pub async fn run(
    link: &mut Link,
    spec: &JobSpec,
    board: &StatusBoard,
    status_socket: &Path,
    secrets: &JobSecrets,
) -> Result<JobResult, AgentError> {
    let started = Instant::now();
    let tmpdir = JobTmpdir(prepare::tmpdir_for(&spec.job_id, std::process::id()));
    let result = run_sandboxed(link, spec, board, &tmpdir.0, status_socket, secrets, started).await;
    let _ = tokio::task::spawn_blocking(move || drop(tmpdir)).await;
    result
}

/// The job's private tmp dir, removed when dropped: after the job, and also when a
/// SIGTERM drops the job's future halfway.
struct JobTmpdir(PathBuf);

impl Drop for JobTmpdir {
    fn drop(&mut self) {
        prepare::remove_tmpdir(&self.0);
    }
}

fn spawn_failed(started: Instant, reason: String, enforcement: Enforcement) -> JobResult {
    JobResult {
        outcome: JobOutcome::SpawnFailed { reason },
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        output_bytes: 0,
        enforcement,
    }
}

/// Starts the launcher, which sandboxes itself and execs the job. Returns the child
/// (now the job) and what the launcher enforced, or why the job did not start.
async fn launch(
    spec: &JobSpec,
    tmpdir: &Path,
    status_socket: &Path,
    env_secrets_dir: Option<&Path>,
    board: &StatusBoard,
) -> Result<(tokio::process::Child, Enforcement), (String, Enforcement)> {
    let no_enforcement = |reason: String| (reason, Enforcement::default());
    let (job_spec, tmp, socket) = (spec.clone(), tmpdir.to_owned(), status_socket.to_owned());
    let env_dir = env_secrets_dir.map(Path::to_owned);
    let policy = tokio::task::spawn_blocking(move || prepare::prepare(&job_spec, &tmp, &socket, env_dir.as_deref()))
        .await
        .map_err(|e| no_enforcement(format!("cannot sandbox the job: {e}")))?
        .map_err(|e| no_enforcement(format!("cannot sandbox the job: {e}")))?;
    let policy_json = serde_json::to_string(&policy).map_err(|e| no_enforcement(format!("sandbox policy: {e}")))?;
    let (report_rx, report_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| no_enforcement(format!("cannot create the sandbox report pipe: {e}")))?;
    let report_fd = report_tx.as_raw_fd();

    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg0("agentlab-agent")
        .arg(LAUNCHER_SUBCOMMAND)
        .arg("--report-fd")
        .arg(report_fd.to_string())
        .arg("--")
        .arg(&spec.program)
        .args(&spec.args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &spec.workdir)
        .env("LANG", "C.UTF-8")
        .env("AGENTLAB_JOB_ID", &spec.job_id)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env(AGENT_PID_ENV, std::process::id().to_string())
        .env(POLICY_ENV, policy_json)
        .current_dir(&spec.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl,
    // which is async-signal-safe, on a descriptor that is open in the child (inherited,
    // close-on-exec until this clears the flag so that the launcher inherits it).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(report_fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(report_tx);
    let mut child = spawned.map_err(|e| no_enforcement(format!("cannot start the sandbox launcher: {e}")))?;
    // Published at once: the job may ask `agentlab-agent status` as its very first act.
    let pid = child.id().unwrap_or(0);
    board.update(|s| {
        if let Some(job) = s.job.as_mut() {
            job.pid = Some(pid);
        }
    });

    // The pipe closes when the launcher execs the job (close-on-exec) or exits.
    let reader = tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        let _ = std::fs::File::from(report_rx).take(MAX_REPORT_BYTES).read_to_end(&mut bytes);
        bytes
    });
    let bytes = match tokio::time::timeout(LAUNCH_TIMEOUT, reader).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return Err(no_enforcement(format!("reading the sandbox report: {e}"))),
        Err(_) => {
            let _ = child.start_kill();
            return Err(no_enforcement(format!(
                "the sandbox launcher did not start the job within {} s",
                LAUNCH_TIMEOUT.as_secs()
            )));
        }
    };
    let mut enforcement = None;
    let mut failure = None;
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<LauncherReport>(line) {
            Ok(LauncherReport::Enforced(e)) => enforcement = Some(e),
            Ok(LauncherReport::Failed { reason } | LauncherReport::ExecFailed { reason }) => failure = Some(reason),
            Err(e) => failure = Some(format!("unreadable sandbox report: {e}")),
        }
    }
    match (enforcement, failure) {
        (Some(enforcement), None) => Ok((child, enforcement)),
        (enforcement, failure) => {
            let status = tokio::time::timeout(LAUNCH_TIMEOUT, child.wait()).await;
            let reason = failure.unwrap_or_else(|| match status {
                Ok(Ok(status)) => format!("the sandbox launcher ended before enforcing the sandbox ({status})"),
                _ => "the sandbox launcher ended before enforcing the sandbox".to_owned(),
            });
            Err((reason, enforcement.unwrap_or_default()))
        }
    }
}

async fn run_sandboxed(
    link: &mut Link,
    spec: &JobSpec,
    board: &StatusBoard,
    tmpdir: &Path,
    status_socket: &Path,
    secrets: &JobSecrets,
    started: Instant,
) -> Result<JobResult, AgentError> {
    let launched = launch(spec, tmpdir, status_socket, secrets.env_dir.as_deref(), board).await;
    let (mut child, enforcement) = match launched {
        Ok(launched) => launched,
        Err((reason, enforcement)) => return Ok(spawn_failed(started, reason, enforcement)),
    };
    let pid = child.id().unwrap_or(0);
    let group = Pid::from_raw(i32::try_from(pid).unwrap_or(0));
    // A host lost now learns of the job when it resumes it.
    link.send(GuestMessage::JobStarted { pid }).await;

    // A read's worth of pieces waiting per pipe keeps the readers busy while the link sends.
    let (tx, mut rx) = mpsc::channel::<Pieces>(2);
    let pipes = [
        (child.stdout.take().map(|p| p.into_owned_fd()), OutputStream::Stdout),
        (child.stderr.take().map(|p| p.into_owned_fd()), OutputStream::Stderr),
    ];
    for (pipe, stream) in pipes {
        let Some(pipe) = pipe else { continue };
        let reading =
            pipe.and_then(|fd| output::spawn_reader(fd, stream, secrets.redactor.clone(), link.pool(), tx.clone()));
        if let Err(e) = reading {
            // Without its reader the job would block on a full pipe: it is not run.
            let _ = killpg(group, Signal::SIGKILL);
            return Ok(spawn_failed(started, format!("reading the job's {stream:?}: {e}"), enforcement));
        }
    }
    drop(tx);

    let timeout = (spec.timeout_ms > 0).then(|| started + Duration::from_millis(spec.timeout_ms));
    let grace = Duration::from_millis(spec.kill_grace_ms);
    let far_future = started + Duration::from_secs(86_400 * 365);

    let mut output_bytes: u64 = 0;
    let mut pipes_open = true;
    let mut exit: Option<ExitStatus> = None;
    let mut stop: Option<(StopReason, Signal)> = None;
    let mut kill_at: Option<Instant> = None;
    let mut drain_until: Option<Instant> = None;

    let wait = child.wait();
    tokio::pin!(wait);

    while exit.is_none() || pipes_open {
        link.pump().await;
        let can_read = link.wants_output();
        tokio::select! {
            event = link.next() => match event {
                Ok(Event::Message(HostMessage::OutputAck { seq })) => link.ack(seq),
                Ok(Event::Message(HostMessage::Cancel)) if stop.is_none() && exit.is_none() => {
                    stop = Some((StopReason::Cancel, Signal::SIGTERM));
                    let _ = killpg(group, Signal::SIGTERM);
                    kill_at = Some(Instant::now() + grace);
                }
                // The host came back: it may not have heard that the job started (it
                // ignores a repeat).
                Ok(Event::Resumed) => {
                    link.send(GuestMessage::JobStarted { pid }).await;
                }
                Ok(_) => {}
                Err(gone) => {
                    // Nobody will ever receive the result. Stop everything.
                    let _ = killpg(group, Signal::SIGKILL);
                    return Err(gone);
                }
            },
            piece = rx.recv(), if can_read && pipes_open => match piece {
                Some((stream, pieces)) => {
                    for data in pieces {
                        output_bytes += data.len() as u64;
                        link.queue(stream, data);
                    }
                }
                None => pipes_open = false,
            },
            status = &mut wait, if exit.is_none() => {
                exit = Some(status.map_err(|e| ProtocolError::io("waiting for the job", e))?);
                // Whatever the job left running in its group goes with it.
                let _ = killpg(group, Signal::SIGKILL);
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
            () = sleep_until(timeout.unwrap_or(far_future)), if timeout.is_some() && stop.is_none() && exit.is_none() => {
                stop = Some((StopReason::Timeout, Signal::SIGTERM));
                let _ = killpg(group, Signal::SIGTERM);
                kill_at = Some(Instant::now() + grace);
            }
            () = sleep_until(kill_at.unwrap_or(far_future)), if kill_at.is_some() && exit.is_none() => {
                if let Some((reason, _)) = stop {
                    stop = Some((reason, Signal::SIGKILL));
                }
                let _ = killpg(group, Signal::SIGKILL);
                kill_at = None;
            }
            () = sleep_until(drain_until.unwrap_or(far_future)), if drain_until.is_some() && pipes_open => {
                tracing::warn!("job output pipes still open {} s after exit; not reading further", DRAIN_AFTER_EXIT.as_secs());
                pipes_open = false;
            }
        }
    }
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let outcome = outcome_of(exit, stop);
    Ok(JobResult { outcome, duration_ms, output_bytes, enforcement })
}

fn outcome_of(exit: Option<ExitStatus>, stop: Option<(StopReason, Signal)>) -> JobOutcome {
    use std::os::unix::process::ExitStatusExt;
    let died_of = exit.and_then(|e| e.signal());
    match (stop, exit) {
        (Some((reason, sent)), _) => {
            let signal = died_of.unwrap_or(sent as i32);
            match reason {
                StopReason::Timeout => JobOutcome::TimedOut { signal },
                StopReason::Cancel => JobOutcome::Cancelled { signal },
            }
        }
        (None, Some(status)) => match (status.code(), died_of) {
            (Some(code), _) => JobOutcome::Exited { code },
            (None, Some(signal)) => JobOutcome::Signaled { signal },
            (None, None) => JobOutcome::SpawnFailed { reason: format!("unrecognised exit status {status}") },
        },
        (None, None) => JobOutcome::SpawnFailed { reason: "the job vanished".to_owned() },
    }
}
