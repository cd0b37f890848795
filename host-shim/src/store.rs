//! SQLite state (WAL). Every state change is one transaction that also writes its
//! event row, and the transition table in [`crate::state`] is enforced here.

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::api::{EventView, JobView, SandboxView};
use crate::artifacts::ArtifactView;
use crate::state::{JobState, SandboxState};

const SCHEMA_VERSION: i64 = 5;
/// Migrations from version N-1 to N, for N = 2, 3, …; each runs in one transaction.
const MIGRATIONS: &[&str] = &[
    "ALTER TABLE jobs ADD COLUMN profile TEXT;",
    "ALTER TABLE jobs ADD COLUMN enforcement TEXT;",
    "CREATE TABLE artifacts (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        path TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        stored_at INTEGER NOT NULL,
        PRIMARY KEY (job_id, path)
    );",
    "ALTER TABLE sandboxes ADD COLUMN keepalive INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sandboxes ADD COLUMN lease_expires_at INTEGER;",
];
const SCHEMA: &str = "
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    job_id TEXT,
    accel TEXT,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
    state TEXT NOT NULL,
    command TEXT NOT NULL,
    repo TEXT,
    timeout_ms INTEGER NOT NULL,
    exit_code INTEGER,
    signal INTEGER,
    error TEXT,
    guest_kernel TEXT,
    agent_version TEXT,
    output_bytes INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    duration_ms INTEGER
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    job_id TEXT,
    sandbox_id TEXT,
    kind TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    message TEXT
);
CREATE INDEX events_by_job ON events(job_id, id);
CREATE INDEX events_by_sandbox ON events(sandbox_id, id);
";

/// Errors of the state store.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum StoreError {
    /// state database: {0}
    Sqlite(#[from] rusqlite::Error),
    /// cannot open the state database {path}: {source}
    Open { path: String, source: rusqlite::Error },
    /// the state database {path} has schema version {found}, newer than this agentlabd ({supported}); upgrade agentlabd
    SchemaTooNew { path: String, found: i64, supported: i64 },
    /// no {kind} with id {id}
    NotFound { kind: &'static str, id: String },
    /// illegal {kind} transition for {id}: {from} -> {to}
    IllegalTransition { kind: &'static str, id: String, from: String, to: String },
    /// corrupt state database: {0}
    Corrupt(String),
}

/// A new job and the sandbox that will run it.
pub struct NewJob<'a> {
    pub job_id: &'a str,
    pub sandbox_id: &'a str,
    pub backend: &'a str,
    pub command: &'a str,
    pub repo: Option<&'a str>,
    pub timeout_ms: u64,
    pub profile: &'a str,
    /// Keep the sandbox after the job, until its lease ends.
    pub keepalive: bool,
    /// When the sandbox's lease ends (ms since the epoch); none: when its job ends.
    pub lease_expires_at_ms: Option<i64>,
}

/// Rows per state, for metrics.
pub struct StateCounts {
    pub sandboxes: Vec<(String, i64)>,
    pub jobs: Vec<(String, i64)>,
}

/// Result fields written together with a job's final transition.
#[derive(Default)]
pub struct JobEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: Option<u64>,
    pub output_bytes: u64,
    /// What the guest reports it enforced, as JSON.
    pub enforcement: Option<String>,
}

