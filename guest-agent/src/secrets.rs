//! The job's secrets in the guest: a private tmpfs (0700, nosuid, nodev, noexec, and
//! noswap where the kernel has it), one file per secret, wiped (overwritten, unlinked,
//! unmounted) at job end, on SIGTERM, and when this guard is dropped.
//!
//! Layout: file secrets at the top (`<dir>/settings.json`), readable by the job's group
//! only if its profile allows; environment secrets (and the git token) under
//! `<dir>/.env/NAME`, root-only, read by the sandbox launcher just before it execs the
//! job, so the agent never copies them into an environment block of its own.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use agentlab_protocol::{SecretBundle, SecretKind};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::{Deserialize, Serialize};

use crate::sysinfo;

/// Subdirectory holding environment secrets, for the launcher only.
const ENV_SUBDIR: &str = ".env";
/// Size of the tmpfs: a full bundle (512 KiB) plus room for inodes.
const TMPFS_SIZE: &str = "1m";

/// Why the secrets could not be put in place. Nothing is ever written outside the
/// tmpfs: if it cannot be mounted, the job does not start.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SecretsError {
    /// the host sent an invalid secrets bundle: {0}
    Invalid(agentlab_protocol::SecretError),
    /// cannot create the secrets mount point {path}: {source}
    MountPoint { path: String, source: std::io::Error },
    /// cannot mount the secrets tmpfs on {path}: {source} (the agent must run as root to keep secrets off the disk)
    Mount { path: String, source: nix::Error },
    /// {path} is not a fresh tmpfs after mounting it; refusing to write secrets there
    NotTmpfs { path: String },
    /// cannot write secret {name} into the tmpfs: {source}
    Write { name: String, source: std::io::Error },
}

/// What `agentlab-agent status` shows: names and state, never values.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretsStatus {
    /// Where the tmpfs is (or would be) mounted.
    pub dir: String,
    /// `none` (the job has no secrets), `mounted`, `wiped`, or `failed: …`.
    pub state: String,
    /// Mount options in force, e.g. `mode=0700,nosuid,nodev,noexec`.
    pub options: String,
    /// Whether the tmpfs is kept out of swap (`noswap`, Linux ≥ 6.4).
    pub noswap: bool,
    /// `kind name` per secret.
    pub names: Vec<String>,
}

/// Whether this kernel's tmpfs takes `noswap` (added in Linux 6.4).
fn kernel_has_tmpfs_noswap(release: &str) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 4)
}

/// A mounted secrets tmpfs and the files written into it.
pub struct SecretsDir {
    dir: PathBuf,
    written: Vec<(PathBuf, usize)>,
    mounted: bool,
    pub status: SecretsStatus,
}

impl SecretsDir {
    /// Mounts the tmpfs on `dir` and writes `bundle` into it. `readable_by` is the job's
    /// gid when its profile lets it read file secrets.
    pub fn install(dir: &Path, bundle: &SecretBundle, readable_by: Option<u32>) -> Result<SecretsDir, SecretsError> {
        bundle.validate().map_err(SecretsError::Invalid)?;
        let mut names: Vec<String> = bundle.entries.iter().map(|e| format!("{} {}", e.kind.as_str(), e.name)).collect();
        names.sort();
        let noswap = kernel_has_tmpfs_noswap(&sysinfo::kernel_release());
        let mut secrets = SecretsDir {
            dir: dir.to_owned(),
            written: Vec::new(),
            mounted: false,
            status: SecretsStatus {
                dir: dir.display().to_string(),
                state: "failed".into(),
                noswap,
                names,
                ..Default::default()
            },
        };
        let options = secrets.mount(noswap)?;
        secrets.status.options = options;
        secrets.write_all(bundle, readable_by)?;
        secrets.status.state = "mounted".into();
        Ok(secrets)
    }

    /// The directory of environment secrets, for the launcher.
    pub fn env_dir(&self) -> PathBuf {
        self.dir.join(ENV_SUBDIR)
    }

