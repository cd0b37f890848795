//! A job's output, persisted as it arrives and readable by any number of followers
//! while it grows.
//!
//! File format: records of `[stream: u8][len: u32 BE][data]`. A follower holds a byte
//! offset, so `--follow` can stop and resume anywhere on a record boundary.
//!
//! Stream tag 0 is a checkpoint, `[0][8][seq: u64 BE]`: everything the guest sent up to
//! and including output chunk `seq` is stored above it. After a crash the log is cut
//! back to its last checkpoint and the agent resends from the chunk after it, so each
//! byte is stored exactly once. Readers skip checkpoints.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use agentlab_protocol::{MAX_FRAME_LEN, OutputStream};
use tokio::sync::watch;

const RECORD_HEADER: usize = 5;
const CHECKPOINT_TAG: u8 = 0;

/// How far the log has been written, and whether it is complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogProgress {
    pub len: u64,
    pub closed: bool,
    /// The size limit was reached; later output was dropped.
    pub full: bool,
}

/// The writing end, owned by the job's runner.
pub struct JobLog {
    path: PathBuf,
    file: Mutex<File>,
    progress: watch::Sender<LogProgress>,
    /// Most bytes of output stored; beyond it output is dropped after one marker.
    max_bytes: u64,
}

/// What the log says once it is full.
pub const TRUNCATED_MARKER: &[u8] =
    b"\n[agentlab: the job's output reached this log's size limit; the rest was dropped]\n";

