//! The matcher: an Aho-Corasick automaton plus a sampling filter in front of it.
//!
//! With about a thousand patterns the aho-corasick crate has no prefilter left
//! and a plain automaton walk costs a dependent table load per byte, which is
//! too slow for the 1 GB/s budget. Every pattern is at least `min_len` bytes
//! long, so an occurrence always covers one of every `stride` positions with a
//! 4-byte window taken from its first `min_len` bytes. We hash the window at
//! those sampled positions into a small bitset and only walk the automaton
//! (exactly, with all overlapping matches) around positions that hit.
//!
//! The automaton is the crate's contiguous NFA rather than its DFA: since it is
//! only walked near filter hits, the DFA's cheaper transitions did not pay for
//! its size (7.5 MB against 1.1 MB for 100 secrets, and slower in practice
//! because of cache misses, even with a secret on every other line).

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::{Anchored, MatchKind};

/// Bytes hashed per sampled position.
const WINDOW: usize = 4;

/// A match of one pattern, as a half-open byte range of the scanned buffer.
pub(crate) type Span = (usize, usize);

/// What the scanner needs to know about an automaton state.
#[derive(Clone, Copy, Debug)]
struct StateInfo {
    /// Length of the longest suffix of the input that is a prefix of some
    /// pattern (the state's depth in the trie).
    depth: u32,
    /// How many trailing bytes could still grow into a match: `depth` when the
    /// state is a proper prefix of some pattern, otherwise that of the longest
    /// suffix that is.
    hold: u32,
    /// Length of the longest pattern ending here, 0 when none does. Shorter
    /// patterns ending at the same place lie inside it and change nothing.
    longest_match: u32,
}

#[derive(Debug)]
pub(crate) struct Engine {
    aut: NFA,
    start: StateID,
    /// Indexed by `StateID::as_usize() >> shift`.
    info: Vec<StateInfo>,
    shift: u32,
    /// Used for states missing from `info`; never expected, but conservative.
    unknown: StateInfo,
    filter: Filter,
    min_len: usize,
    max_len: usize,
}

impl Engine {
    /// Builds the matcher; `None` when `patterns` is empty or cannot be built.
    pub(crate) fn new(patterns: &[Vec<u8>]) -> Option<Engine> {
        let min_len = patterns.iter().map(Vec::len).min()?;
        let max_len = patterns.iter().map(Vec::len).max()?;
        if min_len < WINDOW {
            return None;
        }
        let aut = aho_corasick::nfa::contiguous::Builder::new()
            .match_kind(MatchKind::Standard)
            .prefilter(false)
            .build(patterns)
            .ok()?;
        let limit = u32::try_from(max_len).ok()?;
        let unknown = StateInfo { depth: limit, hold: limit, longest_match: 0 };
        let (start, info, shift) = state_table(&aut, patterns, unknown)?;
        Some(Engine { aut, start, info, shift, unknown, filter: Filter::new(patterns, min_len), min_len, max_len })
    }

    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    pub(crate) fn memory_usage(&self) -> usize {
        self.aut.memory_usage() + self.info.len() * size_of::<StateInfo>() + FILTER_WORDS * size_of::<u64>()
    }

    /// Appends every pattern occurrence in `buf` (overlapping ones included,
    /// unordered, possibly repeated) to `spans`, and returns how many trailing
    /// bytes of `buf` could still be the start of an occurrence.
    pub(crate) fn scan(&self, buf: &[u8], spans: &mut Vec<Span>) -> usize {
        let stride = self.filter.stride;
        // Every occurrence starting before `resume` has been recorded, and none
        // still in progress starts before it.
        let mut resume = 0;
        while let Some(at) = self.filter.next_hit(buf, resume) {
            // An occurrence whose window was sampled at `at` starts at most
            // `stride - 1` bytes earlier.
            let from = at.saturating_sub(stride - 1).max(resume);
            match self.walk(buf, from, at, spans) {
                Ok(next) => resume = next,
                Err(hold) => return hold,
            }
        }
        // Samples found every occurrence that fits in the buffer, and every
        // partial one at the end that is long enough to contain a sampled
        // window from a pattern's first `min_len` bytes (the walk from such a
        // hit runs to the end). Only a shorter partial match can be left.
        let from = resume.max(buf.len().saturating_sub(self.min_len - 1));
        match self.walk(buf, from, usize::MAX, spans) {
            Ok(_) => 0,
            Err(hold) => hold,
        }
    }

