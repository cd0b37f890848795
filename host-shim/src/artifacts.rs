//! Unpacks a guest's artifact tar into the job's artifact directory. The tar comes from
//! a hostile guest: only regular files and directories with plain relative paths are
//! kept; `..`, absolute paths, links, devices and everything else are rejected, each
//! with the reason. Parents are created here and never through anything the guest
//! made, so no entry can land outside the directory. Contents pass the host's own
//! redaction before they are written, and each stored file gets its SHA-256.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use agentlab_redact::{RedactReader, Redactor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest artifact path kept, and deepest.
const MAX_PATH_BYTES: usize = 1024;
const MAX_DEPTH: usize = 32;
/// Most entries read from one stream.
const MAX_ENTRIES: usize = 100_000;

/// One stored artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactView {
    /// Relative to the job's artifact directory.
    pub path: String,
    pub bytes: u64,
    /// Hex SHA-256 of the stored bytes.
    pub sha256: String,
}

/// What came of one stream.
#[derive(Debug, Default)]
pub struct Unpacked {
    pub stored: Vec<ArtifactView>,
    /// `path: reason`, for every entry that was not kept.
    pub rejected: Vec<String>,
}

/// Reads the tar at `tar_path` into `dest` (created, must not exist yet). Errors are
/// only for the host's own I/O; bad entries are rejections.
pub fn unpack(tar_path: &Path, dest: &Path, max_bytes: u64, redactor: &Redactor) -> std::io::Result<Unpacked> {
    std::fs::DirBuilder::new().mode(0o755).create(dest)?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(std::fs::File::open(tar_path)?));
    let mut out = Unpacked::default();
    let mut total = 0u64;
    let entries = match archive.entries() {
        Ok(entries) => entries,
        Err(e) => {
            out.rejected.push(format!("(archive): unreadable: {e}"));
            return Ok(out);
        }
    };
    for (index, entry) in entries.enumerate() {
        if index == MAX_ENTRIES {
            out.rejected.push(format!("(archive): more than {MAX_ENTRIES} entries; the rest is ignored"));
            break;
        }
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                out.rejected.push(format!("(archive): corrupt after {index} entries: {e}"));
                break;
            }
        };
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let shown = crate::channel::sanitize_guest_text(&raw);
        let relative = match checked_path(&raw) {
            Ok(p) => p,
            Err(reason) => {
                out.rejected.push(format!("{shown}: {reason}"));
                continue;
            }
        };
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dest.join(&relative)) {
                    out.rejected.push(format!("{shown}: {e}"));
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().unwrap_or(u64::MAX);
                if total.saturating_add(size) > max_bytes {
                    out.rejected.push(format!("{shown}: over the {max_bytes}-byte artifact cap"));
                    continue;
                }
                match store_file(&mut entry, dest, &relative, size, redactor) {
                    Ok((bytes, sha256)) => {
                        total += size;
                        out.stored.push(ArtifactView { path: relative.display().to_string(), bytes, sha256 });
                    }
                    Err(reason) => out.rejected.push(format!("{shown}: {reason}")),
                }
            }
            other => out.rejected.push(format!("{shown}: {} entries are not accepted", kind_name(other))),
        }
    }
    Ok(out)
}

fn kind_name(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "fifo",
        _ => "special",
    }
}

/// A plain relative path of normal components, or why not.
fn checked_path(raw: &str) -> Result<PathBuf, &'static str> {
    if raw.is_empty() || raw.len() > MAX_PATH_BYTES {
        return Err("the path is empty or too long");
    }
    if raw.chars().any(char::is_control) {
        return Err("the path has control characters");
    }
    let mut clean = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("the path climbs out with `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute paths are not accepted"),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err("the path names no file");
    }
    if clean.components().count() > MAX_DEPTH {
        return Err("the path is nested too deep");
    }
    Ok(clean)
}

