//! Pushes the job's artifacts: the workdir files that match the host's globs, the
//! agent's own log and a `report.json`, as one tar stream in acknowledged chunks with
//! its SHA-256. The job is over (its process group killed) before this runs, so the
//! files hold still. Symlinks are never followed, and nothing but regular files goes in.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use agentlab_protocol::{
    ArtifactRequest, ArtifactSummary, CHUNK_WINDOW, GuestConnection, GuestMessage, HostMessage, MAX_CHUNK_LEN,
    MessageKind, ProtocolError, encode_message,
};
use agentlab_redact::{RedactReader, Redactor};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_util::io::SyncIoBridge;

use crate::session::Stream;

/// Where the agent's own files go in the stream.
pub const AGENT_DIR: &str = ".agentlab";
/// Deepest directory walked.
const MAX_DEPTH: usize = 64;
/// Bytes buffered between the tar builder and the channel.
const PIPE_BYTES: usize = 1024 * 1024;
/// Read and write sizes around the tar builder (which copies in 8 KiB pieces).
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
    let (writer, mut reader) = tokio::io::duplex(PIPE_BYTES);
    let (request_, workdir_, redactor_) = (request.clone(), workdir.to_owned(), redactor.clone());
    // The builder's thread hashes what it writes, so hashing overlaps the sending.
    let builder = tokio::task::spawn_blocking(move || {
        // tar copies in 8 KiB pieces; each write to the bridge is a hand-off to the
        // runtime, so they are gathered into large ones first.
        let bridge = std::io::BufWriter::with_capacity(IO_BYTES, SyncIoBridge::new(writer));
        let mut tar = tar::Builder::new(Hashing { inner: bridge, hasher: Sha256::new() });
        let skipped = write_tar(&mut tar, &request_, &workdir_, agent_files, &redactor_);
        match tar.into_inner() {
            Ok(mut hashing) => {
                let flushed = std::io::Write::flush(&mut hashing.inner);
                (skipped, flushed.map(|()| hashing.hasher.finalize().into()))
            }
            Err(e) => (skipped, Err(e)),
        }
    });

    let (mut sent, mut acked, mut bytes) = (0u64, 0u64, 0u64);
    let mut eof = false;
    while !eof || acked < sent {
        if !eof && sent - acked < CHUNK_WINDOW {
            let mut data = Vec::with_capacity(MAX_CHUNK_LEN);
            let n = reader.read_buf(&mut data).await.map_err(|e| ProtocolError::io("reading the artifact tar", e))?;
            if n == 0 {
                eof = true;
                continue;
            }
            bytes += n as u64;
            // Encoded once and written as it is (artifacts are redacted already).
            let frame = encode_message(&GuestMessage::ArtifactChunk { seq: sent, data })?;
            conn.send_frame(&frame).await?;
            sent += 1;
            continue;
        }
        match conn.recv_required("artifact acknowledgements").await? {
            HostMessage::ArtifactAck { seq } => acked = acked.max(seq.saturating_add(1)).min(sent),
            other => return Err(ProtocolError::Unexpected { expected: "ArtifactAck", got: other.kind().to_owned() }),
        }
    }
    let (mut skipped, finished) =
        builder.await.map_err(|e| ProtocolError::io("building the artifact tar", std::io::Error::other(e)))?;
    // An unfinished archive gets no hash: the host refuses it, with the reason recorded.
    let sha256 = finished.unwrap_or_else(|e| {
        skipped.push(format!("(archive): not finished: {e}"));
        [0; 32]
    });
    let summary = ArtifactSummary { bytes, sha256, skipped };
    conn.send(GuestMessage::ArtifactsDone(summary.clone())).await?;
    Ok(summary)
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
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
        match append_file(tar, workdir, &relative, &meta, redactor) {
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
        if text == AGENT_DIR || text.starts_with(".agentlab/") {
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
    if redactor.is_empty() {
        let mut header = regular_header(meta.len(), mode, mtime);
        let reader = std::io::BufReader::with_capacity(IO_BYTES, file.take(meta.len()));
        tar.append_data(&mut header, relative, reader).map_err(|e| e.to_string())?;
        return Ok(meta.len());
    }
    // Redaction changes the length, which the tar header needs first: one pass to
    // measure, one to send. The job is over, so the file holds still in between.
    let length = redactor.redacted_len(&file).map_err(|e| e.to_string())?;
    (&file).seek(std::io::SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut header = regular_header(length, mode, mtime);
    tar.append_data(&mut header, relative, RedactReader::new(file, redactor).take(length))
        .map_err(|e| e.to_string())?;
    Ok(length)
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
