//! Redaction as an `io::Read` adapter, for files (artifacts) rather than live streams.

use std::io::{self, Read};

use crate::stream::ByteCount;
use crate::{Output, RedactStream, Redactor};

/// Bytes read from the inner reader at a time.
const READ_BYTES: usize = 256 * 1024;

/// Reads `inner` with every secret replaced, as [`Redactor::redact_all`] would, in
/// bounded memory: the chunk being worked on and the held-back tail.
pub struct RedactReader<R> {
    inner: R,
    stream: RedactStream<'static>,
    out: Vec<u8>,
    pos: usize,
    done: bool,
    chunk: Vec<u8>,
}

impl<R: Read> RedactReader<R> {
    pub fn new(inner: R, redactor: &Redactor) -> Self {
        RedactReader {
            inner,
            stream: redactor.clone().into_stream(),
            out: Vec::new(),
            pos: 0,
            done: false,
            chunk: vec![0u8; READ_BYTES],
        }
    }
}

impl<R: Read> Read for RedactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            if self.done {
                return Ok(0);
            }
            self.out.clear();
            self.pos = 0;
            let n = self.inner.read(&mut self.chunk)?;
            if n == 0 {
                self.stream.flush(&mut self.out);
                self.done = true;
            } else {
                self.stream.push(&self.chunk[..n], &mut self.out);
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Redactor {
    /// How long `inner` is once redacted, read through once: only counted, never
    /// copied.
    pub fn redacted_len(&self, inner: impl Read) -> io::Result<u64> {
        let mut count = ByteCount::default();
        self.redact_from(inner, &mut count, &mut vec![0u8; READ_BYTES])?;
        Ok(count.0)
    }

    /// Redacts what `inner` yields into `out`, reading into `buf`, until `inner` ends
    /// or `out` is full.
    pub fn redact_from(&self, mut inner: impl Read, out: &mut impl Output, buf: &mut [u8]) -> io::Result<()> {
        let mut stream = self.stream();
        while !out.is_full() {
            match inner.read(buf) {
                Ok(0) => break,
                Ok(n) => stream.push(&buf[..n], out),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        stream.flush(out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A reader that hands out at most `step` bytes a call, to split secrets.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn reading_equals_redact_all_and_the_length_is_known_first() {
        let redactor = Redactor::new(["sk-secret-value-1", "another-secret"]);
        let mut input = Vec::new();
        for i in 0..20_000 {
            input.extend_from_slice(format!("line {i}: sk-secret-value-1 and another-secret\n").as_bytes());
        }
        let expected = redactor.redact_all(&input);
        for step in [1, 7, 4096, 1 << 20] {
            let mut out = Vec::new();
            RedactReader::new(Trickle { data: &input, step }, &redactor).read_to_end(&mut out).unwrap();
            assert_eq!(out, expected, "step {step}");
            assert_eq!(redactor.redacted_len(Trickle { data: &input, step }).unwrap(), expected.len() as u64);
        }
        assert!(!expected.windows(14).any(|w| w == b"another-secret"));
    }
}