    #[inline]
    fn info(&self, sid: StateID) -> StateInfo {
        self.info.get(sid.as_usize() >> self.shift).copied().unwrap_or(self.unknown)
    }

    /// Walks the automaton from a fresh start state at `from`, recording
    /// matches. Stops after the first byte past `after` at which the current
    /// partial match (if any) starts beyond `after`, and returns that start;
    /// or returns `Err(hold)` when the buffer ends first.
    #[inline]
    fn walk(&self, buf: &[u8], from: usize, after: usize, spans: &mut Vec<Span>) -> Result<usize, usize> {
        let mut sid = self.start;
        let mut pos = from;
        while let Some(&byte) = buf.get(pos) {
            sid = self.aut.next_state(Anchored::No, sid, byte);
            pos += 1;
            let info = self.info(sid);
            if info.longest_match > 0 {
                spans.push((pos.saturating_sub(info.longest_match as usize), pos));
            }
            let partial_start = pos.saturating_sub(info.depth as usize);
            if partial_start > after {
                return Ok(partial_start);
            }
        }
        Err(self.info(sid).hold as usize)
    }
}

/// Computes per-state depth, hold-back length and longest match by walking
/// every pattern through the automaton: in an unanchored Aho-Corasick
/// automaton each state is a trie node, and feeding a pattern's prefix from
/// the start lands exactly on the node of that prefix.
fn state_table<A: Automaton>(
    aut: &A,
    patterns: &[Vec<u8>],
    unknown: StateInfo,
) -> Option<(StateID, Vec<StateInfo>, u32)> {
    let start = aut.start_state(Anchored::No).ok()?;
    // (state, depth, is a proper prefix of some pattern)
    let mut visited: Vec<(StateID, u32, bool)> = vec![(start, 0, true)];
    for pattern in patterns {
        let mut sid = start;
        for (i, &byte) in pattern.iter().enumerate() {
            sid = aut.next_state(Anchored::No, sid, byte);
            visited.push((sid, u32::try_from(i + 1).ok()?, i + 1 < pattern.len()));
        }
    }
    let all_ids = visited.iter().fold(0usize, |acc, (sid, _, _)| acc | sid.as_usize());
    let shift = if all_ids == 0 { 0 } else { all_ids.trailing_zeros() };
    let size = visited.iter().map(|(sid, _, _)| sid.as_usize() >> shift).max()? + 1;
    let mut info = vec![unknown; size];
    let mut proper = vec![false; size];
    for &(sid, depth, is_proper) in &visited {
        let idx = sid.as_usize() >> shift;
        info[idx] = StateInfo { depth, hold: depth, longest_match: 0 };
        proper[idx] |= is_proper;
        if aut.is_match(sid) {
            let longest = (0..aut.match_len(sid)).map(|i| aut.pattern_len(aut.match_pattern(sid, i))).max();
            info[idx].longest_match = u32::try_from(longest.unwrap_or(0)).ok()?;
        }
    }
    // A state that is a whole pattern but no proper prefix is a leaf: only its
    // longest suffix that is a proper prefix can still grow into a match.
    for pattern in patterns {
        let mut sid = start;
        for &byte in pattern {
            sid = aut.next_state(Anchored::No, sid, byte);
        }
        let idx = sid.as_usize() >> shift;
        if proper[idx] {
            continue;
        }
        let mut tail: &[u8] = pattern;
        let hold = loop {
            // The state after all of `tail` but its first byte is the longest
            // proper suffix of `tail` that is a trie node.
            let mut s = start;
            for &byte in tail.get(1..)? {
                s = aut.next_state(Anchored::No, s, byte);
            }
            let i = s.as_usize() >> shift;
            let depth = info.get(i)?.depth;
            if proper[i] {
                break depth;
            }
            tail = tail.get(tail.len().checked_sub(depth as usize)?..)?;
        };
        info[idx].hold = hold;
    }
    Some((start, info, shift))
}

/// Words in the filter table: 16 KiB, half the L1 data cache of the machines
/// we run on. A fixed size lets the index come straight from the top hash
/// bits with no bounds check.
const FILTER_WORDS: usize = 1 << FILTER_LOG2_WORDS;
const FILTER_LOG2_WORDS: u32 = 11;

/// Blocked Bloom filter (two bits in one 64-bit word) of hashed 4-byte windows
/// taken from the first `min_len` bytes of every pattern.
#[derive(Debug)]
struct Filter {
    bits: Box<[u64; FILTER_WORDS]>,
    /// Distance between sampled positions: `min_len - WINDOW + 1`, so each
    /// occurrence contains a sample whose whole window lies in its first
    /// `min_len` bytes.
    stride: usize,
}

