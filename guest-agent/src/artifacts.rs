//! Pushes the job's artifacts: the workdir files that match the host's globs, the
//! agent's own log and a `report.json`, as one tar stream in acknowledged chunks with
//! its SHA-256. The job is over (its process group killed) before this runs, so the
//! files hold still. Symlinks are never followed, and nothing but regular files goes in.
//!
//! Three stages overlap: a thread builds the tar into pooled chunks, a second hashes
//! them (SHA-256 in software is the slowest stage under TCG, so it has a vCPU to
//! itself), and the runtime's thread sends them.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc as sync_mpsc;

use agentlab_protocol::{
    ArtifactRequest, ArtifactSummary, CHUNK_WINDOW, DataMessage, GuestConnection, GuestMessage, HostMessage,
    MessageKind, ProtocolError, SEND_CHUNK_LEN,
};
use agentlab_redact::Redactor;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::output::ChunkPool;
use crate::session::Stream;

/// Where the agent's own files go in the stream.
const AGENT_DIR: &str = ".agentlab";
/// Deepest directory walked.
const MAX_DEPTH: usize = 64;
/// Chunks queued between two stages.
const STAGE_CHUNKS: usize = 8;
/// Read size for files that are redacted on their way into the tar.
const IO_BYTES: usize = 256 * 1024;

/// Files the agent adds itself, whatever the globs say.
pub struct AgentFiles {
    pub report_json: Vec<u8>,
    pub agent_log: Vec<u8>,
}

/// Builds and sends the artifact stream; returns what was sent.
pub async fn push<S: Stream>(
    conn: &mut GuestConnection<S>,
    request: &ArtifactRequest,
    workdir: &Path,
    agent_files: AgentFiles,
    redactor: &Redactor,
) -> Result<ArtifactSummary, ProtocolError> {
    let pool = ChunkPool::default();
    let (built_tx, built_rx) = sync_mpsc::sync_channel::<Vec<u8>>(STAGE_CHUNKS);
    let (hashed_tx, mut hashed_rx) = mpsc::channel::<Vec<u8>>(STAGE_CHUNKS);
    let (request_, workdir_, redactor_, pool_) = (request.clone(), workdir.to_owned(), redactor.clone(), pool.clone());
    let builder = tokio::task::spawn_blocking(move || {
        let mut tar = tar::Builder::new(ChunkWriter { chunk: pool_.take(), pool: pool_, tx: built_tx });
        let skipped = write_tar(&mut tar, &request_, &workdir_, agent_files, &redactor_);
        let finished = tar.into_inner().and_then(|mut chunks| chunks.flush());
        (skipped, finished)
    });
    let hasher = tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        for chunk in built_rx {
            hasher.update(&chunk);
            if hashed_tx.blocking_send(chunk).is_err() {
                break;
            }
        }
        <[u8; 32]>::from(hasher.finalize())
    });

    let (mut sent, mut acked, mut bytes) = (0u64, 0u64, 0u64);
    let mut eof = false;
    while !eof || acked < sent {
        if !eof && sent - acked < CHUNK_WINDOW {
            let Some(data) = hashed_rx.recv().await else {
                eof = true;
                continue;
            };
            bytes += data.len() as u64;
            // Sent from its own buffer (artifacts are redacted already), then reused.
            conn.send_data_frame(DataMessage::ArtifactChunk { seq: sent }, &data).await?;
            pool.give(data);
            sent += 1;
            continue;
        }
        match conn.recv_required("artifact acknowledgements").await? {
            HostMessage::ArtifactAck { seq } => acked = acked.max(seq.saturating_add(1)).min(sent),
            other => return Err(ProtocolError::Unexpected { expected: "ArtifactAck", got: other.kind().to_owned() }),
        }
    }
    let stage_failed =
        |e: tokio::task::JoinError| ProtocolError::io("building the artifact tar", std::io::Error::other(e));
    let (mut skipped, finished) = builder.await.map_err(stage_failed)?;
    let sha256 = hasher.await.map_err(stage_failed)?;
    // An unfinished archive gets no hash: the host refuses it, with the reason recorded.
    let sha256 = match finished {
        Ok(()) => sha256,
        Err(e) => {
            skipped.push(format!("(archive): not finished: {e}"));
            [0; 32]
        }
    };
    let summary = ArtifactSummary { bytes, sha256, skipped };
    conn.send(GuestMessage::ArtifactsDone(summary.clone())).await?;
    Ok(summary)
}

