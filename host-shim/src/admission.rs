//! Admission control: a job's sandbox starts only when the host's budget (vCPUs and
//! memory) and its profile's `max_sandboxes` leave room for it. Waiting jobs queue in
//! submission order (first come, first served: a big job is never overtaken forever by
//! small ones), and each can say where it stands and what it waits for.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// What the host may hand out to sandboxes at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub cores: u32,
    pub memory_mb: u64,
}

impl Budget {
    /// No limit but each profile's `max_sandboxes`: the Proxmox backend's default,
    /// where placement, not this host's size, decides whether a VM fits the cluster.
    pub const UNLIMITED: Budget = Budget { cores: u32::MAX, memory_mb: u64::MAX };
}

/// What one sandbox takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    pub cores: u32,
    pub memory_mb: u64,
    pub profile: String,
    /// The profile's `max_sandboxes` (0: no limit).
    pub profile_max: u32,
}

/// A job that can never be admitted.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum AdmissionError {
    /// the sandbox needs {cores} vCPUs and {memory_mb} MiB, more than this host's whole budget ({budget_cores} vCPUs, {budget_memory_mb} MiB): use a smaller profile or raise agentlabd --budget-cores / --budget-memory-mb
    TooBig { cores: u32, memory_mb: u64, budget_cores: u32, budget_memory_mb: u64 },
}

#[derive(Default)]
struct State {
    cores: u32,
    memory_mb: u64,
    per_profile: HashMap<String, u32>,
    queue: VecDeque<(String, Need)>,
}

pub struct Admission {
    budget: Budget,
    state: Mutex<State>,
    changed: Notify,
}

/// A sandbox's share of the budget, given back when dropped.
pub struct Admitted {
    admission: Arc<Admission>,
    need: Need,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut state = self.admission.lock();
        state.cores -= self.need.cores;
        state.memory_mb -= self.need.memory_mb;
        if let Some(n) = state.per_profile.get_mut(&self.need.profile) {
            *n = n.saturating_sub(1);
        }
        drop(state);
        self.admission.changed.notify_waiters();
    }
}

/// A place in the queue, left when dropped (a cancelled or failed wait).
struct Ticket<'a> {
    admission: &'a Admission,
    job_id: String,
    armed: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.admission.lock().queue.retain(|(id, _)| id != &self.job_id);
            self.admission.changed.notify_waiters();
        }
    }
}

