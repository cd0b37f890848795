//! Chunk-at-a-time redaction with a bounded hold-back buffer.

use std::sync::Arc;

use crate::engine::Span;
use crate::{Inner, Matcher, REDACTED};

/// Where a stream gets its patterns from: borrowed for scoped use, or shared
/// so the stream can move into a task of its own.
#[derive(Debug, Clone)]
pub(crate) enum InnerRef<'a> {
    Borrowed(&'a Inner),
    Shared(Arc<Inner>),
}

impl InnerRef<'_> {
    fn get(&self) -> &Inner {
        match self {
            InnerRef::Borrowed(inner) => inner,
            InnerRef::Shared(inner) => inner,
        }
    }
}

/// Where redacted bytes go: a buffer, or only their count (to learn a file's redacted
/// length without copying it).
pub trait Output {
    fn put(&mut self, bytes: &[u8]);

    /// Whether it takes nothing more, so a reader feeding it can stop.
    fn is_full(&self) -> bool {
        false
    }
}

impl Output for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Counts what would have been written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteCount(pub u64);

impl Output for ByteCount {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len() as u64;
    }
}

/// Redacts one output stream incrementally.
///
/// Output equals [`Redactor::redact_all`](crate::Redactor::redact_all) of the
/// concatenated input however it is split into chunks. The stream holds back
/// only the longest suffix of what it has seen that is a proper prefix of some
/// pattern, so text that cannot be part of a secret (in practice nearly every
/// log line) is released as soon as it is pushed.
#[derive(Debug, Clone)]
pub struct RedactStream<'a> {
    inner: InnerRef<'a>,
    /// Input not yet released; always a possible start of a match.
    pending: Vec<u8>,
    /// The first `carry` bytes of `pending` belong to a redaction whose
    /// `[REDACTED]` marker has already been written; matches overlapping them
    /// extend it instead of adding another marker.
    carry: usize,
    /// Scratch space for the matches of one scan, kept to avoid reallocating.
    spans: Vec<Span>,
    /// Fail-closed mode only: whether any input arrived since the last flush.
    saw_input: bool,
}

impl<'a> RedactStream<'a> {
    pub(crate) fn new(inner: InnerRef<'a>) -> RedactStream<'a> {
        RedactStream { inner, pending: Vec::new(), carry: 0, spans: Vec::new(), saw_input: false }
    }
}

impl RedactStream<'_> {
    /// Appends redacted output that is safe to release now to `out`; holds back only what could still be the start of a match.
    pub fn push<O: Output + ?Sized>(&mut self, chunk: &[u8], out: &mut O) {
        let max_len = match &self.inner.get().matcher {
            Matcher::Nothing => {
                out.put(chunk);
                return;
            }
            Matcher::FailClosed => {
                self.saw_input |= !chunk.is_empty();
                return;
            }
            Matcher::Engine(engine) => engine.max_len(),
        };
        if chunk.is_empty() {
            return;
        }
        if self.pending.is_empty() {
            let keep = self.process(chunk, false, out);
            self.pending.extend_from_slice(&chunk[keep..]);
            return;
        }
        // Join the held bytes with just enough of the chunk that the next cut
        // lands inside the chunk; the rest of the chunk is then scanned in
        // place instead of being copied.
        let held = self.pending.len();
        let joined_len = chunk.len().min(2 * max_len);
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(&chunk[..joined_len]);
        let keep = self.process(&buf, false, out);
        if joined_len == chunk.len() || keep < held {
            // Either the chunk is used up, or (never expected, as at most
            // `max_len - 1` bytes are held) the cut fell before the chunk:
            // then rescan held bytes and the whole rest together.
            buf.drain(..keep);
            let rest = &chunk[joined_len..];
            if !rest.is_empty() {
                buf.extend_from_slice(rest);
                let keep = self.process(&buf, false, out);
                buf.drain(..keep);
            }
            self.pending = buf;
            return;
        }
        buf.clear();
        self.pending = buf;
        let rest = &chunk[keep - held..];
        let keep = self.process(rest, false, out);
        self.pending.extend_from_slice(&rest[keep..]);
    }

