//! What a starting agentlabd does with what an earlier one, killed, left behind. A
//! job whose sandbox still runs is taken back: its agent re-dials and sends what was
//! not stored yet (see `runner::resume`); a Proxmox VM is first looked up through the
//! API, once the daemon serves. Everything else in flight is failed with the reason,
//! and every VM no job needs is destroyed (on Proxmox, by the reconciler).

use std::collections::HashSet;
use std::sync::Arc;

use crate::api::{JobView, SandboxView};
use crate::backend::{Sandbox, proxmox};
use crate::config::DEFAULT_PROFILE;
use crate::daemon::{Daemon, DaemonError};
use crate::joblog::JobLog;
use crate::runner::{self, QueuedJob};
use crate::state::{JobState, SandboxState};
use crate::store::JobEnd;

impl Daemon {
    /// Takes back, fails or cleans up whatever the previous daemon left.
    pub(crate) fn recover(self: &Arc<Self>) -> Result<(), DaemonError> {
        let (jobs, sandboxes) = self.store.unfinished()?;
        let mut resumed = HashSet::new();
        for job_id in &jobs {
            let job = self.store.job(job_id)?;
            let sandbox = self.store.sandbox(&job.sandbox_id)?;
            // Only a job that started can be taken back: its agent holds it. One that
            // had not (even with its agent connected) never will.
            let in_session = job.state == JobState::Running;
            let is_proxmox = sandbox.backend == proxmox::BACKEND_NAME;
            // Where a Proxmox VM is and whether it runs takes the API: asked once serving.
            let vm = match (in_session, is_proxmox) {
                (true, true) => Some(Found::Later),
                (true, false) => self.backend.adopt(&sandbox.id).map(Found::Now),
                (false, _) => None,
            };
            let reason = match (in_session, vm) {
                // A Proxmox VM is the reconciler's: it destroys it, then marks the sandbox.
                (false, _) if is_proxmox => {
                    "agentlabd stopped while this job was in flight; its VM is left to the reconciler, which destroys it"
                        .to_owned()
                }
                (true, Some(vm)) => match self.take_back(&job, &sandbox, vm) {
                    Ok(()) => {
                        resumed.insert(sandbox.id.clone());
                        continue;
                    }
                    Err(reason) => reason,
                },
                (true, None) => {
                    "agentlabd stopped while this job was in flight and its sandbox did not survive".to_owned()
                }
                (false, _) if job.state == JobState::Queued && sandbox.state == SandboxState::Requested => {
                    "agentlabd stopped before this job started; submit it again".to_owned()
                }
                (false, _) => format!(
                    "agentlabd stopped while sandbox {} was being prepared ({}); submit the job again",
                    sandbox.id, sandbox.state
                ),
            };
            let end = JobEnd { error: Some(reason.clone()), ..JobEnd::default() };
            self.store.transition_job(job_id, JobState::Failed, Some(&end), Some(&reason))?;
        }
        for id in sandboxes.iter().filter(|id| !resumed.contains(*id)) {
            let view = self.store.sandbox(id)?;
            if view.state.can_become(SandboxState::Failed) {
                let reason = "agentlabd stopped while this sandbox was in use";
                self.store.transition_sandbox(id, SandboxState::Failed, Some(reason))?;
            }
            if view.backend == proxmox::BACKEND_NAME {
                continue;
            }
            self.store.transition_sandbox(id, SandboxState::Destroyed, Some("cleaned up at start"))?;
            self.backend.discard(id);
        }
        self.backend.discard_unrecorded(&resumed);
        Ok(())
    }

    /// Starts carrying on with `job` in its running sandbox.
    fn take_back(self: &Arc<Self>, job: &JobView, sandbox: &SandboxView, vm: Found) -> Result<(), String> {
        let profile_name = job.profile.as_deref().unwrap_or(DEFAULT_PROFILE);
        let Some(profile) = self.profiles.get(profile_name).cloned() else {
            return Err(format!(
                "agentlabd restarted and the job's profile {profile_name} is gone, so it cannot go on"
            ));
        };
        let log_path = self.config.job_dir(&job.id).join("output.log");
        let (log, stored_through) = JobLog::reopen(&log_path, self.config.max_log_bytes)
            .map_err(|e| format!("agentlabd restarted and cannot reopen {}: {e}", log_path.display()))?;
        let log = Arc::new(log);
        let (cancelled, phase) = self.register_live(&job.id, log.clone());
        // Taken back whatever the limits say now: the sandbox already exists.
        let admitted = self.admission.take_now(runner::need_of(self, &profile));
        let queued = QueuedJob {
            job_id: job.id.clone(),
            profile,
            sandbox_id: sandbox.id.clone(),
            command: job.command.clone(),
            timeout_ms: job.timeout_ms,
            upload: None,
            log,
            cancelled,
            keepalive: sandbox.keepalive,
            phase,
        };
        let msg = format!(
            "agentlabd restarted; waiting for the agent to dial back in (output stored through chunk {})",
            stored_through.map_or_else(|| "none".to_owned(), |s| s.to_string())
        );
        let _ = self.store.record_event(Some(&job.id), Some(&sandbox.id), "job.resuming", &msg);
        match vm {
            Found::Now(vm) => tokio::spawn(runner::resume(self.clone(), queued, vm, stored_through, admitted)),
            Found::Later => tokio::spawn(runner::resume_when_found(self.clone(), queued, stored_through, admitted)),
        };
        Ok(())
    }
}

/// A job's VM, as recovery finds it.
enum Found {
    Now(Box<dyn Sandbox>),
    /// To be looked up through the backend's API (Proxmox); the job is live meanwhile.
    Later,
}