/// Writes one file (never over an existing one, never through a link); returns its
/// size and SHA-256 as stored.
fn store_file(
    entry: &mut impl Read,
    dest: &Path,
    relative: &Path,
    size: u64,
    redactor: &Redactor,
) -> Result<(u64, String), String> {
    let target = dest.join(relative);
    if let Some(parent) = target.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(|e| e.to_string())?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&target)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                "a second entry with this path".to_owned()
            } else {
                e.to_string()
            }
        })?;
    let mut hasher = Sha256::new();
    let mut content = RedactReader::new(entry.take(size), redactor);
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        let n = content.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        written += n as u64;
    }
    file.sync_all().map_err(|e| e.to_string())?;
    Ok((written, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A raw tar header with any path and type, as a hostile guest would write it.
    fn raw_entry(out: &mut Vec<u8>, path: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
        let mut header = tar::Header::new_old();
        {
            let bytes = header.as_old_mut();
            bytes.name[..path.len()].copy_from_slice(path.as_bytes());
            bytes.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    #[test]
    fn escapes_links_and_devices_are_rejected_and_good_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = Vec::new();
        raw_entry(&mut tar, "out/ok.txt", tar::EntryType::Regular, "", b"fine\n");
        raw_entry(&mut tar, "../escape.txt", tar::EntryType::Regular, "", b"x");
        raw_entry(&mut tar, "out/../../escape2.txt", tar::EntryType::Regular, "", b"x");
        raw_entry(&mut tar, "/etc/abs.txt", tar::EntryType::Regular, "", b"x");
        raw_entry(&mut tar, "out/link", tar::EntryType::Symlink, "/etc/passwd", b"");
        raw_entry(&mut tar, "out/hard", tar::EntryType::Link, "/etc/shadow", b"");
        raw_entry(&mut tar, "out/dev", tar::EntryType::Char, "", b"");
        raw_entry(&mut tar, "out/ok.txt", tar::EntryType::Regular, "", b"again");
        raw_entry(&mut tar, "./out/sub/b.bin", tar::EntryType::Regular, "", &[1, 2, 3]);
        tar.extend_from_slice(&[0u8; 1024]);
        let tar_path = dir.path().join("a.tar");
        std::fs::write(&tar_path, &tar).unwrap();
        let dest = dir.path().join("artifacts");
        let got = unpack(&tar_path, &dest, 1 << 20, &Redactor::new(Vec::<Vec<u8>>::new())).unwrap();
        assert_eq!(
            got.stored,
            vec![
                ArtifactView { path: "out/ok.txt".into(), bytes: 5, sha256: hex::encode(Sha256::digest(b"fine\n")) },
                ArtifactView { path: "out/sub/b.bin".into(), bytes: 3, sha256: hex::encode(Sha256::digest([1, 2, 3])) },
            ]
        );
        assert_eq!(
            got.rejected,
            [
                "../escape.txt: the path climbs out with `..`",
                "out/../../escape2.txt: the path climbs out with `..`",
                "/etc/abs.txt: absolute paths are not accepted",
                "out/link: symlink entries are not accepted",
                "out/hard: hard link entries are not accepted",
                "out/dev: character device entries are not accepted",
                "out/ok.txt: a second entry with this path",
            ]
        );
        assert!(!dir.path().join("escape.txt").exists() && !dir.path().parent().unwrap().join("escape2.txt").exists());
        assert_eq!(std::fs::read(dest.join("out/ok.txt")).unwrap(), b"fine\n");
        assert!(std::fs::symlink_metadata(dest.join("out/link")).is_err());
    }

    #[test]
    fn the_cap_holds_and_secrets_are_redacted_on_the_host_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = Vec::new();
        raw_entry(&mut tar, "a.txt", tar::EntryType::Regular, "", b"token=sk-host-pass-42\n");
        raw_entry(&mut tar, "b.txt", tar::EntryType::Regular, "", &[b'x'; 100]);
        tar.extend_from_slice(&[0u8; 1024]);
        let tar_path = dir.path().join("a.tar");
        std::fs::write(&tar_path, &tar).unwrap();
        let dest = dir.path().join("artifacts");
        let got = unpack(&tar_path, &dest, 50, &Redactor::new(["sk-host-pass-42"])).unwrap();
        assert_eq!(got.stored.len(), 1);
        assert_eq!(std::fs::read(dest.join("a.txt")).unwrap(), b"token=[REDACTED]\n");
        assert_eq!(got.stored[0].bytes, 17);
        assert_eq!(got.rejected, ["b.txt: over the 50-byte artifact cap"]);
    }
}
