//! The agent's half of the sandbox, done as root before the launcher starts: resolve
//! the job user, hand the workdir to it, make the job's private tmp dir.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use agentlab_protocol::JobSpec;

use super::passwd::{self, PASSWD};
use super::{LaunchPolicy, SandboxError};

/// Directories the agent never hands to the job user, whatever the workdir says.
const NEVER_CHOWN: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin", "/sys", "/tmp",
    "/usr", "/var",
];

/// Resolves the user and prepares the job's directories; returns the launcher's policy.
pub fn prepare(
    spec: &JobSpec,
    tmpdir: &Path,
    status_socket: &Path,
    env_secrets_dir: Option<&Path>,
) -> Result<LaunchPolicy, SandboxError> {
    let user = passwd::lookup(Path::new(PASSWD), &spec.sandbox.user)?;
    let as_root = nix::unistd::geteuid().is_root();
    let workdir = Path::new(&spec.workdir);
    if as_root && user.uid != 0 {
        let canonical =
            workdir.canonicalize().map_err(|source| SandboxError::Chown { path: spec.workdir.clone(), source })?;
        if NEVER_CHOWN.iter().any(|d| canonical == Path::new(d)) {
            return Err(SandboxError::Chown {
                path: spec.workdir.clone(),
                source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "a system directory is no workdir"),
            });
        }
        chown_tree(&canonical, user.uid, user.gid)?;
    }
    make_tmpdir(tmpdir, as_root.then_some((user.uid, user.gid)))
        .map_err(|source| SandboxError::Tmpdir { path: tmpdir.display().to_string(), source })?;
    Ok(LaunchPolicy {
        spec: spec.sandbox.clone(),
        uid: user.uid,
        gid: user.gid,
        workdir: spec.workdir.clone(),
        tmpdir: tmpdir.display().to_string(),
        status_socket: status_socket.display().to_string(),
        env_secrets_dir: env_secrets_dir.map(|d| d.display().to_string()),
    })
}

/// `/tmp/agentlab-job-<id>.<agent pid>`, with anything but `[A-Za-z0-9_-]` in the id
/// replaced. The pid keeps agents that share a `/tmp` (tests on a host) apart.
pub fn tmpdir_for(job_id: &str, agent_pid: u32) -> PathBuf {
    let safe: String =
        job_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    PathBuf::from(format!("/tmp/agentlab-job-{safe}.{agent_pid}"))
}

/// Removes the job's tmp dir after the job; failures only leave litter.
pub fn remove_tmpdir(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
}

fn make_tmpdir(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    // A leftover (or something planted) is removed, never followed.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path)?,
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::DirBuilder::new().mode(0o700).create(path)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Gives the workdir tree to the job user without following symlinks. Files with more
/// than one link are left alone: an uploaded hard link may point at a system file.
fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let fail = |path: &Path, source| SandboxError::Chown { path: path.display().to_string(), source };
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| fail(&path, e))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| fail(&path, e))? {
                pending.push(entry.map_err(|e| fail(&path, e))?.path());
            }
        } else if meta.nlink() > 1 {
            tracing::warn!("not handing {} to the job user: it has {} hard links", path.display(), meta.nlink());
            continue;
        }
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| fail(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpdir_names_are_tame() {
        assert_eq!(tmpdir_for("job-01ab_C", 7), Path::new("/tmp/agentlab-job-job-01ab_C.7"));
        assert_eq!(tmpdir_for("../../etc", 7), Path::new("/tmp/agentlab-job-______etc.7"));
    }
}
