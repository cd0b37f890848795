//! The reconciler compares the database with the cluster, at start and every N
//! seconds, through `/cluster/resources?type=vm`:
//! * a sandbox whose VM should exist (BOOTING, READY, RUNNING) but is not listed is
//!   marked: an event, and FAILED if its state still allows it;
//! * a VM tagged `agentlab` with no live sandbox (unknown, destroyed, or its job over)
//!   is destroyed once it has been seen as such for longer than the grace period;
//! * a VM without the `agentlab` tag is never touched.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::client::Method;
use super::error::PveError;
use super::{ProxmoxBackend, destroy_vm, our_vms, sandbox_of};
use crate::state::SandboxState;
use crate::store::Store;

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Sandboxes whose VM vanished.
    pub vanished: Vec<String>,
    /// Orphan VMs destroyed.
    pub destroyed: Vec<u32>,
    /// Orphan VMs still within their grace period.
    pub waiting: Vec<u32>,
}

pub struct Reconciler {
    grace: Duration,
    /// When each orphan VMID was first seen as one.
    first_seen: HashMap<u32, Instant>,
}

impl Reconciler {
    pub fn new(grace: Duration) -> Reconciler {
        Reconciler { grace, first_seen: HashMap::new() }
    }

    pub async fn pass(&mut self, backend: &ProxmoxBackend, store: &Store) -> Result<Report, PveError> {
        let inner = &backend.inner;
        inner.retry_failed_cleanups().await;
        // The database first: a sandbox it shows as BOOTING or later had its VM tagged
        // before this read, so the listing after it must show that VM.
        let store_err =
            |e: crate::store::StoreError| PveError::Other { op: "reconciling".into(), detail: e.to_string() };
        let sandboxes = store.sandboxes().map_err(store_err)?;
        let op = "reconciling: listing VMs";
        let vms = inner.client.call(op, Method::Get, "/cluster/resources", &[("type", "vm".to_owned())]).await?;
        let mut report = Report::default();

        let ours: Vec<(u32, String, String)> =
            our_vms(&vms).map(|(_, vmid, node, tags)| (vmid, node.to_owned(), tags.to_owned())).collect();
        let listed: HashSet<String> = ours.iter().filter_map(|(_, _, tags)| sandbox_of(tags)).collect();

        for sb in &sandboxes {
            let expects_vm = matches!(sb.state, SandboxState::Booting | SandboxState::Ready | SandboxState::Running);
            if expects_vm && sb.backend == super::BACKEND_NAME && !listed.contains(&sb.id) {
                let msg = "its VM vanished: no VM tagged with this sandbox is listed in /cluster/resources (deleted outside AgentLab?)";
                let _ = store.record_event(sb.job_id.as_deref(), Some(&sb.id), "sandbox.vm_vanished", msg);
                if sb.state.can_become(SandboxState::Failed) {
                    let _ = store.transition_sandbox(&sb.id, SandboxState::Failed, Some(msg));
                }
                tracing::warn!(sandbox = %sb.id, "{msg}");
                report.vanished.push(sb.id.clone());
            }
        }

        // A finished sandbox whose teardown failed and whose VM is gone now (removed
        // by a later retry, or by someone else) is settled.
        for sb in &sandboxes {
            let finished = matches!(
                sb.state,
                SandboxState::Completed | SandboxState::Failed | SandboxState::Timeout | SandboxState::Stopped
            );
            let job_over = sb.job_id.as_deref().is_none_or(|j| store.job(j).is_ok_and(|job| job.state.is_terminal()));
            if sb.backend == super::BACKEND_NAME && finished && job_over && !listed.contains(&sb.id) {
                let msg = "its VM is gone (a failed teardown was retried by the reconciler)";
                let _ = store.transition_sandbox(&sb.id, SandboxState::Destroyed, Some(msg));
            }
        }

        let live: HashSet<&str> = sandboxes
            .iter()
            .filter(|sb| sb.state != SandboxState::Destroyed)
            .filter(|sb| match sb.job_id.as_deref().map(|j| store.job(j)) {
                Some(Ok(job)) => !job.state.is_terminal(),
                _ => true,
            })
            .map(|sb| sb.id.as_str())
            .collect();
        let now = Instant::now();
        let mut orphans = HashSet::new();
        for (vmid, node, tags) in &ours {
            let owner = sandbox_of(tags);
            if owner.as_deref().is_some_and(|id| live.contains(id)) {
                continue;
            }
            orphans.insert(*vmid);
            let seen = *self.first_seen.entry(*vmid).or_insert(now);
            if now.duration_since(seen) < self.grace {
                report.waiting.push(*vmid);
                continue;
            }
            tracing::warn!("reconciling: destroying orphan VM {vmid} on {node} (tags {tags}, no live sandbox)");
            match destroy_vm(inner, node, *vmid).await {
                Ok(()) => {
                    let known = owner.as_deref().and_then(|id| sandboxes.iter().find(|sb| sb.id == id));
                    let msg = format!("orphan VM {vmid} on node {node} destroyed by the reconciler");
                    let _ = store.record_event(
                        known.and_then(|sb| sb.job_id.as_deref()),
                        owner.as_deref(),
                        "vm.orphan_destroyed",
                        &msg,
                    );
                    // A sandbox whose teardown failed earlier is now really gone.
                    if let Some(sb) = known.filter(|sb| sb.state.can_become(SandboxState::Destroyed)) {
                        let _ = store.transition_sandbox(&sb.id, SandboxState::Destroyed, Some(&msg));
                    }
                    report.destroyed.push(*vmid);
                }
                Err(e) => tracing::error!("reconciling: {e}"),
            }
        }
        self.first_seen.retain(|vmid, _| orphans.contains(vmid) && !report.destroyed.contains(vmid));
        Ok(report)
    }
}

/// Runs a pass at once and then every `interval`, for as long as the daemon lives.
pub async fn run_forever(backend: std::sync::Arc<ProxmoxBackend>, daemon: std::sync::Arc<crate::daemon::Daemon>) {
    let config = backend.config();
    let interval = Duration::from_secs(config.reconcile_interval_secs.max(1));
    let mut reconciler = Reconciler::new(Duration::from_secs(config.orphan_grace_secs));
    loop {
        match reconciler.pass(&backend, &daemon.store).await {
            Ok(report) if report != Report::default() => tracing::info!("reconciled: {report:?}"),
            Ok(_) => {}
            Err(e) => tracing::warn!("{e}"),
        }
        tokio::time::sleep(interval).await;
    }
}
