//! Sandboxes that outlive their job (`--keepalive`), and leases: every sandbox may
//! carry an end time; the reaper stops the job of an expired sandbox and destroys it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::api::SandboxView;
use crate::backend::Sandbox;
use crate::channel::HostSession;
use crate::daemon::{Daemon, DaemonError};
use crate::state::SandboxState;
use crate::store::now_ms;

/// A sandbox whose job is over but whose VM stays, with its agent's session open (the
/// agent powers off when that session ends).
pub struct KeptSandbox {
    pub job_id: String,
    pub vm: Box<dyn Sandbox>,
    pub session: HostSession<crate::agent_listener::BoxedStream>,
    /// Keeps refusing (and recording) other connections to the agent port.
    pub refuser: JoinHandle<()>,
    /// Its share of the host's budget, held until it is destroyed.
    pub _admitted: crate::admission::Admitted,
}

/// The kept sandboxes, by id.
#[derive(Default)]
pub struct Kept(Mutex<HashMap<String, KeptSandbox>>);

impl Kept {
    pub fn insert(&self, id: &str, sandbox: KeptSandbox) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(id.to_owned(), sandbox);
    }

    fn take(&self, id: &str) -> Option<KeptSandbox> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).contains_key(id)
    }

    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.0.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// Ends a kept sandbox: closes its agent's session, destroys the VM, records why.
async fn release(daemon: &Daemon, id: &str, reason: &str) -> Result<(), DaemonError> {
    let Some(mut kept) = daemon.kept.take(id) else {
        return Err(DaemonError::Invalid(format!("sandbox {id} is not kept after a job")));
    };
    kept.refuser.abort();
    kept.session.shutdown().await;
    crate::runner::destroy_vm(daemon, &kept.job_id, id, kept.vm).await.map_err(DaemonError::Invalid)?;
    daemon.store.transition_sandbox(id, SandboxState::Destroyed, Some(reason))?;
    Ok(())
}

/// `agentlab sandbox destroy`: a kept sandbox goes now; one running a job only with
/// `force`, by cancelling the job (its runner then destroys the VM).
pub async fn destroy(daemon: &Daemon, id: &str, force: bool) -> Result<String, DaemonError> {
    let view = daemon.store.sandbox(id)?;
    if view.state.is_final() {
        return Err(DaemonError::Invalid(format!("sandbox {id} is already destroyed")));
    }
    if daemon.kept.contains(id) {
        release(daemon, id, "destroyed by agentlab sandbox destroy").await?;
        return Ok(format!("sandbox {id} destroyed"));
    }
    let Some(job) = view.job_id.filter(|job| daemon.is_live(job)) else {
        return Err(DaemonError::Invalid(format!("sandbox {id} has no VM to destroy ({})", view.state)));
    };
    if !force {
        return Err(DaemonError::Invalid(format!(
            "sandbox {id} is running job {job}: cancel the job (agentlab job cancel {job}) or pass --force"
        )));
    }
    daemon.cancel_with(&job, "cancelled: its sandbox was destroyed (agentlab sandbox destroy --force)")?;
    Ok(format!("sandbox {id}: its job {job} is being stopped, then the sandbox is destroyed"))
}

/// `agentlab sandbox prune`: destroys every kept sandbox; says what went.
pub async fn prune(daemon: &Daemon) -> Vec<String> {
    let mut done = Vec::new();
    for id in daemon.kept.ids() {
        match release(daemon, &id, "pruned by agentlab sandbox prune").await {
            Ok(()) => done.push(format!("{id}: destroyed")),
            Err(e) => done.push(format!("{id}: {e}")),
        }
    }
    done
}

/// `agentlab sandbox lease renew`: the lease now ends `ttl` from now.
pub fn renew(daemon: &Daemon, id: &str, ttl: Duration) -> Result<SandboxView, DaemonError> {
    let view = daemon.store.sandbox(id)?;
    if view.state.is_final() {
        return Err(DaemonError::Invalid(format!("sandbox {id} is already destroyed; its lease cannot be renewed")));
    }
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires = now_ms().saturating_add(ttl_ms);
    daemon.store.renew_lease(id, expires, &format!("the lease now ends in {}", humantime::format_duration(ttl)))?;
    Ok(daemon.store.sandbox(id)?)
}

/// One pass of the reaper: every sandbox whose lease ended is stopped and destroyed.
pub async fn reap(daemon: &Daemon) {
    let expired = match daemon.store.expired_sandboxes(now_ms()) {
        Ok(list) => list,
        Err(e) => {
            tracing::error!("the lease reaper cannot read the sandboxes: {e}");
            return;
        }
    };
    for view in expired {
        let reason = "the sandbox's lease expired";
        if daemon.kept.contains(&view.id) {
            let _ = daemon.store.record_event(view.job_id.as_deref(), Some(&view.id), "lease.expired", reason);
            if let Err(e) = release(daemon, &view.id, reason).await {
                tracing::error!(sandbox = %view.id, "{e}");
            }
        } else if let Some(job) = view.job_id.as_deref().filter(|job| daemon.is_live(job))
            && !daemon.is_cancelling(job)
        {
            let _ = daemon.store.record_event(Some(job), Some(&view.id), "lease.expired", reason);
            let _ = daemon.cancel_with(job, "cancelled: the sandbox's lease expired");
        }
    }
}

/// Runs [`reap`] every `every` until the daemon stops.
pub async fn reaper(daemon: Arc<Daemon>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        reap(&daemon).await;
    }
}
