//! The daemon's shared state: configuration, store, backend and live jobs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::admission::Admission;
use crate::api::{MAX_REPO_BYTES, SubmitRequest};
use crate::backend::Backend;
use crate::config::{DEFAULT_PROFILE, DaemonConfig};
use crate::ids::new_id;
use crate::joblog::JobLog;
use crate::leases::Kept;
use crate::metrics::Metrics;
use crate::profile::{Profile, ProfileError, ProfileSet};
use crate::runner::{self, QueuedJob};
use crate::secrets::SecretStore;
use crate::state::JobState;
use crate::store::{NewJob, Store, StoreError, now_ms};

/// Longest command line accepted.
const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Longest job timeout accepted: 7 days.
const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DaemonError {
    /// {0}
    Store(#[from] StoreError),
    /// cannot load the profiles: {0}
    Profiles(Box<ProfileError>),
    /// invalid: {0}
    Invalid(String),
    /// {context}: {source}
    Io { context: String, source: std::io::Error },
}

pub struct Daemon {
    pub config: DaemonConfig,
    pub store: Store,
    pub profiles: ProfileSet,
    pub backend: Arc<dyn Backend>,
    pub secrets: SecretStore,
    live: Mutex<HashMap<String, LiveJob>>,
    /// Sandboxes kept after their job.
    pub kept: Kept,
    pub admission: Arc<Admission>,
    pub metrics: Metrics,
}

/// A job that has not finished: its log, and the switch that cancels it (with why).
struct LiveJob {
    log: Arc<JobLog>,
    cancel: watch::Sender<Option<String>>,
    phase: watch::Receiver<&'static str>,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Io { context, source }
}

impl Daemon {
    /// Opens the state and settles whatever a previous daemon left unfinished.
    pub fn open(config: DaemonConfig, backend: Arc<dyn Backend>) -> Result<Arc<Daemon>, DaemonError> {
        // QEMU and vhost-device-vsock take socket paths inside comma-separated options.
        for (flag, path) in [("--state-dir", &config.state_dir), ("--image-dir", &config.qemu.image_dir)] {
            if path.to_string_lossy().contains(',') {
                return Err(DaemonError::Invalid(format!(
                    "{flag} {} contains a comma, which QEMU and vhost-device-vsock read as an option separator: choose a path without one",
                    path.display()
                )));
            }
        }
        for dir in [&config.state_dir, &config.jobs_dir(), &config.uploads_dir(), &config.qemu.run_dir] {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let profiles =
            crate::profile::load_dir(&config.profiles_dir).map_err(|e| DaemonError::Profiles(Box::new(e)))?;
        let store = Store::open(&config.db_path())?;
        let secrets = SecretStore::new(&config.secrets_dir());
        let admission = Admission::new(config.budget);
        let daemon = Arc::new(Daemon {
            config,
            store,
            profiles,
            backend,
            secrets,
            live: Mutex::new(HashMap::new()),
            kept: Kept::default(),
            admission,
            metrics: Metrics::default(),
        });
        daemon.recover()?;
        Ok(daemon)
    }

    /// Checks a submission before anything is stored; returns its profile.
    pub fn validate(&self, req: &SubmitRequest) -> Result<Profile, DaemonError> {
        if req.command.trim().is_empty() {
            return Err(DaemonError::Invalid("the command is empty: pass --cmd 'COMMAND'".into()));
        }
        if req.command.len() > MAX_COMMAND_BYTES {
            return Err(DaemonError::Invalid(format!(
                "the command is {} bytes, over the {MAX_COMMAND_BYTES}-byte limit: put it in a script in the repo",
                req.command.len()
            )));
        }
        if req.timeout_ms > MAX_TIMEOUT_MS {
            return Err(DaemonError::Invalid("the timeout is over 7 days".into()));
        }
        if req.repo_bytes.is_some_and(|b| b > MAX_REPO_BYTES) {
            return Err(DaemonError::Invalid(format!("the repo tarball is over the {MAX_REPO_BYTES}-byte limit")));
        }
        let name = req.profile.as_deref().unwrap_or(DEFAULT_PROFILE);
        self.profiles.get(name).cloned().ok_or_else(|| DaemonError::Invalid(self.profiles.unknown(name)))
    }

    pub fn upload_path(&self, upload_id: &str) -> PathBuf {
        self.config.uploads_dir().join(format!("{upload_id}.tar"))
    }

    /// Records a validated job and starts running it. `upload` is a finished repo tarball.
    pub fn submit(
        self: &Arc<Self>,
        req: SubmitRequest,
        profile: Profile,
        upload: Option<PathBuf>,
    ) -> Result<(String, String), DaemonError> {
        let job_id = new_id("job");
        let sandbox_id = new_id("sb");
        let timeout_ms = if req.timeout_ms == 0 {
            u64::try_from(self.config.default_job_timeout.as_millis()).unwrap_or(u64::MAX)
        } else {
            req.timeout_ms
        };
        let job_dir = self.config.job_dir(&job_id);
        std::fs::create_dir_all(&job_dir).map_err(io_err(format!("creating {}", job_dir.display())))?;
        let keepalive = req.keepalive.unwrap_or(profile.behavior.keepalive_default);
        let ttl_ms = req.ttl_ms.unwrap_or(u64::from(profile.behavior.ttl_minutes_default) * 60_000);
        let lease_expires_at_ms =
            (ttl_ms > 0).then(|| now_ms().saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX)));
        let log = Arc::new(
            JobLog::create(&job_dir.join("output.log"), self.config.max_log_bytes)
                .map_err(io_err("creating the job log"))?,
        );
        self.store.create_job(&NewJob {
            job_id: &job_id,
            sandbox_id: &sandbox_id,
            backend: self.backend.name(),
            command: &req.command,
            repo: req.repo_label.as_deref(),
            timeout_ms,
            profile: &profile.name,
            keepalive,
            lease_expires_at_ms,
        })?;
        let (cancelled, phase) = self.register_live(&job_id, log.clone());
        let job = QueuedJob {
            job_id: job_id.clone(),
            sandbox_id: sandbox_id.clone(),
            command: req.command,
            timeout_ms,
            upload,
            log,
            profile,
            cancelled,
            keepalive,
            phase,
        };
        crate::crashpoint::here("submitted");
        tokio::spawn(runner::run(self.clone(), job));
        Ok((job_id, sandbox_id))
    }

    /// Makes a job live: followable, cancellable. Returns the job's ends of both.
    pub(crate) fn register_live(
        &self,
        job_id: &str,
        log: Arc<JobLog>,
    ) -> (watch::Receiver<Option<String>>, watch::Sender<&'static str>) {
        let (cancel, cancelled) = watch::channel(None);
        let (phase, phase_rx) = watch::channel("queued");
        let live = LiveJob { log, cancel, phase: phase_rx };
        self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(job_id.to_owned(), live);
        (cancelled, phase)
    }

    /// The live log of a running job, if it is still running.
    pub fn live_log(&self, job_id: &str) -> Option<Arc<JobLog>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).get(job_id).map(|live| live.log.clone())
    }

    /// Asks a job that has not finished to stop; says what will happen.
    pub fn cancel(&self, job_id: &str) -> Result<String, DaemonError> {
        self.cancel_with(job_id, "cancelled (agentlab job cancel)")
    }

    /// Cancels a live job with `reason` (kept in its error). A second request keeps the
    /// first reason; it still wakes the job, which matters only to an artifact push.
    pub(crate) fn cancel_with(&self, job_id: &str, reason: &str) -> Result<String, DaemonError> {
        let job = self.store.job(job_id)?;
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = live.get(job_id) else {
            return Err(DaemonError::Invalid(format!("job {job_id} has already finished ({})", job.state)));
        };
        let phase = *entry.phase.borrow();
        let mut first = false;
        entry.cancel.send_modify(|current| {
            if current.is_none() {
                *current = Some(reason.to_owned());
                first = true;
            }
        });
        drop(live);
        if first {
            let _ = self.store.record_event(Some(job_id), Some(&job.sandbox_id), "job.cancel", reason);
        }
        Ok(match job.state {
            JobState::Queued => format!("job {job_id} is cancelled before it starts"),
            _ if phase == runner::COLLECTING_ARTIFACTS => {
                format!("job {job_id} has finished; its artifact push is stopped and nothing is stored")
            }
            _ if phase == runner::STORING_ARTIFACTS => {
                format!("job {job_id} has finished and its artifacts are in; nothing is left to stop")
            }
            _ if phase == runner::TEARING_DOWN => {
                format!("job {job_id} has finished; its sandbox is being torn down")
            }
            _ => format!(
                "job {job_id} is being stopped: SIGTERM now, SIGKILL after {} s",
                self.config.kill_grace.as_secs()
            ),
        })
    }

    /// What a live job is doing now, changing as it goes.
    pub fn phase(&self, job_id: &str) -> Option<watch::Receiver<&'static str>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).get(job_id).map(|live| live.phase.clone())
    }

    /// Whether the job has not finished yet.
    pub fn is_live(&self, job_id: &str) -> bool {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).contains_key(job_id)
    }

    /// Whether the job has been asked to stop.
    pub fn is_cancelling(&self, job_id: &str) -> bool {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(job_id)
            .is_some_and(|l| l.cancel.borrow().is_some())
    }

    pub(crate) fn job_done(&self, job_id: &str) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(job_id);
    }
}
