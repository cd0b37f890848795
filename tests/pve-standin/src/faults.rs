//! Fault injection: with probability `rate`, a request meets one of `kinds`, each
//! answered the way real Proxmox fails. Every message injected is recorded, so a test
//! can check that each failed job's error carries one of them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// 500 `can't lock file '/var/lock/qemu-server/lock-N.conf' - got timeout`, after the lock wait.
    LockTimeout,
    /// 500 `VM is locked (backup)`.
    VmLocked,
    /// 500 with a permanent handler error.
    Internal,
    /// 595: pveproxy could not reach the node.
    Proxy595,
    /// 596: the request ran, the answer was lost.
    Proxy596,
    /// The task runs a few seconds longer.
    SlowTask,
    /// The task ends with an error exit status.
    FailingTask,
    /// The connection closes without an answer (for changes: sometimes after applying).
    DropConnection,
    /// Another client takes the clone's new VMID first.
    VmidRace,
}

impl FaultKind {
    pub const ALL: [FaultKind; 9] = [
        FaultKind::LockTimeout,
        FaultKind::VmLocked,
        FaultKind::Internal,
        FaultKind::Proxy595,
        FaultKind::Proxy596,
        FaultKind::SlowTask,
        FaultKind::FailingTask,
        FaultKind::DropConnection,
        FaultKind::VmidRace,
    ];
}

pub struct Faults {
    pub rate: f64,
    pub kinds: Vec<FaultKind>,
    rng: StdRng,
    counter: u64,
    pub injected: Vec<(FaultKind, String)>,
    /// Faults a test set for the next request to a route: (method, path template, kind).
    pub planned: Vec<(String, String, FaultKind)>,
}

impl Faults {
    pub fn new(rate: f64, kinds: Vec<FaultKind>, seed: u64) -> Faults {
        Faults { rate, kinds, rng: StdRng::seed_from_u64(seed), counter: 0, injected: Vec::new(), planned: Vec::new() }
    }

    /// Whether this request gets a fault, and which, among those that `applicable` allows.
    pub fn draw(&mut self, applicable: impl Fn(FaultKind) -> bool) -> Option<FaultKind> {
        if self.rate <= 0.0 || !self.rng.random_bool(self.rate.min(1.0)) {
            return None;
        }
        let options: Vec<FaultKind> = self.kinds.iter().copied().filter(|k| applicable(*k)).collect();
        // Kinds not met yet come first, so a soak meets every kind whatever order its
        // requests happen to come in.
        let unmet: Vec<FaultKind> =
            options.iter().copied().filter(|k| !self.injected.iter().any(|(met, _)| met == k)).collect();
        let pool = if unmet.is_empty() { options } else { unmet };
        if pool.is_empty() {
            return None;
        }
        Some(pool[self.rng.random_range(0..pool.len())])
    }

    /// The fault planned for this request's route, if any; each planned fault meets one
    /// request.
    pub fn take_planned(&mut self, method: &str, template: &str) -> Option<FaultKind> {
        let i = self.planned.iter().position(|(m, t, _)| m == method && t == template)?;
        Some(self.planned.remove(i).2)
    }

    pub fn coin(&mut self) -> bool {
        self.rng.random_bool(0.5)
    }

    /// Records a message and returns it. Permanent faults get a number, so each one can
    /// be traced to the job it failed.
    pub fn record(&mut self, kind: FaultKind, message: String) -> String {
        self.injected.push((kind, message.clone()));
        message
    }

    pub fn next_number(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }
}
