//! The agent's own log: written to stderr (the console) and kept, bounded, in memory so
//! that it can go back to the host with the job's artifacts.

use std::io::Write;
use std::sync::{Mutex, PoisonError};

use tracing_subscriber::fmt::MakeWriter;

/// The most of the log kept for the artifacts; older lines are dropped first.
const MAX_KEPT: usize = 256 * 1024;

static KEPT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// What has been logged so far (the last 256 KiB).
pub fn snapshot() -> Vec<u8> {
    KEPT.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// A `MakeWriter` for tracing: stderr plus the kept copy.
#[derive(Clone, Copy, Default)]
pub struct Tee;

impl<'a> MakeWriter<'a> for Tee {
    type Writer = Tee;

    fn make_writer(&'a self) -> Tee {
        Tee
    }
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut kept = KEPT.lock().unwrap_or_else(PoisonError::into_inner);
        kept.extend_from_slice(buf);
        if kept.len() > MAX_KEPT {
            let excess = kept.len() - MAX_KEPT;
            kept.drain(..excess);
        }
        drop(kept);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
