//! A job's output, persisted as it arrives and readable by any number of followers
//! while it grows.
//!
//! File format: records of `[stream: u8][len: u32 BE][data]`. A follower holds a byte
//! offset, so `--follow` can stop and resume anywhere on a record boundary.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use agentlab_protocol::{MAX_FRAME_LEN, OutputStream};
use tokio::sync::watch;

const RECORD_HEADER: usize = 5;

/// How far the log has been written, and whether it is complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogProgress {
    pub len: u64,
    pub closed: bool,
}

/// The writing end, owned by the job's runner.
pub struct JobLog {
    path: PathBuf,
    file: Mutex<File>,
    progress: watch::Sender<LogProgress>,
}

impl JobLog {
    pub fn create(path: &Path) -> io::Result<JobLog> {
        let file = File::options().create(true).truncate(true).write(true).open(path)?;
        Ok(JobLog {
            path: path.to_owned(),
            file: Mutex::new(file),
            progress: watch::Sender::new(LogProgress::default()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&self, stream: OutputStream, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| io::Error::other("output record too large"))?;
        let mut record = Vec::with_capacity(RECORD_HEADER + data.len());
        record.push(stream_byte(stream));
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(data);
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        file.write_all(&record)?;
        self.progress.send_modify(|p| p.len += record.len() as u64);
        Ok(())
    }

    /// No more output will come.
    pub fn close(&self) {
        self.progress.send_modify(|p| p.closed = true);
    }

    pub fn subscribe(&self) -> watch::Receiver<LogProgress> {
        self.progress.subscribe()
    }
}

fn stream_byte(stream: OutputStream) -> u8 {
    match stream {
        OutputStream::Stdout => 1,
        OutputStream::Stderr => 2,
    }
}

/// Reads records from a log file, from a byte offset.
pub struct LogReader {
    file: File,
    offset: u64,
}

impl LogReader {
    pub fn open(path: &Path, offset: u64) -> io::Result<LogReader> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(offset))?;
        Ok(LogReader { file, offset })
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next complete record below `limit` bytes, or `None` if there is none yet.
    pub fn next_record(&mut self, limit: u64) -> io::Result<Option<(OutputStream, Vec<u8>)>> {
        if self.offset + RECORD_HEADER as u64 > limit {
            return Ok(None);
        }
        let mut header = [0u8; RECORD_HEADER];
        self.file.read_exact(&mut header)?;
        let stream = match header[0] {
            1 => OutputStream::Stdout,
            2 => OutputStream::Stderr,
            other => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad stream tag {other} in log")));
            }
        };
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("log record of {len} bytes")));
        }
        if self.offset + (RECORD_HEADER + len) as u64 > limit {
            self.file.seek(SeekFrom::Start(self.offset))?;
            return Ok(None);
        }
        let mut data = vec![0; len];
        self.file.read_exact(&mut data)?;
        self.offset += (RECORD_HEADER + len) as u64;
        Ok(Some((stream, data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_in_order_and_resume_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        let log = JobLog::create(&path).unwrap();
        let rx = log.subscribe();
        log.append(OutputStream::Stdout, b"one\n").unwrap();
        log.append(OutputStream::Stderr, b"").unwrap();
        log.append(OutputStream::Stderr, b"two").unwrap();
        let len = rx.borrow().len;
        assert_eq!(len, 3 * 5 + 7);

        let mut reader = LogReader::open(&path, 0).unwrap();
        assert_eq!(reader.next_record(len).unwrap(), Some((OutputStream::Stdout, b"one\n".to_vec())));
        let resume_at = reader.offset();
        assert_eq!(reader.next_record(len).unwrap(), Some((OutputStream::Stderr, vec![])));
        assert_eq!(reader.next_record(len).unwrap(), Some((OutputStream::Stderr, b"two".to_vec())));
        assert_eq!(reader.next_record(len).unwrap(), None);

        let mut resumed = LogReader::open(&path, resume_at).unwrap();
        assert_eq!(resumed.next_record(len).unwrap(), Some((OutputStream::Stderr, vec![])));
        // A limit in the middle of a record yields nothing and keeps the position.
        assert_eq!(resumed.next_record(len - 1).unwrap(), None);
        assert_eq!(resumed.next_record(len).unwrap(), Some((OutputStream::Stderr, b"two".to_vec())));
        log.close();
        assert!(rx.borrow().closed);
    }
}
