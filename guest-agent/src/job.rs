//! Runs the job: its own process group, output streamed as acknowledged chunks while
//! it runs, wall-clock timeout (SIGTERM, then SIGKILL after the grace period), and
//! cancellation from the host.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use agentlab_protocol::{
    CHUNK_WINDOW, GuestConnection, GuestMessage, HostMessage, JobOutcome, JobResult, JobSpec, MAX_CHUNK_LEN,
    OutputChunk, OutputStream, ProtocolError,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use crate::session::Stream;
use crate::status::StatusBoard;

/// After the job's main process exits, how long its pipes may stay open before the
/// agent stops reading them (a daemon that escaped the process group holds them).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Timeout,
    Cancel,
}

pub async fn run<S: Stream>(
    conn: &mut GuestConnection<S>,
    spec: &JobSpec,
    board: &StatusBoard,
) -> Result<JobResult, ProtocolError> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &spec.workdir)
        .env("LANG", "C.UTF-8")
        .env("AGENTLAB_JOB_ID", &spec.job_id)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Ok(JobResult {
                outcome: JobOutcome::SpawnFailed { reason: format!("cannot start {:?}: {e}", spec.program) },
                duration_ms: 0,
                output_bytes: 0,
            });
        }
    };
    let pid = child.id().unwrap_or(0);
    let group = Pid::from_raw(i32::try_from(pid).unwrap_or(0));
    board.update(|s| {
        if let Some(job) = s.job.as_mut() {
            job.pid = Some(pid);
        }
    });
    conn.send(GuestMessage::JobStarted { pid }).await?;

    let (tx, mut rx) = mpsc::channel::<(OutputStream, Vec<u8>)>(4);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, OutputStream::Stdout, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, OutputStream::Stderr, tx.clone()));
    }
    drop(tx);

    let timeout = (spec.timeout_ms > 0).then(|| started + Duration::from_millis(spec.timeout_ms));
    let grace = Duration::from_millis(spec.kill_grace_ms);
    let far_future = started + Duration::from_secs(86_400 * 365);

    let mut next_seq: u64 = 0;
    let mut acked: u64 = 0; // chunks acknowledged
    let mut output_bytes: u64 = 0;
    let mut pipes_open = true;
    let mut exit: Option<ExitStatus> = None;
    let mut stop: Option<(StopReason, Signal)> = None;
    let mut kill_at: Option<Instant> = None;
    let mut drain_until: Option<Instant> = None;

    let wait = child.wait();
    tokio::pin!(wait);

    while exit.is_none() || pipes_open {
        let window_open = next_seq - acked < CHUNK_WINDOW;
        tokio::select! {
            msg = conn.recv() => match msg? {
                Some(HostMessage::OutputAck { seq }) => acked = acked.max(seq.saturating_add(1)).min(next_seq),
                Some(HostMessage::Cancel) if stop.is_none() && exit.is_none() => {
                    stop = Some((StopReason::Cancel, Signal::SIGTERM));
                    let _ = killpg(group, Signal::SIGTERM);
                    kill_at = Some(Instant::now() + grace);
                }
                Some(_) => {}
                None => {
                    // The host is gone: nobody can receive the result. Stop everything.
                    let _ = killpg(group, Signal::SIGKILL);
                    return Err(ProtocolError::Closed { waiting_for: "output acknowledgements" });
                }
            },
            chunk = rx.recv(), if window_open && pipes_open => match chunk {
                Some((stream, data)) => {
                    output_bytes += data.len() as u64;
                    conn.send(GuestMessage::Output(OutputChunk { seq: next_seq, stream, data })).await?;
                    next_seq += 1;
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
            () = sleep_until(drain_until.unwrap_or(far_future)), if drain_until.is_some() => {
                tracing::warn!("job output pipes still open {} s after exit; not reading further", DRAIN_AFTER_EXIT.as_secs());
                pipes_open = false;
            }
        }
    }

    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let outcome = outcome_of(exit, stop);
    Ok(JobResult { outcome, duration_ms, output_bytes })
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

async fn pump<R: AsyncRead + Unpin>(mut pipe: R, stream: OutputStream, tx: mpsc::Sender<(OutputStream, Vec<u8>)>) {
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((stream, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}