/// The tar builder's output: fills pooled chunks of [`SEND_CHUNK_LEN`] and hands each
/// full one to the next stage.
struct ChunkWriter {
    chunk: Vec<u8>,
    pool: ChunkPool,
    tx: sync_mpsc::SyncSender<Vec<u8>>,
}

impl ChunkWriter {
    fn hand_on(&mut self) -> std::io::Result<()> {
        let full = std::mem::replace(&mut self.chunk, self.pool.take());
        self.tx.send(full).map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the sender stopped"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(SEND_CHUNK_LEN - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() == SEND_CHUNK_LEN {
            self.hand_on()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() { Ok(()) } else { self.hand_on() }
    }
}

fn glob_set(globs: &[String], skipped: &mut Vec<String>) -> GlobSet {
    let mut set = GlobSetBuilder::new();
    for glob in globs {
        match GlobBuilder::new(glob).literal_separator(true).build() {
            Ok(g) => {
                set.add(g);
            }
            Err(e) => skipped.push(format!("{glob}: not a valid glob: {e}")),
        }
    }
    set.build().unwrap_or_else(|_| GlobSet::empty())
}

/// Appends the matching files and the agent's own; returns what was left out and why.
fn write_tar<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    request: &ArtifactRequest,
    workdir: &Path,
    agent_files: AgentFiles,
    redactor: &Redactor,
) -> Vec<String> {
    let mut skipped = Vec::new();
    let globs = glob_set(&request.globs, &mut skipped);
    let mut matched = Vec::new();
    if !globs.is_empty() {
        walk(workdir, workdir, 0, &globs, &mut matched, &mut skipped);
    }
    matched.sort_by(|a, b| a.0.cmp(&b.0));
    let mut total = 0u64;
    let mut buf = vec![0u8; IO_BYTES];
    for (relative, meta) in matched {
        let shown = relative.display().to_string();
        if !meta.is_file() {
            let kind = if meta.file_type().is_symlink() { "a symlink (not followed)" } else { "not a regular file" };
            skipped.push(format!("{shown}: {kind}"));
            continue;
        }
        if total.saturating_add(meta.len()) > request.max_bytes {
            skipped.push(format!("{shown}: over the {}-byte artifact cap", request.max_bytes));
            continue;
        }
        match append_file(tar, workdir, &relative, &meta, redactor, &mut buf) {
            Ok(stored) => total += stored,
            Err(reason) => skipped.push(format!("{shown}: {reason}")),
        }
    }
    for (name, bytes) in
        [("report.json", agent_files.report_json), ("agent.log", redactor.redact_all(&agent_files.agent_log))]
    {
        let _ = append_bytes(tar, &Path::new(AGENT_DIR).join(name), &bytes, 0o644);
    }
    skipped
}

/// Collects `(relative path, metadata)` of every entry whose path matches, without
/// following symlinks.
fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    globs: &GlobSet,
    out: &mut Vec<(PathBuf, std::fs::Metadata)>,
    skipped: &mut Vec<String>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let Ok(relative) = path.strip_prefix(root) else {
            continue;
        };
        let Some(text) = relative.to_str() else {
            skipped.push(format!("{}: the name is not UTF-8", relative.display()));
            continue;
        };
        // Whole components: `.agentlab` and everything below it, not `.agentlabX`.
        if relative.starts_with(AGENT_DIR) {
            continue;
        }
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                walk(root, &path, depth + 1, globs, out, skipped);
            }
        } else if globs.is_match(text) {
            out.push((relative.to_owned(), meta));
        }
    }
}

fn append_file<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    workdir: &Path,
    relative: &Path,
    meta: &std::fs::Metadata,
    redactor: &Redactor,
    buf: &mut [u8],
) -> Result<u64, String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(workdir.join(relative))
        .map_err(|e| e.to_string())?;
    let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    // Redaction changes the length, which the tar header needs first: one pass counts
    // (without copying), one sends. The job is over, so the file holds still between.
    let length = if redactor.is_empty() {
        meta.len()
    } else {
        let length = redactor.redacted_len(&file).map_err(|e| e.to_string())?;
        (&file).seek(std::io::SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        length
    };
    let mut header = regular_header(length, mode, mtime);
    // tar writes the header (and a long name's extra entry); the data goes straight to
    // the output in large pieces, where tar would copy it in 8 KiB ones.
    tar.append_data(&mut header, relative, std::io::empty()).map_err(|e| e.to_string())?;
    copy_data(tar.get_mut(), &file, length, redactor, buf).map_err(|e| e.to_string())?;
    Ok(length)
}