    /// Releases everything held (end of stream, or the live-stream timer fired).
    ///
    /// A secret split across a flush is not recognised, so flushing mid-stream
    /// trades safety for liveness; see [`held`](Self::held) to flush only when
    /// something is actually waiting.
    pub fn flush<O: Output + ?Sized>(&mut self, out: &mut O) {
        if let Matcher::FailClosed = self.inner.get().matcher {
            if std::mem::take(&mut self.saw_input) {
                out.put(REDACTED);
            }
            return;
        }
        let buf = std::mem::take(&mut self.pending);
        if !buf.is_empty() {
            self.process(&buf, true, out);
        }
        self.carry = 0;
        self.pending = buf;
        self.pending.clear();
    }

    /// Bytes currently held back.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Scans `buf` (which starts where the previous release ended), writes
    /// the releasable part to `out` and returns the offset where held bytes
    /// begin (`buf.len()` at the end of the stream).
    fn process<O: Output + ?Sized>(&mut self, buf: &[u8], at_end: bool, out: &mut O) -> usize {
        let Matcher::Engine(engine) = &self.inner.get().matcher else {
            return buf.len();
        };
        self.spans.clear();
        let hold = engine.scan(buf, &mut self.spans);
        let cut = if at_end { buf.len() } else { buf.len() - hold.min(buf.len()) };
        self.carry = emit(buf, cut, self.carry, &mut self.spans, out);
        cut
    }
}

/// Writes `buf[..cut]` to `out` with every group of overlapping matches
/// replaced by one [`REDACTED`], and returns the new carry: how far past `cut`
/// a group that straddles it (already replaced) extends.
///
/// Matches that start at or after `cut` are left alone; the caller rescans
/// those bytes next time.
fn emit<O: Output + ?Sized>(buf: &[u8], cut: usize, carry: usize, spans: &mut Vec<Span>, out: &mut O) -> usize {
    if carry > 0 {
        spans.push((0, carry));
    }
    merge_overlapping(spans);
    let mut cursor = 0;
    let mut new_carry = 0;
    for (i, &(start, end)) in spans.iter().enumerate() {
        // Only the first group can contain the carried span, which starts at 0.
        let already_written = i == 0 && carry > 0;
        if start >= cut {
            if already_written {
                new_carry = end - cut;
            }
            break;
        }
        out.put(&buf[cursor..start]);
        if !already_written {
            out.put(REDACTED);
        }
        if end > cut {
            new_carry = end - cut;
            cursor = cut;
            break;
        }
        cursor = end;
    }
    if cursor < cut {
        out.put(&buf[cursor..cut]);
    }
    new_carry
}

/// Sorts `spans` and merges those sharing at least one byte. Spans that merely
/// touch stay separate, so back-to-back secrets each get their own marker.
fn merge_overlapping(spans: &mut Vec<Span>) {
    spans.sort_unstable();
    let mut merged = 0;
    for i in 0..spans.len() {
        let (start, end) = spans[i];
        if merged > 0 && start < spans[merged - 1].1 {
            let last = &mut spans[merged - 1].1;
            *last = (*last).max(end);
        } else {
            spans[merged] = (start, end);
            merged += 1;
        }
    }
    spans.truncate(merged);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn merge_keeps_touching_spans_apart() {
        let mut spans = vec![(10, 16), (0, 6), (6, 12), (20, 26), (21, 23)];
        merge_overlapping(&mut spans);
        assert_eq!(spans, vec![(0, 6), (6, 16), (20, 26)]);
    }

    #[test]
    fn emit_respects_cut_and_carry() {
        let buf = b"0123456789abcdef";
        let mut out = Vec::new();
        // Group 2..6 done, group 8..12 straddles the cut at 10.
        let carry = emit(buf, 10, 0, &mut vec![(2, 6), (8, 12)], &mut out);
        assert_eq!(out, b"01[REDACTED]67[REDACTED]");
        assert_eq!(carry, 2);
        // Next buffer starts at old offset 10; a match at 1..5 overlaps the carry.
        out.clear();
        let carry = emit(&buf[10..], 6, carry, &mut vec![(1, 5)], &mut out);
        assert_eq!(out, b"f");
        assert_eq!(carry, 0);
    }
}