pub struct Store {
    conn: Mutex<Connection>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A stored time (ms since the epoch) as RFC 3339 with milliseconds, as the CLI and
/// event messages show it.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: path.display().to_string(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version == 0 {
            conn.execute_batch(&format!("BEGIN; {SCHEMA} PRAGMA user_version = 1; COMMIT;")).map_err(open_err)?;
        }
        for (from, migration) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version.max(1) - 1).unwrap_or(0)) {
            let to = from + 2;
            conn.execute_batch(&format!("BEGIN; {migration} PRAGMA user_version = {to}; COMMIT;")).map_err(open_err)?;
        }
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut conn)
    }

    fn in_tx<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Records a new job (QUEUED) and its sandbox (REQUESTED).
    pub fn create_job(&self, job: &NewJob<'_>) -> Result<(), StoreError> {
        self.in_tx(|tx| {
            let now = now_ms();
            tx.execute(
                "INSERT INTO sandboxes (id, backend, state, job_id, created_at, updated_at, keepalive, lease_expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
                params![
                    job.sandbox_id,
                    job.backend,
                    SandboxState::Requested.as_str(),
                    job.job_id,
                    now,
                    job.keepalive,
                    job.lease_expires_at_ms
                ],
            )?;
            tx.execute(
                "INSERT INTO jobs (id, sandbox_id, state, command, repo, timeout_ms, created_at, profile) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    job.job_id,
                    job.sandbox_id,
                    JobState::Queued.as_str(),
                    job.command,
                    job.repo,
                    i64::try_from(job.timeout_ms).unwrap_or(i64::MAX),
                    now,
                    job.profile
                ],
            )?;
            insert_event(tx, Some(job.job_id), Some(job.sandbox_id), "job.created", None, Some("QUEUED"), None)?;
            insert_event(tx, Some(job.job_id), Some(job.sandbox_id), "sandbox.created", None, Some("REQUESTED"), None)?;
            Ok(())
        })
    }

    /// Moves a sandbox to `to`, recording why. Returns the state it left.
    pub fn transition_sandbox(
        &self,
        id: &str,
        to: SandboxState,
        message: Option<&str>,
    ) -> Result<SandboxState, StoreError> {
        self.in_tx(|tx| {
            let (from, job_id): (String, Option<String>) = tx
                .query_row("SELECT state, job_id FROM sandboxes WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .ok_or_else(|| StoreError::NotFound { kind: "sandbox", id: id.to_owned() })?;
            let from_state =
                SandboxState::parse(&from).ok_or_else(|| StoreError::Corrupt(format!("sandbox {id} state {from}")))?;
            if !from_state.can_become(to) {
                return Err(StoreError::IllegalTransition {
                    kind: "sandbox",
                    id: id.to_owned(),
                    from,
                    to: to.as_str().to_owned(),
                });
            }
            let error = matches!(to, SandboxState::Failed | SandboxState::Timeout).then_some(message).flatten();
            tx.execute(
                "UPDATE sandboxes SET state = ?2, updated_at = ?3, error = COALESCE(?4, error) WHERE id = ?1",
                params![id, to.as_str(), now_ms(), error],
            )?;
            insert_event(tx, job_id.as_deref(), Some(id), "sandbox.state", Some(&from), Some(to.as_str()), message)?;
            Ok(from_state)
        })
    }

    /// Moves a job to `to`. A terminal state also stores `end`.
    pub fn transition_job(
        &self,
        id: &str,
        to: JobState,
        end: Option<&JobEnd>,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        self.in_tx(|tx| {
            let (from, sandbox_id): (String, String) = tx
                .query_row("SELECT state, sandbox_id FROM jobs WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .ok_or_else(|| StoreError::NotFound { kind: "job", id: id.to_owned() })?;
            let from_state = JobState::parse(&from).ok_or_else(|| StoreError::Corrupt(format!("job {id} state {from}")))?;
            if !from_state.can_become(to) {
                return Err(StoreError::IllegalTransition { kind: "job", id: id.to_owned(), from, to: to.as_str().to_owned() });
            }
            let now = now_ms();
            tx.execute("UPDATE jobs SET state = ?2 WHERE id = ?1", params![id, to.as_str()])?;
            if to == JobState::Running {
                tx.execute("UPDATE jobs SET started_at = ?2 WHERE id = ?1", params![id, now])?;
            }
            if let Some(end) = end {
                tx.execute(
                    "UPDATE jobs SET exit_code = ?2, signal = ?3, error = ?4, duration_ms = ?5, output_bytes = ?6, finished_at = ?7, enforcement = ?8 WHERE id = ?1",
                    params![
                        id,
                        end.exit_code,
                        end.signal,
                        end.error,
                        end.duration_ms.map(|d| i64::try_from(d).unwrap_or(i64::MAX)),
                        i64::try_from(end.output_bytes).unwrap_or(i64::MAX),
                        now,
                        end.enforcement
                    ],
                )?;
            }
            insert_event(tx, Some(id), Some(&sandbox_id), "job.state", Some(&from), Some(to.as_str()), message)?;
            Ok(())
        })
    }

    /// What the guest said about itself in its Hello (untrusted, stored for display).
    pub fn set_guest_info(&self, job_id: &str, kernel: &str, agent_version: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET guest_kernel = ?2, agent_version = ?3 WHERE id = ?1",
                params![job_id, kernel, agent_version],
            )?;
            Ok(())
        })
    }

    pub fn set_sandbox_accel(&self, sandbox_id: &str, accel: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("UPDATE sandboxes SET accel = ?2 WHERE id = ?1", params![sandbox_id, accel])?;
            Ok(())
        })
    }

    /// An event that is not a state change.
    pub fn record_event(
        &self,
        job_id: Option<&str>,
        sandbox_id: Option<&str>,
        kind: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        self.in_tx(|tx| insert_event(tx, job_id, sandbox_id, kind, None, None, Some(message)))
    }

    pub fn job(&self, id: &str) -> Result<JobView, StoreError> {
        self.with(|c| {
            let mut job = c
                .query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"), [id], job_from_row)
                .optional()?
                .ok_or_else(|| StoreError::NotFound { kind: "job", id: id.to_owned() })??;
            let mut stmt = c.prepare(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE job_id = ?1 ORDER BY id"))?;
            job.events = stmt.query_map([id], event_from_row)?.collect::<Result<_, _>>()?;
            Ok(job)
        })
    }

    /// Newest first.
    pub fn jobs(&self, limit: usize) -> Result<Vec<JobView>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare(&format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?1"))?;
            let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], job_from_row)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row??);
            }
            Ok(out)
        })
    }

    /// Newest first.
    pub fn sandboxes(&self) -> Result<Vec<SandboxView>, StoreError> {
        self.sandboxes_where("1 = 1", [])
    }

    /// One sandbox, with its events.
    pub fn sandbox(&self, id: &str) -> Result<SandboxView, StoreError> {
        let mut view = self
            .sandboxes_where("id = ?1", [id])?
            .pop()
            .ok_or_else(|| StoreError::NotFound { kind: "sandbox", id: id.to_owned() })?;
        view.events = self.with(|c| {
            let mut stmt =
                c.prepare(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE sandbox_id = ?1 ORDER BY id"))?;
            Ok(stmt.query_map([id], event_from_row)?.collect::<Result<_, _>>()?)
        })?;
        Ok(view)
    }

    /// Sandboxes with a VM whose lease ended before `now_ms`.
    pub fn expired_sandboxes(&self, now_ms: i64) -> Result<Vec<SandboxView>, StoreError> {
        self.sandboxes_where(
            "state != 'DESTROYED' AND lease_expires_at IS NOT NULL AND lease_expires_at < ?1",
            [now_ms],
        )
    }

    /// Moves a sandbox's lease end, with an event.
    pub fn renew_lease(&self, id: &str, expires_at_ms: i64, message: &str) -> Result<(), StoreError> {
        self.in_tx(|tx| {
            let job_id: Option<String> = tx
                .query_row("SELECT job_id FROM sandboxes WHERE id = ?1", [id], |r| r.get(0))
                .optional()?
                .ok_or_else(|| StoreError::NotFound { kind: "sandbox", id: id.to_owned() })?;
            tx.execute("UPDATE sandboxes SET lease_expires_at = ?2 WHERE id = ?1", params![id, expires_at_ms])?;
            insert_event(tx, job_id.as_deref(), Some(id), "lease.renewed", None, None, Some(message))
        })
    }

    fn sandboxes_where<P: rusqlite::Params>(&self, condition: &str, params: P) -> Result<Vec<SandboxView>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT id, backend, state, job_id, accel, error, created_at, updated_at, keepalive, lease_expires_at FROM sandboxes WHERE {condition} ORDER BY created_at DESC, rowid DESC"
            ))?;
            let rows = stmt.query_map(params, |r| {
                let state: String = r.get(2)?;
                Ok((state, SandboxView {
                    id: r.get(0)?,
                    backend: r.get(1)?,
                    state: SandboxState::Requested,
                    job_id: r.get(3)?,
                    accel: r.get(4)?,
                    error: r.get(5)?,
                    created_at_ms: r.get(6)?,
                    updated_at_ms: r.get(7)?,
                    keepalive: r.get(8)?,
                    lease_expires_at_ms: r.get(9)?,
                    events: Vec::new(),
                }))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (state, mut view) = row?;
                view.state = SandboxState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("sandbox state {state}")))?;
                out.push(view);
            }
            Ok(out)
        })
    }

    /// Up to `limit` events after the event id `after`, oldest first, of one job or all.
    pub fn events_after(&self, job: Option<&str>, after: i64, limit: usize) -> Result<Vec<EventView>, StoreError> {
        self.with(|c| {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = match job {
                Some(job) => c
                    .prepare(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE job_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
                    ))?
                    .query_map(params![job, after, limit], event_from_row)?
                    .collect::<Result<Vec<_>, _>>()?,
                None => c
                    .prepare(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE id > ?1 ORDER BY id LIMIT ?2"))?
                    .query_map(params![after, limit], event_from_row)?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            Ok(rows)
        })
    }

    /// Records a job's stored artifacts, with one event, in one transaction.
    pub fn add_artifacts(&self, job_id: &str, sandbox_id: &str, stored: &[ArtifactView]) -> Result<(), StoreError> {
        self.in_tx(|tx| {
            let now = now_ms();
            let mut insert = tx.prepare(
                "INSERT OR REPLACE INTO artifacts (job_id, path, bytes, sha256, stored_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for a in stored {
                insert.execute(params![job_id, a.path, i64::try_from(a.bytes).unwrap_or(i64::MAX), a.sha256, now])?;
            }
            let total: u64 = stored.iter().map(|a| a.bytes).sum();
            let msg = format!("{} file(s), {total} bytes", stored.len());
            insert_event(tx, Some(job_id), Some(sandbox_id), "artifacts.stored", None, None, Some(&msg))
        })
    }

    /// Forgets a job's artifacts (before they are collected again).
    pub fn clear_artifacts(&self, job_id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("DELETE FROM artifacts WHERE job_id = ?1", [job_id])?;
            Ok(())
        })
    }

    /// A job's artifacts, by path.
    pub fn artifacts(&self, job_id: &str) -> Result<Vec<ArtifactView>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT path, bytes, sha256 FROM artifacts WHERE job_id = ?1 ORDER BY path")?;
            let rows = stmt.query_map([job_id], |r| {
                let bytes: i64 = r.get(1)?;
                Ok(ArtifactView { path: r.get(0)?, bytes: u64::try_from(bytes).unwrap_or(0), sha256: r.get(2)? })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// How many sandboxes and jobs are in each state.
    pub fn count_by_state(&self) -> Result<StateCounts, StoreError> {
        self.with(|c| {
            let count = |table: &str| -> Result<Vec<(String, i64)>, StoreError> {
                let mut stmt = c.prepare(&format!("SELECT state, COUNT(*) FROM {table} GROUP BY state"))?;
                Ok(stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?)
            };
            Ok(StateCounts { sandboxes: count("sandboxes")?, jobs: count("jobs")? })
        })
    }

    /// Jobs and sandboxes a previous daemon left mid-flight.
    pub fn unfinished(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        self.with(|c| {
            let jobs = c
                .prepare("SELECT id FROM jobs WHERE state IN ('QUEUED', 'RUNNING')")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            let sandboxes = c
                .prepare("SELECT id FROM sandboxes WHERE state != 'DESTROYED'")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok((jobs, sandboxes))
        })
    }
}

const JOB_COLUMNS: &str = "id, sandbox_id, state, command, repo, timeout_ms, exit_code, signal, error, guest_kernel, \
     agent_version, output_bytes, created_at, started_at, finished_at, duration_ms, profile, enforcement";

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<JobView, StoreError>> {
    let state: String = r.get(2)?;
    let Some(state) = JobState::parse(&state) else {
        return Ok(Err(StoreError::Corrupt(format!("job state {state}"))));
    };
    let timeout_ms: i64 = r.get(5)?;
    let output_bytes: i64 = r.get(11)?;
    let duration_ms: Option<i64> = r.get(15)?;
    Ok(Ok(JobView {
        id: r.get(0)?,
        sandbox_id: r.get(1)?,
        state,
        command: r.get(3)?,
        repo: r.get(4)?,
        timeout_ms: u64::try_from(timeout_ms).unwrap_or(0),
        exit_code: r.get(6)?,
        signal: r.get(7)?,
        error: r.get(8)?,
        guest_kernel: r.get(9)?,
        agent_version: r.get(10)?,
        output_bytes: u64::try_from(output_bytes).unwrap_or(0),
        created_at_ms: r.get(12)?,
        started_at_ms: r.get(13)?,
        finished_at_ms: r.get(14)?,
        duration_ms: duration_ms.map(|d| u64::try_from(d).unwrap_or(0)),
        profile: r.get(16)?,
        enforcement: r.get::<_, Option<String>>(17)?.and_then(|json| serde_json::from_str(&json).ok()),
        queue: None,
        events: Vec::new(),
    }))
}

const EVENT_COLUMNS: &str = "at, kind, job_id, sandbox_id, from_state, to_state, message, id";

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventView> {
    Ok(EventView {
        at_ms: r.get(0)?,
        kind: r.get(1)?,
        job_id: r.get(2)?,
        sandbox_id: r.get(3)?,
        from_state: r.get(4)?,
        to_state: r.get(5)?,
        message: r.get(6)?,
        id: r.get(7)?,
    })
}

fn insert_event(
    tx: &Transaction<'_>,
    job_id: Option<&str>,
    sandbox_id: Option<&str>,
    kind: &str,
    from: Option<&str>,
    to: Option<&str>,
    message: Option<&str>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO events (at, job_id, sandbox_id, kind, from_state, to_state, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![now_ms(), job_id, sandbox_id, kind, from, to, message],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("agentlab.db")).unwrap();
        (dir, store)
    }

    fn new_job(store: &Store, n: u32) -> (String, String) {
        let (job, sb) = (format!("job-{n}"), format!("sb-{n}"));
        store
            .create_job(&NewJob {
                job_id: &job,
                sandbox_id: &sb,
                backend: "qemu",
                command: "echo hi",
                repo: None,
                timeout_ms: 5000,
                profile: "p",
                keepalive: false,
                lease_expires_at_ms: Some(1000),
            })
            .unwrap();
        (job, sb)
    }

    #[test]
    fn leases_expire_renew_and_show_with_events() {
        let (_dir, store) = store();
        let (_, sb) = new_job(&store, 7);
        assert_eq!(store.expired_sandboxes(999).unwrap().len(), 0);
        assert_eq!(store.expired_sandboxes(1001).unwrap()[0].id, sb);
        store.renew_lease(&sb, 5000, "the lease now ends in 4s").unwrap();
        assert!(store.expired_sandboxes(1001).unwrap().is_empty());
        let view = store.sandbox(&sb).unwrap();
        assert_eq!(view.lease_expires_at_ms, Some(5000));
        assert_eq!(view.events.last().unwrap().kind, "lease.renewed");
        store.transition_sandbox(&sb, SandboxState::Destroyed, None).unwrap();
        assert!(store.expired_sandboxes(6000).unwrap().is_empty(), "a destroyed sandbox has no lease to expire");
        assert!(matches!(store.renew_lease("sb-none", 1, "x"), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn a_version_1_database_is_migrated_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!("{SCHEMA} PRAGMA user_version = 1;")).unwrap();
        conn.execute(
            "INSERT INTO sandboxes (id, backend, state, created_at, updated_at) VALUES ('sb-1', 'qemu', 'DESTROYED', 1, 1)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO jobs (id, sandbox_id, state, command, timeout_ms, created_at) VALUES ('job-1', 'sb-1', 'COMPLETED', 'true', 1, 1)",
            [],
        )
        .unwrap();
        drop(conn);
        let store = Store::open(&path).unwrap();
        let job = store.job("job-1").unwrap();
        assert_eq!((job.state, job.profile), (JobState::Completed, None));
        let version: i64 = store.with(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99;").unwrap();
        let err = Store::open(&path).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "the state database {} has schema version 99, newer than this agentlabd ({SCHEMA_VERSION}); upgrade agentlabd",
                path.display()
            )
        );
    }

    #[test]
    fn database_is_wal_and_reopens() {
        let (dir, store) = store();
        new_job(&store, 1);
        let mode: String = store.with(|c| Ok(c.pragma_query_value(None, "journal_mode", |r| r.get(0))?)).unwrap();
        assert_eq!(mode, "wal");
        drop(store);
        let again = Store::open(&dir.path().join("agentlab.db")).unwrap();
        assert_eq!(again.job("job-1").unwrap().state, JobState::Queued);
    }

    #[test]
    fn every_transition_writes_an_event_in_order() {
        let (_dir, store) = store();
        let (job, sb) = new_job(&store, 1);
        for to in [SandboxState::Provisioning, SandboxState::Booting, SandboxState::Ready, SandboxState::Running] {
            store.transition_sandbox(&sb, to, None).unwrap();
        }
        store.transition_job(&job, JobState::Running, None, None).unwrap();
        let end = JobEnd { exit_code: Some(3), duration_ms: Some(12), output_bytes: 4, ..JobEnd::default() };
        store.transition_job(&job, JobState::Failed, Some(&end), Some("exit code 3")).unwrap();
        let view = store.job(&job).unwrap();
        assert_eq!(view.state, JobState::Failed);
        assert_eq!((view.exit_code, view.duration_ms, view.output_bytes), (Some(3), Some(12), 4));
        let trail: Vec<_> =
            view.events.iter().map(|e| format!("{}:{}", e.kind, e.to_state.clone().unwrap_or_default())).collect();
        assert_eq!(
            trail,
            [
                "job.created:QUEUED",
                "sandbox.created:REQUESTED",
                "sandbox.state:PROVISIONING",
                "sandbox.state:BOOTING",
                "sandbox.state:READY",
                "sandbox.state:RUNNING",
                "job.state:RUNNING",
                "job.state:FAILED"
            ]
        );
        assert_eq!(view.events.last().unwrap().message.as_deref(), Some("exit code 3"));
    }

    #[test]
    fn illegal_transitions_name_both_states_and_change_nothing() {
        let (_dir, store) = store();
        let (job, sb) = new_job(&store, 1);
        let err = store.transition_sandbox(&sb, SandboxState::Running, None).unwrap_err();
        assert_eq!(err.to_string(), "illegal sandbox transition for sb-1: REQUESTED -> RUNNING");
        let err = store.transition_job(&job, JobState::Completed, None, None).unwrap_err();
        assert_eq!(err.to_string(), "illegal job transition for job-1: QUEUED -> COMPLETED");
        assert_eq!(store.job(&job).unwrap().events.len(), 2);
        assert_eq!(store.sandboxes().unwrap()[0].state, SandboxState::Requested);
        let err = store.transition_job("job-404", JobState::Running, None, None).unwrap_err();
        assert_eq!(err.to_string(), "no job with id job-404");
    }

    #[test]
    fn failure_message_is_kept_on_the_sandbox() {
        let (_dir, store) = store();
        let (_job, sb) = new_job(&store, 1);
        store.transition_sandbox(&sb, SandboxState::Failed, Some("qemu missing")).unwrap();
        assert_eq!(store.sandboxes().unwrap()[0].error.as_deref(), Some("qemu missing"));
        let (jobs, sandboxes) = store.unfinished().unwrap();
        assert_eq!((jobs, sandboxes), (vec!["job-1".to_owned()], vec!["sb-1".to_owned()]));
    }

    #[test]
    fn lists_are_newest_first() {
        let (_dir, store) = store();
        for n in 1..=3 {
            new_job(&store, n);
        }
        let ids: Vec<_> = store.jobs(10).unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(ids, ["job-3", "job-2", "job-1"]);
        assert_eq!(store.jobs(2).unwrap().len(), 2);
    }
}