impl JobLog {
    pub fn create(path: &Path, max_bytes: u64) -> io::Result<JobLog> {
        let file = File::options().create(true).truncate(true).write(true).open(path)?;
        Ok(JobLog {
            path: path.to_owned(),
            file: Mutex::new(file),
            progress: watch::Sender::new(LogProgress::default()),
            max_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores one record; returns false if the log is full and it was dropped.
    pub fn append(&self, stream: OutputStream, data: &[u8]) -> io::Result<bool> {
        // Once the marker is written nothing follows it, however small.
        if self.progress.borrow().full {
            return Ok(false);
        }
        let stored = self.progress.borrow().len;
        let room = self.max_bytes.saturating_sub(stored);
        let needed = (RECORD_HEADER + data.len()) as u64;
        if needed + (RECORD_HEADER + TRUNCATED_MARKER.len()) as u64 > room {
            if room > 0 {
                self.write_record(OutputStream::Stderr, TRUNCATED_MARKER)?;
                self.progress.send_modify(|p| p.full = true);
            }
            return Ok(false);
        }
        self.write_record(stream, data)?;
        Ok(true)
    }

    /// Marks the output through chunk `seq` as stored.
    pub fn checkpoint(&self, seq: u64) -> io::Result<()> {
        self.write_tagged(CHECKPOINT_TAG, &seq.to_be_bytes())
    }

    /// Opens an existing log to go on writing it: cut back to its last checkpoint, whose
    /// chunk number it returns (none: nothing was stored yet).
    pub fn reopen(path: &Path, max_bytes: u64) -> io::Result<(JobLog, Option<u64>)> {
        let mut reader = LogReader::open(path, 0)?;
        let limit = std::fs::metadata(path)?.len();
        let (mut keep, mut stored_through) = (0u64, None);
        loop {
            match reader.next_raw(limit) {
                Ok(Some((CHECKPOINT_TAG, data))) => {
                    stored_through = data.try_into().ok().map(u64::from_be_bytes);
                    keep = reader.offset();
                }
                Ok(Some(_)) => {}
                // A torn record at the end is cut off with the rest.
                Ok(None) | Err(_) => break,
            }
        }
        let file = File::options().write(true).open(path)?;
        file.set_len(keep)?;
        let mut file = file;
        file.seek(SeekFrom::Start(keep))?;
        let log = JobLog {
            path: path.to_owned(),
            file: Mutex::new(file),
            progress: watch::Sender::new(LogProgress { len: keep, ..LogProgress::default() }),
            max_bytes,
        };
        Ok((log, stored_through))
    }

    fn write_record(&self, stream: OutputStream, data: &[u8]) -> io::Result<()> {
        self.write_tagged(stream_byte(stream), data)
    }

    fn write_tagged(&self, tag: u8, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| io::Error::other("output record too large"))?;
        let mut record = Vec::with_capacity(RECORD_HEADER + data.len());
        record.push(tag);
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

    /// The next complete output record below `limit` bytes, or `None` if there is none
    /// yet. Checkpoints are skipped.
    pub fn next_record(&mut self, limit: u64) -> io::Result<Option<(OutputStream, Vec<u8>)>> {
        loop {
            let Some((tag, data)) = self.next_raw(limit)? else {
                return Ok(None);
            };
            let stream = match tag {
                CHECKPOINT_TAG => continue,
                1 => OutputStream::Stdout,
                2 => OutputStream::Stderr,
                other => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad stream tag {other} in log")));
                }
            };
            return Ok(Some((stream, data)));
        }
    }

    /// The next complete record of any kind below `limit`, with its tag.
    fn next_raw(&mut self, limit: u64) -> io::Result<Option<(u8, Vec<u8>)>> {
        if self.offset + RECORD_HEADER as u64 > limit {
            return Ok(None);
        }
        let mut header = [0u8; RECORD_HEADER];
        self.file.read_exact(&mut header)?;
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
        Ok(Some((header[0], data)))
    }
}

/// Where the last `lines` lines of a log begin: the offset of the record holding their
/// first byte, and how many bytes of that record come before it. Scans the records
/// below `limit` once, remembering only the last `lines + 1` line starts.
pub fn tail_start(path: &Path, limit: u64, lines: u64) -> io::Result<(u64, usize)> {
    let mut reader = LogReader::open(path, 0)?;
    let keep = usize::try_from(lines).unwrap_or(usize::MAX).saturating_add(1);
    // Positions (record offset, byte within the record) just after each newline.
    let mut after_newline: std::collections::VecDeque<(u64, usize)> = std::collections::VecDeque::new();
    let mut ends_with_newline = false;
    loop {
        let offset = reader.offset();
        let Some((_, data)) = reader.next_record(limit)? else {
            break;
        };
        for (i, _) in data.iter().enumerate().filter(|(_, b)| **b == b'\n') {
            after_newline.push_back((offset, i + 1));
            if after_newline.len() > keep {
                after_newline.pop_front();
            }
        }
        if let Some(last) = data.last() {
            ends_with_newline = *last == b'\n';
        }
    }
    if lines == 0 {
        return Ok((reader.offset(), 0));
    }
    // The final newline ends the last line; it starts none.
    if ends_with_newline {
        after_newline.pop_back();
    }
    let wanted = keep - 1;
    Ok(if after_newline.len() >= wanted { after_newline[after_newline.len() - wanted] } else { (0, 0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_in_order_and_resume_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        let log = JobLog::create(&path, 1 << 20).unwrap();
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

    #[test]
    fn a_full_log_drops_output_after_one_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        let limit = (5 + 10 + 5 + TRUNCATED_MARKER.len()) as u64;
        let log = JobLog::create(&path, limit).unwrap();
        assert!(log.append(OutputStream::Stdout, b"0123456789").unwrap());
        assert!(!log.append(OutputStream::Stdout, b"x").unwrap());
        assert!(!log.append(OutputStream::Stdout, b"y").unwrap());
        let progress = *log.subscribe().borrow();
        assert!(progress.full);
        assert_eq!(progress.len, limit);
        let mut reader = LogReader::open(&path, 0).unwrap();
        assert_eq!(reader.next_record(limit).unwrap(), Some((OutputStream::Stdout, b"0123456789".to_vec())));
        assert_eq!(reader.next_record(limit).unwrap(), Some((OutputStream::Stderr, TRUNCATED_MARKER.to_vec())));
        assert_eq!(reader.next_record(limit).unwrap(), None);
    }

    #[test]
    fn nothing_small_slips_in_after_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        // After the marker there is room for "y" and another marker.
        let limit = (5 + 10 + 2 * (5 + TRUNCATED_MARKER.len()) + 6) as u64;
        let log = JobLog::create(&path, limit).unwrap();
        assert!(log.append(OutputStream::Stdout, b"0123456789").unwrap());
        assert!(!log.append(OutputStream::Stdout, &[b'z'; 4096]).unwrap(), "too large for the room left");
        assert!(!log.append(OutputStream::Stdout, b"y").unwrap(), "it would fit, but the log is full");
        let len = log.subscribe().borrow().len;
        assert_eq!(len, (5 + 10 + 5 + TRUNCATED_MARKER.len()) as u64);
        let mut reader = LogReader::open(&path, 0).unwrap();
        assert_eq!(reader.next_record(len).unwrap(), Some((OutputStream::Stdout, b"0123456789".to_vec())));
        assert_eq!(reader.next_record(len).unwrap(), Some((OutputStream::Stderr, TRUNCATED_MARKER.to_vec())));
        assert_eq!(reader.next_record(len).unwrap(), None);
    }

    #[test]
    fn reopening_cuts_back_to_the_last_checkpoint_and_readers_skip_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        let log = JobLog::create(&path, 1 << 20).unwrap();
        assert_eq!(JobLog::reopen(&path, 1 << 20).unwrap().1, None);
        log.append(OutputStream::Stdout, b"chunk 0\n").unwrap();
        log.checkpoint(0).unwrap();
        log.append(OutputStream::Stdout, b"chunk 1 and part of ").unwrap();
        log.checkpoint(1).unwrap();
        log.append(OutputStream::Stdout, b"chunk 2 held back").unwrap();
        // A record torn by the crash.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&[1, 0, 0, 0, 9, b'x']).unwrap();
        drop(log);
        let (log, stored_through) = JobLog::reopen(&path, 1 << 20).unwrap();
        assert_eq!(stored_through, Some(1));
        log.append(OutputStream::Stderr, b"resent\n").unwrap();
        let len = log.subscribe().borrow().len;
        assert_eq!(len, std::fs::metadata(&path).unwrap().len());
        let mut reader = LogReader::open(&path, 0).unwrap();
        let mut got = Vec::new();
        while let Some((_, data)) = reader.next_record(len).unwrap() {
            got.extend_from_slice(&data);
        }
        assert_eq!(got, b"chunk 0\nchunk 1 and part of resent\n");
    }

    /// Reads everything from a tail position, as the server does.
    fn read_tail(path: &Path, limit: u64, lines: u64) -> Vec<u8> {
        let (offset, skip) = tail_start(path, limit, lines).unwrap();
        let mut reader = LogReader::open(path, offset).unwrap();
        let mut out = Vec::new();
        let mut first = true;
        while let Some((_, data)) = reader.next_record(limit).unwrap() {
            out.extend_from_slice(if first { &data[skip..] } else { &data[..] });
            first = false;
        }
        out
    }

    #[test]
    fn tail_finds_the_last_lines_across_records_and_streams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        let log = JobLog::create(&path, 1 << 20).unwrap();
        log.append(OutputStream::Stdout, b"one\ntw").unwrap();
        log.append(OutputStream::Stderr, b"o\nthree\n").unwrap();
        log.append(OutputStream::Stdout, b"four\nfive").unwrap();
        let len = log.subscribe().borrow().len;
        assert_eq!(read_tail(&path, len, 1), b"five");
        assert_eq!(read_tail(&path, len, 2), b"four\nfive");
        assert_eq!(read_tail(&path, len, 3), b"three\nfour\nfive");
        assert_eq!(read_tail(&path, len, 4), b"two\nthree\nfour\nfive");
        assert_eq!(read_tail(&path, len, 9), b"one\ntwo\nthree\nfour\nfive");
        assert_eq!(read_tail(&path, len, 0), b"");
        log.append(OutputStream::Stdout, b"\n").unwrap();
        let len = log.subscribe().borrow().len;
        assert_eq!(read_tail(&path, len, 2), b"four\nfive\n");
    }
}