impl Filter {
    /// Fibonacci hashing constant (2^64 / golden ratio): the high bits of the
    /// product depend on every bit of the window.
    const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

    fn new(patterns: &[Vec<u8>], min_len: usize) -> Filter {
        let stride = min_len - WINDOW + 1;
        let mut filter = Filter { bits: Box::new([0; FILTER_WORDS]), stride };
        for pattern in patterns {
            for window in pattern.windows(WINDOW).take(stride) {
                let mut w = [0u8; WINDOW];
                w.copy_from_slice(window);
                let (word, mask) = Self::probe(w);
                filter.bits[word] |= mask;
            }
        }
        filter
    }

    #[inline(always)]
    fn probe(window: [u8; WINDOW]) -> (usize, u64) {
        let h = u64::from(u32::from_le_bytes(window)).wrapping_mul(Self::MULTIPLIER);
        let word = (h >> (64 - FILTER_LOG2_WORDS)) as usize;
        let mask = (1 << ((h >> 20) & 63)) | (1 << ((h >> 26) & 63));
        (word, mask)
    }

    /// The first sampled position `at`, `at + stride`, ... whose window may
    /// come from a pattern, or `None` when no whole window is left.
    #[inline]
    fn next_hit(&self, buf: &[u8], at: usize) -> Option<usize> {
        let found = buf.get(at..)?.windows(WINDOW).step_by(self.stride).position(|w| {
            let mut window = [0u8; WINDOW];
            window.copy_from_slice(w);
            let (word, mask) = Self::probe(window);
            self.bits[word] & mask == mask
        })?;
        Some(at + found * self.stride)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn engine(patterns: &[&str]) -> Engine {
        let patterns: Vec<Vec<u8>> = patterns.iter().map(|p| p.as_bytes().to_vec()).collect();
        Engine::new(&patterns).unwrap()
    }

    /// Every state reachable from the start must have an entry with its true
    /// depth (its breadth-first distance from the start), or the scanner would
    /// fall back to the conservative defaults or, worse, release too early.
    #[test]
    fn every_reachable_state_is_known() {
        let e = engine(&["abcdef", "bcdxyz", "cdefgh", "zzzzzzzz", "abcdefghij", "xyzabc"]);
        let mut seen = std::collections::HashSet::new();
        let mut queue = std::collections::VecDeque::from([(e.start, 0u32)]);
        while let Some((sid, distance)) = queue.pop_front() {
            if !seen.insert(sid) {
                continue;
            }
            let info = e.info(sid);
            assert_eq!(info.depth, distance, "state {sid:?}");
            assert!(info.hold <= info.depth);
            for b in 0..=255u8 {
                queue.push_back((e.aut.next_state(Anchored::No, sid, b), distance + 1));
            }
        }
        assert!(seen.len() > 30);
    }

    #[test]
    fn hold_is_longest_pending_prefix() {
        let e = engine(&["abcdef", "cdefgh"]);
        let mut spans = Vec::new();
        assert_eq!(e.scan(b"xxxx log line\n", &mut spans), 0);
        assert_eq!(e.scan(b"xxxxabc", &mut spans), 3);
        // "abcdef" is complete and is a leaf; "cdef" may still become "cdefgh".
        assert_eq!(e.scan(b"xxxxabcdef", &mut spans), 4);
        assert_eq!(spans, vec![(4, 10)]);
    }

    #[test]
    fn overlapping_matches_are_all_reported() {
        let e = engine(&["abcdef", "defghi", "cdefgh"]);
        let mut spans = Vec::new();
        e.scan(b"..abcdefghi..", &mut spans);
        spans.sort_unstable();
        spans.dedup();
        assert_eq!(spans, vec![(2, 8), (4, 10), (5, 11)]);
    }

    #[test]
    fn large_pattern_set() {
        let patterns: Vec<Vec<u8>> =
            (0..20_000u32).map(|i| format!("pattern-{:08x}", i.wrapping_mul(2_654_435_761)).into_bytes()).collect();
        let e = Engine::new(&patterns).unwrap();
        let mut spans = Vec::new();
        let hay = format!("xx {} pattern-", String::from_utf8_lossy(&patterns[77]));
        let hold = e.scan(hay.as_bytes(), &mut spans);
        assert_eq!(spans, vec![(3, 19)]);
        assert_eq!(hold, 8);
    }
}
