//! The daemon's shared state: configuration, store, backend and live jobs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use crate::api::{MAX_REPO_BYTES, SubmitRequest};
use crate::backend::Backend;
use crate::config::{DEFAULT_PROFILE, DaemonConfig};
use crate::ids::new_id;
use crate::joblog::JobLog;
use crate::profile::{Profile, ProfileError, ProfileSet};
use crate::runner::{self, QueuedJob};
use crate::state::{JobState, SandboxState};
use crate::store::{JobEnd, NewJob, Store, StoreError};

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
    live: Mutex<HashMap<String, Arc<JobLog>>>,
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
        let daemon = Arc::new(Daemon { config, store, profiles, backend, live: Mutex::new(HashMap::new()) });
        daemon.settle_unfinished()?;
        Ok(daemon)
    }

    /// A previous daemon died mid-job. Its local VMs died with it (they are started
    /// with PR_SET_PDEATHSIG); Proxmox VMs did not, and are the reconciler's. Each
    /// such job is failed with that reason.
    fn settle_unfinished(&self) -> Result<(), DaemonError> {
        let (jobs, sandboxes) = self.store.unfinished()?;
        let reason = if self.backend.name() == "proxmox" {
            "agentlabd stopped while this job was in flight; its VM is left to the reconciler, which destroys it"
        } else {
            "agentlabd stopped while this job was in flight; its sandbox did not survive"
        };
        for job in jobs {
            let end = JobEnd { error: Some(reason.to_owned()), ..JobEnd::default() };
            self.store.transition_job(&job, JobState::Failed, Some(&end), Some(reason))?;
        }
        let views = self.store.sandboxes()?;
        for view in views.iter().filter(|v| sandboxes.contains(&v.id)) {
            if view.state.can_become(SandboxState::Failed) {
                self.store.transition_sandbox(&view.id, SandboxState::Failed, Some(reason))?;
            }
            // A Proxmox VM outlives the daemon: the reconciler destroys it (after the
            // orphan grace period) and then marks the sandbox DESTROYED.
            if view.backend == "proxmox" {
                continue;
            }
            self.store.transition_sandbox(&view.id, SandboxState::Destroyed, Some("cleaned up at start"))?;
            let _ = std::fs::remove_dir_all(self.config.qemu.run_dir.join(&view.id));
        }
        Ok(())
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
        let log = Arc::new(JobLog::create(&job_dir.join("output.log")).map_err(io_err("creating the job log"))?);
        self.store.create_job(&NewJob {
            job_id: &job_id,
            sandbox_id: &sandbox_id,
            backend: self.backend.name(),
            command: &req.command,
            repo: req.repo_label.as_deref(),
            timeout_ms,
            profile: &profile.name,
        })?;
        self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(job_id.clone(), log.clone());
        let job = QueuedJob {
            job_id: job_id.clone(),
            sandbox_id: sandbox_id.clone(),
            command: req.command,
            timeout_ms,
            upload,
            log,
            profile,
        };
        tokio::spawn(runner::run(self.clone(), job));
        Ok((job_id, sandbox_id))
    }

    /// The live log of a running job, if it is still running.
    pub fn live_log(&self, job_id: &str) -> Option<Arc<JobLog>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).get(job_id).cloned()
    }

    pub(crate) fn job_done(&self, job_id: &str) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(job_id);
    }
}
