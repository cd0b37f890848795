//! Streaming a job's output and the event log, stored and live.

use std::time::Duration;

use tokio::net::UnixStream;

use super::error;
use crate::api::{ApiResponse, ServerConnection};
use crate::daemon::Daemon;
use crate::joblog::{LogProgress, LogReader, tail_start};
use crate::state::SandboxState;

type Sent = Result<ApiResponse, agentlab_protocol::ProtocolError>;

/// How often followed events are looked for (they are rows in SQLite).
const EVENT_POLL: Duration = Duration::from_millis(200);
/// Events sent per query.
const EVENT_BATCH: usize = 500;

/// Streams a job's output from `offset` (or its last `tail_lines` lines), live too with
/// `follow`, then its final view.
pub(super) async fn logs(
    daemon: &Daemon,
    conn: &mut ServerConnection<UnixStream>,
    id: &str,
    offset: u64,
    tail_lines: Option<u64>,
    follow: bool,
) -> Sent {
    if let Err(e) = daemon.store.job(id) {
        return Ok(error(e));
    }
    let path = daemon.config.job_dir(id).join("output.log");
    let mut progress = if follow { daemon.live_log(id).map(|log| log.subscribe()) } else { None };
    let mut phase = if follow { daemon.phase(id) } else { None };
    if let Some(rx) = phase.as_mut() {
        let name = (*rx.borrow_and_update()).to_owned();
        conn.send(ApiResponse::Phase { name }).await?;
    }
    let stored_len = || std::fs::metadata(&path).map_or(0, |m| m.len());
    let (start, mut skip) = match tail_lines {
        Some(lines) => {
            let limit = progress.as_ref().map_or_else(stored_len, |rx| rx.borrow().len);
            match tail_start(&path, limit, lines) {
                Ok(start) => start,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, 0),
                Err(e) => return Ok(error(format!("reading {}: {e}", path.display()))),
            }
        }
        None => (offset, 0),
    };
    let mut reader = match LogReader::open(&path, start) {
        Ok(r) => Some(r),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Ok(error(format!("reading {}: {e}", path.display()))),
    };
    loop {
        let now = match progress.as_mut() {
            Some(rx) => *rx.borrow_and_update(),
            None => LogProgress { len: stored_len(), closed: true, full: false },
        };
        if let Some(reader) = reader.as_mut() {
            loop {
                match reader.next_record(now.len) {
                    Ok(Some((stream, data))) => {
                        let data = if skip > 0 { data.get(skip..).unwrap_or_default().to_vec() } else { data };
                        skip = 0;
                        if !data.is_empty() {
                            conn.send(ApiResponse::Output { stream, data, offset: reader.offset() }).await?;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Ok(error(format!("reading {}: {e}", path.display()))),
                }
            }
        }
        if now.closed {
            break;
        }
        let Some(rx) = progress.as_mut() else {
            continue;
        };
        tokio::select! {
            changed = rx.changed() => if changed.is_err() {
                // The runner dropped the log: everything is on disk now.
                progress = None;
            },
            changed = async { phase.as_mut()?.changed().await.ok() }, if phase.is_some() => match changed {
                Some(()) => {
                    let name = phase.as_mut().map(|p| (*p.borrow_and_update()).to_owned()).unwrap_or_default();
                    conn.send(ApiResponse::Phase { name }).await?;
                }
                None => phase = None,
            },
        }
    }
    Ok(match daemon.store.job(id) {
        Ok(job) => ApiResponse::Job(Box::new(job)),
        Err(e) => error(e),
    })
}

/// Streams events after `after`; with `follow`, new ones as they come. Following one
/// job ends once it is finished and its sandbox destroyed.
pub(super) async fn events(
    daemon: &Daemon,
    conn: &mut ServerConnection<UnixStream>,
    job: Option<&str>,
    mut after: i64,
    follow: bool,
) -> Sent {
    if let Some(id) = job
        && let Err(e) = daemon.store.job(id)
    {
        return Ok(error(e));
    }
    loop {
        // Checked before the query, so that the events that finished it are still sent.
        let was_finished = job.is_some_and(|id| finished(daemon, id));
        let batch = match daemon.store.events_after(job, after, EVENT_BATCH) {
            Ok(batch) => batch,
            Err(e) => return Ok(error(e)),
        };
        let full = batch.len() == EVENT_BATCH;
        for event in batch {
            after = event.id;
            conn.send(ApiResponse::Event(event)).await?;
        }
        if full {
            continue;
        }
        if !follow || was_finished {
            return Ok(ApiResponse::Done);
        }
        tokio::time::sleep(EVENT_POLL).await;
    }
}

/// The job has ended and its sandbox is gone: no more events will come for it.
fn finished(daemon: &Daemon, id: &str) -> bool {
    let Ok(job) = daemon.store.job(id) else {
        return true;
    };
    job.state.is_terminal() && daemon.store.sandbox(&job.sandbox_id).is_ok_and(|s| s.state == SandboxState::Destroyed)
}
