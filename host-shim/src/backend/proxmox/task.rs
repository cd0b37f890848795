//! Waiting for Proxmox tasks: poll the node named in the UPID with backoff until the
//! task stops, then read its exit status. `OK` is success; `WARNINGS: N` is success
//! with warnings, which are recorded; anything else fails with the task log's end.

use std::time::Duration;

use serde_json::Value;

use super::client::{Method, PveClient};
use super::error::{PveError, log_tail};
use super::upid::Upid;

/// Lines of the task log quoted in a failure.
const LOG_TAIL_LINES: usize = 10;
const FIRST_POLL: Duration = Duration::from_millis(25);
const MAX_POLL: Duration = Duration::from_secs(2);

/// A task that ended well.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSuccess {
    /// `Some(n)` for `WARNINGS: n`.
    pub warnings: Option<u32>,
    /// For a success with warnings: the operation, the task and its log's end, to record.
    pub note: Option<String>,
}

/// Percent-encodes a UPID for a path segment (it contains `:`, `@` and `!`).
fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Interprets a stopped task's `exitstatus`.
pub fn classify_exitstatus(exitstatus: &str) -> Result<TaskSuccess, String> {
    let text = exitstatus.trim();
    if text == "OK" {
        return Ok(TaskSuccess { warnings: None, note: None });
    }
    if let Some(n) = text.strip_prefix("WARNINGS: ").and_then(|n| n.trim().parse().ok()) {
        return Ok(TaskSuccess { warnings: Some(n), note: None });
    }
    Err(if text.is_empty() { "the task stopped without an exit status".to_owned() } else { text.to_owned() })
}

/// Waits for `upid` to finish, at most `timeout`.
pub async fn wait(client: &PveClient, op: &str, upid: &Upid, timeout: Duration) -> Result<TaskSuccess, PveError> {
    let path = format!("/nodes/{}/tasks/{}/status", upid.node, encode_segment(upid.as_str()));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = FIRST_POLL;
    loop {
        tokio::time::sleep(pause).await;
        let status = client.call(op, Method::Get, &path, &[]).await?;
        if status.get("status").and_then(Value::as_str) == Some("stopped") {
            let exitstatus = status.get("exitstatus").and_then(Value::as_str).unwrap_or_default();
            return match classify_exitstatus(exitstatus) {
                Ok(mut success) => {
                    if let Some(n) = success.warnings {
                        let log = log_lines(client, op, upid).await.unwrap_or_default();
                        let note = format!("{op}: task {upid} succeeded with {n} warning(s){}", log_tail(&log));
                        tracing::warn!("{note}");
                        success.note = Some(note);
                    }
                    Ok(success)
                }
                Err(exitstatus) => {
                    let log = log_lines(client, op, upid).await.unwrap_or_default();
                    Err(PveError::TaskFailed {
                        op: op.to_owned(),
                        upid: upid.to_string(),
                        exitstatus,
                        log: log_tail(&log),
                    })
                }
            };
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(PveError::TaskTimeout { op: op.to_owned(), upid: upid.to_string(), secs: timeout.as_secs() });
        }
        pause = (pause * 3 / 2).min(MAX_POLL);
    }
}

/// The last lines of a task's log.
async fn log_lines(client: &PveClient, op: &str, upid: &Upid) -> Result<Vec<String>, PveError> {
    let path = format!("/nodes/{}/tasks/{}/log", upid.node, encode_segment(upid.as_str()));
    let lines = client.call(op, Method::Get, &path, &[("limit", "1000".to_owned())]).await?;
    let all: Vec<String> = lines
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.get("t").and_then(Value::as_str)).map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(all[all.len().saturating_sub(LOG_TAIL_LINES)..].to_vec())
}

/// Reads a UPID out of a call's answer.
/// Waits for the task whose UPID an API call answered with (`data`).
pub async fn wait_answered(
    client: &PveClient,
    op: &str,
    data: &Value,
    timeout: Duration,
) -> Result<TaskSuccess, PveError> {
    wait(client, op, &upid_of(op, data)?, timeout).await
}

fn upid_of(op: &str, data: &Value) -> Result<Upid, PveError> {
    let text = data
        .as_str()
        .ok_or_else(|| PveError::Decode { op: op.to_owned(), detail: format!("expected a UPID, got {data}") })?;
    Upid::parse(text).map_err(|detail| PveError::Decode { op: op.to_owned(), detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(classify_exitstatus("OK"), Ok(TaskSuccess { warnings: None, note: None }));
        assert_eq!(classify_exitstatus("WARNINGS: 3"), Ok(TaskSuccess { warnings: Some(3), note: None }));
        assert_eq!(
            classify_exitstatus("clone failed: storage 'local-lvm' is full"),
            Err("clone failed: storage 'local-lvm' is full".to_owned())
        );
        assert!(classify_exitstatus("").unwrap_err().contains("without an exit status"));
        // "WARNINGS:" without a count is not the success form.
        assert_eq!(classify_exitstatus("WARNINGS: many"), Err("WARNINGS: many".to_owned()));
    }

    #[test]
    fn upids_are_encoded_as_one_segment() {
        assert_eq!(
            encode_segment("UPID:pve:00000001:00000002:00000003:qmclone:9000:a@pve!t:"),
            "UPID%3Apve%3A00000001%3A00000002%3A00000003%3Aqmclone%3A9000%3Aa%40pve%21t%3A"
        );
    }
}