/// Writes exactly `length` bytes of the redacted file and the padding to the next
/// 512-byte block. A file that changed since it was measured is cut or zero-padded to
/// the length its header declares.
fn copy_data<W: std::io::Write>(
    out: &mut W,
    file: &std::fs::File,
    length: u64,
    redactor: &Redactor,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let mut sink = Exactly { out, left: length, failed: None };
    redactor.redact_from(file, &mut sink, buf)?;
    if let Some(e) = sink.failed.take() {
        return Err(e);
    }
    // What the file lost since it was counted, then the tar block's padding: zeros.
    let padding = (512 - length % 512) % 512;
    std::io::copy(&mut std::io::repeat(0).take(sink.left + padding), sink.out).map(drop)
}

/// A redaction output that writes up to `left` more bytes and drops the rest.
struct Exactly<'w, W> {
    out: &'w mut W,
    left: u64,
    failed: Option<std::io::Error>,
}

impl<W: std::io::Write> agentlab_redact::Output for Exactly<'_, W> {
    fn put(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if n == 0 || self.failed.is_some() {
            return;
        }
        match self.out.write_all(&bytes[..n]) {
            Ok(()) => self.left -= n as u64,
            Err(e) => self.failed = Some(e),
        }
    }

    fn is_full(&self) -> bool {
        self.left == 0 || self.failed.is_some()
    }
}

fn regular_header(size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

fn append_bytes<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let mut header = regular_header(bytes.len() as u64, mode, 0);
    tar.append_data(&mut header, path, bytes)
}

