//! VMIDs for new sandboxes, from a configured range. `/cluster/nextid` reserves
//! nothing (two callers get the same id), so ids are handed out here: one daemon never
//! gives the same id twice while it is held, and ids seen in use in the cluster are
//! skipped. An id another client took first (`config file already exists`) stays held
//! while the clone tries the next ones, and the search cursor moves past it, so it is
//! not offered again at once. Several shims on one cluster need disjoint ranges.

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::sync::{Mutex, PoisonError};

pub struct VmidPool {
    range: RangeInclusive<u32>,
    state: Mutex<PoolState>,
}

struct PoolState {
    held: HashSet<u32>,
    /// Where the next search starts, so freed ids are not reused at once (a just-
    /// destroyed VM may still be listed by a lagging cluster view).
    cursor: u32,
}

impl VmidPool {
    pub fn new(range: RangeInclusive<u32>) -> VmidPool {
        let cursor = *range.start();
        VmidPool { range, state: Mutex::new(PoolState { held: HashSet::new(), cursor }) }
    }

    /// Reserves an id not held here and not in `in_use` (the cluster's current VMIDs).
    pub fn reserve(&self, in_use: &HashSet<u32>) -> Option<u32> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (start, end) = (*self.range.start(), *self.range.end());
        let span = end - start + 1;
        for step in 0..span {
            let offset = (state.cursor - start + step) % span;
            let id = start + offset;
            if !state.held.contains(&id) && !in_use.contains(&id) {
                state.held.insert(id);
                state.cursor = if id == end { start } else { id + 1 };
                return Some(id);
            }
        }
        None
    }

    /// Gives an id back once its VM is gone.
    pub fn release(&self, id: u32) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).held.remove(&id);
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_while_held_and_skip_the_clusters() {
        let pool = VmidPool::new(100..=104);
        let in_use: HashSet<u32> = [101].into();
        assert_eq!(pool.reserve(&in_use), Some(100));
        assert_eq!(pool.reserve(&in_use), Some(102));
        assert_eq!(pool.reserve(&in_use), Some(103));
        assert_eq!(pool.reserve(&in_use), Some(104));
        assert_eq!(pool.reserve(&in_use), None, "101 is the cluster's, the rest are held");
        pool.release(102);
        assert_eq!(pool.reserve(&in_use), Some(102));
        assert_eq!(pool.held(), 4);
    }

    #[test]
    fn concurrent_reservations_never_collide() {
        let pool = std::sync::Arc::new(VmidPool::new(1000..=1999));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || (0..100).map(|_| pool.reserve(&HashSet::new()).unwrap()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u32> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 800);
    }
}
