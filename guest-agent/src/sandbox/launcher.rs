//! `agentlab-agent sandbox-exec --report-fd N -- PROGRAM ARGS...`: a fresh,
//! single-threaded process between the agent and the job. In order: rlimits, drop to
//! the job user, `no_new_privs`, Landlock, seccomp, report, exec.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use agentlab_protocol::{Enforcement, Rlimits};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::unistd::{Gid, Uid, geteuid, getresgid, getresuid, setgroups, setresgid, setresuid};

use super::{LaunchPolicy, LauncherReport, POLICY_ENV, SandboxError, landlock_rules, seccomp};
use crate::sysinfo;

/// The launcher could not set the sandbox up.
const EXIT_SETUP_FAILED: u8 = 126;
/// The sandbox is up but the program could not be executed.
const EXIT_EXEC_FAILED: u8 = 127;

/// Runs the launcher; returns only on failure (success is an exec).
pub fn run(report_fd: i32, command: &[OsString]) -> ExitCode {
    if report_fd < 3 {
        eprintln!("agentlab-agent sandbox-exec: --report-fd must be 3 or above");
        return ExitCode::from(EXIT_SETUP_FAILED);
    }
    // SAFETY: fcntl on an integer descriptor touches no memory of ours; a bad fd is EBADF.
    let flagged = unsafe { libc::fcntl(report_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if flagged != 0 {
        eprintln!("agentlab-agent sandbox-exec: report fd {report_fd}: {}", std::io::Error::last_os_error());
        return ExitCode::from(EXIT_SETUP_FAILED);
    }
    // SAFETY: the descriptor is open (fcntl succeeded), above stdio, and the agent passed
    // it to this process for the report alone: nothing else here owns or closes it.
    let mut report = unsafe { std::fs::File::from_raw_fd(report_fd) };
    let Some((program, args)) = command.split_first() else {
        let _ = send(&mut report, &LauncherReport::Failed { reason: "no program to run".to_owned() });
        return ExitCode::from(EXIT_SETUP_FAILED);
    };

    let policy = match read_policy() {
        Ok(p) => p,
        Err(e) => return fail(&mut report, &e),
    };
    // Read while still root: the directory is root-only. The values live in zeroizing
    // buffers here and in the environment block that exec hands to the job.
    let env_secrets = match &policy.env_secrets_dir {
        Some(dir) => match crate::secrets::read_env_secrets(std::path::Path::new(dir)) {
            Ok(values) => values,
            Err(e) => return fail(&mut report, &SandboxError::Secrets(format!("{dir}: {e}"))),
        },
        None => Vec::new(),
    };
    let enforcement = match enforce(&policy) {
        Ok(e) => e,
        Err(e) => return fail(&mut report, &e),
    };
    if send(&mut report, &LauncherReport::Enforced(enforcement)).is_err() {
        // Nobody is listening for the job: do not run it.
        return ExitCode::from(EXIT_SETUP_FAILED);
    }
    let mut command = std::process::Command::new(program);
    for (name, value) in &env_secrets {
        command.env(name, std::ffi::OsStr::from_bytes(value));
    }
    let err = command
        .args(args)
        .env_remove(POLICY_ENV)
        .env("TMPDIR", &policy.tmpdir)
        .env("USER", &policy.spec.user)
        .env("LOGNAME", &policy.spec.user)
        .exec();
    let reason = format!("cannot start {:?}: {err}", program.to_string_lossy());
    eprintln!("agentlab-agent: {reason}");
    let _ = send(&mut report, &LauncherReport::ExecFailed { reason });
    ExitCode::from(EXIT_EXEC_FAILED)
}

fn fail(report: &mut std::fs::File, err: &SandboxError) -> ExitCode {
    eprintln!("agentlab-agent: {err}");
    let _ = send(report, &LauncherReport::Failed { reason: err.to_string() });
    ExitCode::from(EXIT_SETUP_FAILED)
}

fn send(report: &mut std::fs::File, msg: &LauncherReport) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    report.write_all(&line)
}

fn read_policy() -> Result<LaunchPolicy, SandboxError> {
    let text = std::env::var(POLICY_ENV).map_err(|e| SandboxError::Policy(format!("{POLICY_ENV}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| SandboxError::Policy(e.to_string()))
}

/// Puts this process in the sandbox and says what is enforced.
pub fn enforce(policy: &LaunchPolicy) -> Result<Enforcement, SandboxError> {
    let mut notes = Vec::new();
    let as_root = geteuid().is_root();
    set_rlimits(&policy.spec.rlimits, as_root, &mut notes)?;
    drop_privileges(policy, as_root)?;
    if policy.uid == 0 {
        notes.push("user: the job runs as root (uid 0)".to_owned());
    }
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    let no_new_privs = nix::sys::prctl::get_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    let landlock_abi = sysinfo::landlock_abi();
    let applied = landlock_rules::apply(policy, landlock_abi, &mut notes)?;
    seccomp::install(policy.spec.network_off).map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    Ok(Enforcement {
        landlock_abi,
        landlock_fs: applied.fs,
        landlock_net: applied.net,
        landlock_scope: applied.scope,
        seccomp: true,
        no_new_privs,
        user: policy.spec.user.clone(),
        uid: policy.uid,
        notes,
    })
}

fn set_rlimits(limits: &Rlimits, as_root: bool, notes: &mut Vec<String>) -> Result<(), SandboxError> {
    const MIB: u64 = 1024 * 1024;
    set_limit(Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE", limits.nofile, limits.nofile, as_root, notes)?;
    set_limit(Resource::RLIMIT_NPROC, "RLIMIT_NPROC", limits.nproc, limits.nproc, as_root, notes)?;
    if let Some(mb) = limits.fsize_mb {
        let bytes = mb.saturating_mul(MIB);
        set_limit(Resource::RLIMIT_FSIZE, "RLIMIT_FSIZE", bytes, bytes, as_root, notes)?;
    }
    if let Some(secs) = limits.cpu_seconds {
        // SIGXCPU at the soft limit, SIGKILL a little later.
        set_limit(Resource::RLIMIT_CPU, "RLIMIT_CPU", secs, secs.saturating_add(5), as_root, notes)?;
    }
    if !limits.core_dumps {
        set_limit(Resource::RLIMIT_CORE, "RLIMIT_CORE", 0, 0, as_root, notes)?;
    }
    Ok(())
}

fn set_limit(
    resource: Resource,
    name: &'static str,
    soft: u64,
    hard: u64,
    as_root: bool,
    notes: &mut Vec<String>,
) -> Result<(), SandboxError> {
    let (mut soft, mut hard) = (soft, hard);
    if !as_root {
        // Only root may raise a hard limit.
        let (_, current_hard) =
            getrlimit(resource).map_err(|source| SandboxError::Rlimit { resource: name, value: hard, source })?;
        if hard > current_hard {
            notes.push(format!("{name}: {hard} is above the agent's own hard limit {current_hard}; using that"));
            hard = current_hard;
            soft = soft.min(hard);
        }
    }
    setrlimit(resource, soft, hard).map_err(|source| SandboxError::Rlimit { resource: name, value: hard, source })
}

fn drop_privileges(policy: &LaunchPolicy, as_root: bool) -> Result<(), SandboxError> {
    let (uid, gid) = (Uid::from_raw(policy.uid), Gid::from_raw(policy.gid));
    let failed =
        |reason: String| SandboxError::DropPrivileges { user: policy.spec.user.clone(), uid: policy.uid, reason };
    if as_root {
        setgroups(&[gid]).map_err(|e| failed(format!("setgroups: {e}")))?;
        setresgid(gid, gid, gid).map_err(|e| failed(format!("setresgid: {e}")))?;
        setresuid(uid, uid, uid).map_err(|e| failed(format!("setresuid: {e}")))?;
    }
    let ruid = getresuid().map_err(|e| failed(format!("getresuid: {e}")))?;
    let rgid = getresgid().map_err(|e| failed(format!("getresgid: {e}")))?;
    if [ruid.real, ruid.effective, ruid.saved] != [uid; 3] {
        return Err(failed(format!(
            "running as uid {}/{}/{} (real/effective/saved) and cannot switch: the agent is not root",
            ruid.real, ruid.effective, ruid.saved
        )));
    }
    if as_root && [rgid.real, rgid.effective, rgid.saved] != [gid; 3] {
        return Err(failed(format!("the gid did not stick ({}/{}/{})", rgid.real, rgid.effective, rgid.saved)));
    }
    if policy.uid != 0 && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(failed("root could be regained after the switch".to_owned()));
    }
    Ok(())
}