/// The commit the workdir's git repository has checked out, if it has one. Read from
/// `.git` without running git; anything but a hex object name is ignored.
pub fn git_commit(workdir: &Path) -> Option<String> {
    let git = workdir.join(".git");
    let read = |p: PathBuf| -> Option<String> {
        let mut text = String::new();
        std::fs::File::open(p).ok()?.take(4096).read_to_string(&mut text).ok()?;
        Some(text)
    };
    let is_object_name = |s: &str| matches!(s.len(), 40 | 64) && s.chars().all(|c| c.is_ascii_hexdigit());
    let head = read(git.join("HEAD"))?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref: ") else {
        return is_object_name(head).then(|| head.to_owned());
    };
    if reference.split('/').any(|c| c == ".." || c.is_empty()) {
        return None;
    }
    if let Some(sha) = read(git.join(reference)).map(|s| s.trim().to_owned()).filter(|s| is_object_name(s)) {
        return Some(sha);
    }
    let packed = read(git.join("packed-refs"))?;
    packed.lines().find_map(|line| {
        let (sha, name) = line.split_once(' ')?;
        (name == reference && is_object_name(sha)).then(|| sha.to_owned())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        tar::Archive::new(tar_bytes)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn globs_select_files_symlinks_are_skipped_and_the_cap_holds() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::create_dir_all(w.join("out/deep")).unwrap();
        std::fs::write(w.join("out/a.txt"), "a").unwrap();
        std::fs::write(w.join("out/deep/b.txt"), "bb").unwrap();
        std::fs::write(w.join("fix.patch"), "p").unwrap();
        std::fs::write(w.join("src.rs"), "not matched").unwrap();
        std::fs::create_dir(w.join("sub")).unwrap();
        std::fs::write(w.join("sub/nested.patch"), "`*` stays in its directory").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", w.join("out/passwd")).unwrap();
        std::fs::write(w.join("out/big.bin"), vec![0u8; 100]).unwrap();
        let request = ArtifactRequest { globs: vec!["out/**".into(), "*.patch".into(), "[".into()], max_bytes: 50 };
        let mut tar = tar::Builder::new(Vec::new());
        let files = AgentFiles { report_json: b"{}".to_vec(), agent_log: b"log".to_vec() };
        let skipped = write_tar(&mut tar, &request, w, files, &Redactor::new(Vec::<Vec<u8>>::new()));
        let bytes = tar.into_inner().unwrap();
        assert_eq!(
            names(&bytes),
            ["fix.patch", "out/a.txt", "out/deep/b.txt", ".agentlab/report.json", ".agentlab/agent.log"]
        );
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped[0].starts_with("[: not a valid glob"), "{skipped:?}");
        assert_eq!(skipped[1], "out/big.bin: over the 50-byte artifact cap");
        assert_eq!(skipped[2], "out/passwd: a symlink (not followed)");
    }

    #[test]
    fn with_secrets_set_file_contents_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("out.txt"), "key=sk-secret-999\n").unwrap();
        let request = ArtifactRequest { globs: vec!["*.txt".into()], max_bytes: 1 << 20 };
        let mut tar = tar::Builder::new(Vec::new());
        let files = AgentFiles { report_json: Vec::new(), agent_log: b"got sk-secret-999".to_vec() };
        let skipped = write_tar(&mut tar, &request, dir.path(), files, &Redactor::new(["sk-secret-999"]));
        assert!(skipped.is_empty());
        let bytes = tar.into_inner().unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut contents = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut text = String::new();
            entry.unwrap().read_to_string(&mut text).unwrap();
            contents.push(text);
        }
        assert_eq!(contents, ["key=[REDACTED]\n", "", "got [REDACTED]"]);
    }

    #[test]
    fn long_names_and_odd_lengths_round_trip_through_the_direct_copy() {
        let dir = tempfile::tempdir().unwrap();
        let long_dir = format!("out/{}", "d".repeat(120));
        std::fs::create_dir_all(dir.path().join(&long_dir)).unwrap();
        let long_name = format!("{long_dir}/file-with-a-name-past-the-100-byte-header-field.txt");
        let body: Vec<u8> = (0..700_001u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join(&long_name), &body).unwrap();
        std::fs::write(dir.path().join("out/secret.txt"), "a=sk-secret-999 b=sk-secret-999\n").unwrap();
        let request = ArtifactRequest { globs: vec!["out/**".into()], max_bytes: 1 << 30 };
        let mut tar = tar::Builder::new(Vec::new());
        let files = AgentFiles { report_json: b"{}".to_vec(), agent_log: Vec::new() };
        let skipped = write_tar(&mut tar, &request, dir.path(), files, &Redactor::new(["sk-secret-999"]));
        assert!(skipped.is_empty(), "{skipped:?}");
        let bytes = tar.into_inner().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut entries = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            entries.push((entry.path().unwrap().display().to_string(), content));
        }
        assert_eq!(entries.len(), 4, "{:?}", entries.iter().map(|e| &e.0).collect::<Vec<_>>());
        assert_eq!(entries[0], (long_name, body));
        assert_eq!(entries[1], ("out/secret.txt".to_owned(), b"a=[REDACTED] b=[REDACTED]\n".to_vec()));
    }

    #[test]
    fn a_file_that_changed_since_it_was_measured_is_cut_or_padded_to_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let none = Redactor::new(Vec::<Vec<u8>>::new());
        let mut buf = vec![0u8; 4];
        for (declared, expected) in [(4u64, b"0123".to_vec()), (13, b"0123456789\0\0\0".to_vec())] {
            let mut out = Vec::new();
            copy_data(&mut out, &std::fs::File::open(&path).unwrap(), declared, &none, &mut buf).unwrap();
            assert_eq!(out.len(), 512, "the data and its padding fill one block");
            assert_eq!(&out[..expected.len()], &expected[..]);
            assert!(out[expected.len()..].iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn the_commit_comes_from_head_a_ref_or_packed_refs() {
        let dir = tempfile::tempdir().unwrap();
        let git = dir.path().join(".git");
        assert_eq!(git_commit(dir.path()), None);
        std::fs::create_dir_all(git.join("refs/heads")).unwrap();
        let sha = "0123456789abcdef0123456789abcdef01234567";
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(git.join("packed-refs"), format!("# pack-refs\n{sha} refs/heads/main\n")).unwrap();
        assert_eq!(git_commit(dir.path()).as_deref(), Some(sha));
        std::fs::write(git.join("refs/heads/main"), format!("{}\n", sha.replace('0', "f"))).unwrap();
        assert_eq!(git_commit(dir.path()), Some(sha.replace('0', "f")));
        std::fs::write(git.join("HEAD"), "ref: ../../etc/passwd\n").unwrap();
        assert_eq!(git_commit(dir.path()), None);
        std::fs::write(git.join("HEAD"), format!("{sha}\n")).unwrap();
        assert_eq!(git_commit(dir.path()).as_deref(), Some(sha));
    }
}
