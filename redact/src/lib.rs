//! Streaming secret redaction for job output.
//!
//! The guest agent forwards a job's stdout/stderr live, so secrets must be
//! removed from a byte stream that arrives in arbitrary chunks, without
//! buffering whole lines and without ever letting a fragment of a secret out.
//! Each secret is expanded into the forms it commonly takes in logs (raw,
//! base64, percent-encoded, JSON-escaped; see [`variants`]) and every
//! occurrence of any of them becomes [`REDACTED`].
//!
//! Occurrences that overlap (one secret running into another, or a secret and
//! one of its encodings) are replaced together by a single marker, so no byte
//! of any of them survives.

mod engine;
mod patterns;
mod read;
mod stream;

pub mod bench;

use std::sync::Arc;

use zeroize::Zeroize;

pub use patterns::{MIN_SECRET_LEN, variants};
pub use read::RedactReader;
pub use stream::{Output, RedactStream};

use engine::Engine;
use stream::InnerRef;

/// What every occurrence of a secret is replaced with.
pub const REDACTED: &[u8] = b"[REDACTED]";

/// A compiled set of secrets. Cheap to clone and share across threads.
#[derive(Debug, Clone)]
pub struct Redactor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) matcher: Matcher,
    patterns: Vec<Vec<u8>>,
    skipped_short: usize,
}

impl Drop for Inner {
    /// The patterns are the secrets and their encodings: wipe them. (The automaton's
    /// own tables, inside aho-corasick, cannot be reached and are freed as they are.)
    fn drop(&mut self) {
        self.patterns.iter_mut().for_each(|p| p.zeroize());
    }
}

#[derive(Debug)]
pub(crate) enum Matcher {
    /// No patterns: output is input.
    Nothing,
    /// Patterns exist but the automaton could not be built (only conceivable
    /// for absurdly large secret sets). Rather than leak, every flush emits a
    /// single marker in place of all the input since the previous one.
    FailClosed,
    Engine(Box<Engine>),
}

impl Redactor {
    /// Compiles `secrets`. Values shorter than [`MIN_SECRET_LEN`] bytes are
    /// not redacted and are counted in [`skipped_short`](Self::skipped_short)
    /// so the caller can warn; empty values are ignored silently.
    pub fn new<I, S>(secrets: I) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let set = patterns::PatternSet::build(secrets);
        let matcher = if set.patterns.is_empty() {
            Matcher::Nothing
        } else {
            match Engine::new(&set.patterns) {
                Some(engine) => Matcher::Engine(Box::new(engine)),
                None => Matcher::FailClosed,
            }
        };
        Redactor { inner: Arc::new(Inner { matcher, patterns: set.patterns, skipped_short: set.skipped_short }) }
    }

    /// Number of distinct byte patterns (secrets and their encodings) matched.
    pub fn pattern_count(&self) -> usize {
        self.inner.patterns.len()
    }

    /// The patterns themselves, sorted; for tooling such as [`bench::sed_script`].
    pub fn patterns(&self) -> impl Iterator<Item = &[u8]> {
        self.inner.patterns.iter().map(Vec::as_slice)
    }

    /// Secrets that were too short to redact safely.
    pub fn skipped_short(&self) -> usize {
        self.inner.skipped_short
    }

    /// True when there is nothing to redact, so output is a plain copy.
    pub fn is_empty(&self) -> bool {
        matches!(self.inner.matcher, Matcher::Nothing)
    }

    /// Approximate heap size of the compiled matcher, in bytes.
    pub fn memory_usage(&self) -> usize {
        match &self.inner.matcher {
            Matcher::Engine(engine) => engine.memory_usage(),
            Matcher::Nothing | Matcher::FailClosed => 0,
        }
    }

    /// Redacts a complete buffer.
    pub fn redact_all(&self, input: &[u8]) -> Vec<u8> {
        if self.is_empty() {
            return input.to_vec();
        }
        let mut out = Vec::with_capacity(input.len());
        let mut stream = self.stream();
        stream.push(input, &mut out);
        stream.flush(&mut out);
        out
    }

    /// A stream borrowing this redactor.
    pub fn stream(&self) -> RedactStream<'_> {
        RedactStream::new(InnerRef::Borrowed(&self.inner))
    }

    /// A stream that keeps the redactor alive itself, for moving into a task.
    pub fn into_stream(self) -> RedactStream<'static> {
        RedactStream::new(InnerRef::Shared(self.inner))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn redactor_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Redactor>();
        check::<RedactStream<'static>>();
    }

    #[test]
    fn no_secrets_is_a_copy() {
        let r = Redactor::new(Vec::<Vec<u8>>::new());
        assert!(r.is_empty());
        assert_eq!(r.pattern_count(), 0);
        let mut s = r.stream();
        let mut out = Vec::new();
        s.push(b"hello", &mut out);
        assert_eq!(s.held(), 0);
        s.flush(&mut out);
        assert_eq!(out, b"hello");
    }

    #[test]
    fn fail_closed_replaces_everything() {
        let inner = Inner { matcher: Matcher::FailClosed, patterns: vec![b"secret".to_vec()], skipped_short: 0 };
        let r = Redactor { inner: Arc::new(inner) };
        assert!(!r.is_empty());
        assert_eq!(r.redact_all(b"hello secret"), REDACTED);
        assert_eq!(r.redact_all(b""), b"");
    }
}