impl Admission {
    pub fn new(budget: Budget) -> Arc<Admission> {
        Arc::new(Admission { budget, state: Mutex::new(State::default()), changed: Notify::new() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for `job_id`'s turn and room for `need`. `on_wait` is told, once, why it
    /// has to wait if it does.
    pub async fn acquire(
        self: &Arc<Self>,
        job_id: &str,
        need: Need,
        on_wait: impl FnOnce(String),
    ) -> Result<Admitted, AdmissionError> {
        if need.cores > self.budget.cores || need.memory_mb > self.budget.memory_mb {
            return Err(AdmissionError::TooBig {
                cores: need.cores,
                memory_mb: need.memory_mb,
                budget_cores: self.budget.cores,
                budget_memory_mb: self.budget.memory_mb,
            });
        }
        self.lock().queue.push_back((job_id.to_owned(), need.clone()));
        let mut ticket = Ticket { admission: self, job_id: job_id.to_owned(), armed: true };
        let mut on_wait = Some(on_wait);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                let first = state.queue.front().is_some_and(|(id, _)| id == job_id);
                if first && self.fits(&state, &need) {
                    state.queue.pop_front();
                    state.cores += need.cores;
                    state.memory_mb += need.memory_mb;
                    *state.per_profile.entry(need.profile.clone()).or_default() += 1;
                    ticket.armed = false;
                    drop(state);
                    // The next in line may fit too.
                    self.changed.notify_waiters();
                    return Ok(Admitted { admission: self.clone(), need });
                }
            }
            if let Some(tell) = on_wait.take() {
                tell(self.describe(job_id).unwrap_or_default());
            }
            notified.await;
        }
    }

    /// Counts a sandbox that already runs (taken back after a restart) at once, even
    /// past the budget: it exists whatever the budget says.
    pub fn take_now(self: &Arc<Self>, need: Need) -> Admitted {
        let mut state = self.lock();
        state.cores += need.cores;
        state.memory_mb += need.memory_mb;
        *state.per_profile.entry(need.profile.clone()).or_default() += 1;
        drop(state);
        Admitted { admission: self.clone(), need }
    }

    fn fits(&self, state: &State, need: &Need) -> bool {
        self.missing(state, need).is_empty()
    }

    /// What `need` lacks to be admitted now, in words; empty if it fits.
    fn missing(&self, state: &State, need: &Need) -> Vec<String> {
        let mut missing = Vec::new();
        if state.cores.saturating_add(need.cores) > self.budget.cores {
            missing.push(format!("{} vCPUs ({} of {} in use)", need.cores, state.cores, self.budget.cores));
        }
        if state.memory_mb.saturating_add(need.memory_mb) > self.budget.memory_mb {
            missing.push(format!(
                "{} MiB of memory ({} of {} MiB in use)",
                need.memory_mb, state.memory_mb, self.budget.memory_mb
            ));
        }
        let running = state.per_profile.get(&need.profile).copied().unwrap_or(0);
        if need.profile_max > 0 && running >= need.profile_max {
            missing.push(format!("a free slot of profile {} (max_sandboxes {})", need.profile, need.profile_max));
        }
        missing
    }

    /// Where a queued job stands and what it waits for; `None` if it is not queued.
    pub fn describe(&self, job_id: &str) -> Option<String> {
        let state = self.lock();
        let position = state.queue.iter().position(|(id, _)| id == job_id)?;
        let total = state.queue.len();
        let waits_for = if position > 0 {
            format!("behind {} (first come, first served)", state.queue[position - 1].0)
        } else {
            let missing = self.missing(&state, &state.queue[0].1);
            if missing.is_empty() { "its turn".to_owned() } else { missing.join(" and ") }
        };
        Some(format!("position {} of {total}, waiting for {waits_for}", position + 1))
    }

    /// vCPUs and MiB handed out now.
    #[cfg(test)]
    fn in_use(&self) -> (u32, u64) {
        let state = self.lock();
        (state.cores, state.memory_mb)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    fn need(cores: u32, memory_mb: u64, profile: &str, max: u32) -> Need {
        Need { cores, memory_mb, profile: profile.into(), profile_max: max }
    }

    async fn admitted_soon(f: impl std::future::Future<Output = Result<Admitted, AdmissionError>>) -> Option<Admitted> {
        tokio::time::timeout(Duration::from_millis(50), f).await.ok().map(|r| r.unwrap())
    }

    #[tokio::test]
    async fn jobs_wait_for_the_budget_in_order_and_say_why() {
        let a = Admission::new(Budget { cores: 4, memory_mb: 4096 });
        let first = a.acquire("job-1", need(2, 1024, "p", 0), |_| panic!("job-1 fits")).await.unwrap();
        let second = a.acquire("job-2", need(2, 1024, "p", 0), |_| panic!("job-2 fits")).await.unwrap();
        assert_eq!(a.in_use(), (4, 2048));

        let waiting = Arc::new(Mutex::new(Vec::new()));
        let (a3, w3) = (a.clone(), waiting.clone());
        let third = tokio::spawn(async move {
            a3.acquire("job-3", need(2, 1024, "p", 0), |why| w3.lock().unwrap().push(why)).await.unwrap()
        });
        let (a4, w4) = (a.clone(), waiting.clone());
        let fourth = tokio::spawn(async move {
            a4.acquire("job-4", need(1, 512, "p", 0), |why| w4.lock().unwrap().push(why)).await.unwrap()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(a.describe("job-3").unwrap(), "position 1 of 2, waiting for 2 vCPUs (4 of 4 in use)");
        assert_eq!(
            a.describe("job-4").unwrap(),
            "position 2 of 2, waiting for behind job-3 (first come, first served)"
        );
        assert_eq!(waiting.lock().unwrap().len(), 2);
        assert_eq!(a.describe("job-1"), None);

        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(1), third).await.unwrap().unwrap();
        // job-4 needs 1 vCPU but all 4 are taken again.
        assert!(!fourth.is_finished());
        drop(second);
        let fourth = tokio::time::timeout(Duration::from_secs(1), fourth).await.unwrap().unwrap();
        assert_eq!(a.in_use(), (3, 1536));
        drop((third, fourth));
        assert_eq!(a.in_use(), (0, 0));
    }

    #[tokio::test]
    async fn an_unlimited_budget_admits_without_queueing_but_keeps_profile_limits() {
        let a = Admission::new(Budget::UNLIMITED);
        let mut held = Vec::new();
        for n in 0..500 {
            let job = format!("job-{n}");
            held.push(a.acquire(&job, need(64, 262_144, "big", 0), |_| panic!("{job} should not wait")).await.unwrap());
        }
        assert_eq!(a.in_use(), (500 * 64, 500 * 262_144));
        let solo = a.acquire("solo-1", need(1, 256, "solo", 1), |_| {}).await.unwrap();
        assert!(admitted_soon(a.acquire("solo-2", need(1, 256, "solo", 1), |_| {})).await.is_none());
        drop((held, solo));
        assert_eq!(a.in_use(), (0, 0));
    }

    #[tokio::test]
    async fn a_profile_limit_and_a_job_too_big_for_the_host() {
        let a = Admission::new(Budget { cores: 16, memory_mb: 65536 });
        let one = a.acquire("job-1", need(1, 256, "solo", 1), |_| {}).await.unwrap();
        assert!(admitted_soon(a.acquire("job-2", need(1, 256, "solo", 1), |_| {})).await.is_none());
        // The timed-out wait left the queue.
        assert_eq!(a.describe("job-2"), None);
        let a2 = a.clone();
        let two = tokio::spawn(async move { a2.acquire("job-2", need(1, 256, "solo", 1), |_| {}).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            a.describe("job-2").unwrap(),
            "position 1 of 1, waiting for a free slot of profile solo (max_sandboxes 1)"
        );
        drop(one);
        tokio::time::timeout(Duration::from_secs(1), two).await.unwrap().unwrap();

        let err = a.acquire("job-3", need(32, 1024, "p", 0), |_| {}).await.err().unwrap();
        assert_eq!(
            err.to_string(),
            "the sandbox needs 32 vCPUs and 1024 MiB, more than this host's whole budget (16 vCPUs, 65536 MiB): use a smaller profile or raise agentlabd --budget-cores / --budget-memory-mb"
        );
    }
}
