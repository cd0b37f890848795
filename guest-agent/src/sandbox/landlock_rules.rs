//! The job's Landlock ruleset: every file system right of the kernel's ABI is handled;
//! system paths are read-only, the workdir and the private tmp dir read-write.

use std::path::Path;

use agentlab_protocol::LandlockMode;
use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, RulesetStatus, Scope,
};

use super::{LaunchPolicy, SandboxError};

/// Read and execute, nothing else. Missing ones are skipped silently.
const SYSTEM_READ_EXEC: &[&str] =
    &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/proc", "/sys"];
/// Character devices the job may open for reading and writing.
const DEVICES: &[&str] =
    &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx", "/dev/pts"];

/// What Landlock enforces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub fs: bool,
    pub net: bool,
    pub scope: bool,
}

/// Restricts this process (and what it execs). `kernel_abi` is what the kernel reports.
pub fn apply(policy: &LaunchPolicy, kernel_abi: u32, notes: &mut Vec<String>) -> Result<Applied, SandboxError> {
    let mode = policy.spec.landlock;
    match mode {
        LandlockMode::Off => {
            notes.push("landlock: off by policy; file system access is governed by Unix permissions only".to_owned());
            return Ok(Applied::default());
        }
        LandlockMode::Required if kernel_abi == 0 => return Err(SandboxError::LandlockUnavailable { abi: 0 }),
        LandlockMode::BestEffort if kernel_abi == 0 => {
            notes.push(
                "landlock: this kernel has none (ABI 0); file system access is governed by Unix permissions only"
                    .to_owned(),
            );
            return Ok(Applied::default());
        }
        _ => {}
    }
    let abi = ABI::from(i32::try_from(kernel_abi).unwrap_or(i32::MAX));
    let mut local_notes = Vec::new();
    match restrict(policy, abi, kernel_abi, mode, &mut local_notes) {
        Ok(applied) => {
            notes.append(&mut local_notes);
            Ok(applied)
        }
        Err(e) if mode == LandlockMode::Required => Err(SandboxError::Landlock(e.to_string())),
        Err(e) => {
            notes.push(format!("landlock: not enforced: {e}"));
            Ok(Applied::default())
        }
    }
}

fn restrict(
    policy: &LaunchPolicy,
    abi: ABI,
    kernel_abi: u32,
    mode: LandlockMode,
    notes: &mut Vec<String>,
) -> Result<Applied, RulesetError> {
    let level = if mode == LandlockMode::Required { CompatLevel::HardRequirement } else { CompatLevel::BestEffort };
    let mut applied = Applied { fs: true, net: false, scope: false };
    let mut ruleset = Ruleset::default().set_compatibility(level).handle_access(AccessFs::from_all(abi))?;
    if policy.spec.network_off {
        if abi >= ABI::V4 {
            ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
            applied.net = true;
        } else {
            notes.push(format!(
                "network: Landlock ABI {kernel_abi} < 4, TCP is blocked by seccomp instead (socket(AF_INET/AF_INET6) fails with EPERM)"
            ));
        }
    }
    if abi >= ABI::V6 {
        ruleset = ruleset.scope(Scope::from_all(abi))?;
        applied.scope = true;
    } else {
        notes.push(format!(
            "signals and abstract Unix sockets: Landlock ABI {kernel_abi} < 6, not scoped (Unix permissions still apply)"
        ));
    }
    if abi < ABI::V3 {
        notes.push(format!(
            "file truncation: Landlock ABI {kernel_abi} < 3, truncate(2) outside the writable roots is governed by Unix permissions only"
        ));
    }
    if abi < ABI::V5 {
        notes.push(format!("device ioctls: Landlock ABI {kernel_abi} < 5, not restricted"));
    }

    let read_exec = AccessFs::from_read(abi);
    let read_write = AccessFs::from_all(abi);
    let mut device = AccessFs::ReadFile | AccessFs::WriteFile;
    if abi >= ABI::V5 {
        device |= AccessFs::IoctlDev;
    }
    let mut rules: Vec<(String, BitFlags<AccessFs>, bool)> = Vec::new();
    rules.extend(SYSTEM_READ_EXEC.iter().map(|p| ((*p).to_owned(), read_exec, false)));
    rules.extend(DEVICES.iter().map(|p| ((*p).to_owned(), device, false)));
    // The agent itself, so that `agentlab-agent status` and `selftest` work in the job.
    if let Ok(exe) = std::env::current_exe() {
        rules.push((exe.display().to_string(), read_exec, false));
    }
    if abi >= ABI::V9 {
        // Connecting to a named Unix socket is a right from ABI 9 on: keep the status socket reachable.
        rules.push((policy.status_socket.clone(), AccessFs::ResolveUnix.into(), false));
    }
    rules.push((policy.workdir.clone(), read_write, true));
    rules.push((policy.tmpdir.clone(), read_write, true));
    rules.extend(policy.spec.read_only_paths.iter().map(|p| (p.clone(), read_exec, true)));
    rules.extend(policy.spec.read_write_paths.iter().map(|p| (p.clone(), read_write, true)));
    if let Some(dir) = &policy.spec.secrets_dir {
        rules.push((dir.clone(), AccessFs::from_read(abi) & !AccessFs::Execute, true));
    }

    let mut created = ruleset.create()?;
    for (path, access, named) in rules {
        let fd = match PathFd::new(&path) {
            Ok(fd) => fd,
            Err(e) => {
                if named {
                    notes.push(format!("path {path}: not available ({e}); no rule added"));
                }
                continue;
            }
        };
        let access = if Path::new(&path).is_dir() { access } else { access & AccessFs::from_file(abi) };
        if access.is_empty() {
            continue;
        }
        created = created.add_rule(PathBeneath::new(fd, access))?;
    }
    let status = created.restrict_self()?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => {}
        RulesetStatus::PartiallyEnforced => {
            notes.push("landlock: only partially enforced by this kernel".to_owned());
        }
        RulesetStatus::NotEnforced => {
            notes.push("landlock: not enforced by this kernel".to_owned());
            applied = Applied::default();
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use agentlab_protocol::SandboxSpec;

    use super::*;

    fn policy(landlock: LandlockMode) -> LaunchPolicy {
        LaunchPolicy {
            spec: SandboxSpec { landlock, ..SandboxSpec::default() },
            uid: 1000,
            gid: 1000,
            workdir: "/workspace".into(),
            tmpdir: "/tmp/agentlab-job-x.1".into(),
            status_socket: "/run/agentlab/agent.sock".into(),
            env_secrets_dir: None,
        }
    }

    // Kernels without Landlock (ABI 0) never reach a Landlock syscall, so these run anywhere.
    #[test]
    fn required_mode_refuses_a_kernel_without_landlock() {
        let mut notes = Vec::new();
        let err = apply(&policy(LandlockMode::Required), 0, &mut notes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Landlock is required but this kernel cannot enforce it (ABI 0); use `landlock: best-effort` in the profile to run anyway"
        );
    }

    #[test]
    fn best_effort_and_off_note_what_is_missing() {
        let mut notes = Vec::new();
        assert_eq!(apply(&policy(LandlockMode::BestEffort), 0, &mut notes).unwrap(), Applied::default());
        assert_eq!(
            notes,
            ["landlock: this kernel has none (ABI 0); file system access is governed by Unix permissions only"]
        );
        let mut notes = Vec::new();
        assert_eq!(apply(&policy(LandlockMode::Off), 7, &mut notes).unwrap(), Applied::default());
        assert_eq!(notes, ["landlock: off by policy; file system access is governed by Unix permissions only"]);
    }
}