    fn mount(&mut self, noswap: bool) -> Result<String, SecretsError> {
        let path = self.dir.display().to_string();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| SecretsError::MountPoint { path: path.clone(), source })?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let base = format!("mode=0700,uid=0,gid=0,size={TMPFS_SIZE},nr_inodes=256");
        let data = if noswap { format!("{base},noswap") } else { base };
        mount(Some("agentlab-secrets"), &self.dir, Some("tmpfs"), flags, Some(data.as_str()))
            .map_err(|source| SecretsError::Mount { path: path.clone(), source })?;
        self.mounted = true;
        if !is_empty_tmpfs(&self.dir) {
            return Err(SecretsError::NotTmpfs { path });
        }
        Ok(format!("{data},nosuid,nodev,noexec"))
    }

    fn write_all(&mut self, bundle: &SecretBundle, readable_by: Option<u32>) -> Result<(), SecretsError> {
        let env_dir = self.env_dir();
        let fail = |name: &str| {
            let name = name.to_owned();
            move |source| SecretsError::Write { name, source }
        };
        std::fs::DirBuilder::new().mode(0o700).create(&env_dir).map_err(fail(ENV_SUBDIR))?;
        if let Some(gid) = readable_by {
            // The job's group may list and read the file secrets; .env stays root's.
            std::os::unix::fs::chown(&self.dir, Some(0), Some(gid)).map_err(fail("the secrets dir"))?;
            std::fs::set_permissions(&self.dir, std::os::unix::fs::PermissionsExt::from_mode(0o750))
                .map_err(fail("the secrets dir"))?;
        }
        for entry in &bundle.entries {
            let (path, mode, group) = match entry.kind {
                SecretKind::File => (self.dir.join(&entry.name), 0o440, readable_by),
                SecretKind::Env | SecretKind::GitToken => (env_dir.join(&entry.name), 0o400, None),
            };
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(fail(&entry.name))?;
            self.written.push((path.clone(), entry.value.len()));
            file.write_all(entry.value.expose()).map_err(fail(&entry.name))?;
            if let Some(gid) = group {
                std::os::unix::fs::fchown(&file, Some(0), Some(gid)).map_err(fail(&entry.name))?;
            }
        }
        Ok(())
    }

    /// Overwrites every secret with zeros, unlinks it and unmounts the tmpfs. Safe to
    /// call more than once.
    pub fn wipe(&mut self) {
        for (path, len) in self.written.drain(..) {
            if let Ok(mut file) = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(&path) {
                let _ = file.write_all(&vec![0u8; len]);
                let _ = file.sync_all();
            }
            let _ = std::fs::remove_file(&path);
        }
        if self.mounted {
            let _ = std::fs::remove_dir(self.env_dir());
            // A job that escaped the kill may still hold a file open: detach anyway.
            if umount2(&self.dir, MntFlags::empty()).is_err() {
                let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
            }
            self.mounted = false;
            self.status.state = "wiped".into();
        }
    }
}

impl Drop for SecretsDir {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// Status for a job without secrets.
pub fn none_status(dir: &Path) -> SecretsStatus {
    SecretsStatus { dir: dir.display().to_string(), state: "none".into(), ..Default::default() }
}

/// True if `dir` is the root of a tmpfs with nothing in it.
fn is_empty_tmpfs(dir: &Path) -> bool {
    let on_tmpfs = nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    on_tmpfs && std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

/// Reads the environment secrets the agent left for the launcher: names checked,
/// sizes bounded, values kept in zeroizing buffers.
pub fn read_env_secrets(dir: &Path) -> std::io::Result<Vec<(String, zeroize::Zeroizing<Vec<u8>>)>> {
    use std::io::Read;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if SecretKind::Env.validate_name(&name).is_err() || out.len() == agentlab_protocol::MAX_SECRET_ENTRIES {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected secret {name:?}")));
        }
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(entry.path())?;
        let len = file.metadata()?.len();
        let cap = agentlab_protocol::MAX_SECRET_VALUE as u64;
        if len > cap {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("secret {name} is too large")));
        }
        let mut value = zeroize::Zeroizing::new(Vec::with_capacity(usize::try_from(len).unwrap_or(0)));
        file.take(cap).read_to_end(&mut value)?;
        out.push((name, value));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noswap_needs_linux_6_4() {
        assert!(!kernel_has_tmpfs_noswap("6.1.0-56-amd64"));
        assert!(!kernel_has_tmpfs_noswap("5.15.0"));
        assert!(kernel_has_tmpfs_noswap("6.4.0"));
        assert!(kernel_has_tmpfs_noswap("6.18.44-fc-v657"));
        assert!(kernel_has_tmpfs_noswap("7.0"));
        assert!(!kernel_has_tmpfs_noswap("unknown"));
    }
}
