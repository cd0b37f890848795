//! Runs (or, without `--apply`, describes) the steps: compares each file with what is on
//! disk, writes the ones that differ, and runs a command only when its check says the
//! node does not yet match. A second `--apply` therefore changes nothing.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::HostSetupError;
use super::plan::{CommandSpec, FileSpec, LiveCheck, Step, When};

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileState {
    UpToDate,
    Missing,
    Differs,
}

fn under_root(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HostSetupError {
    let path = path.display().to_string();
    move |source| HostSetupError::Io { context, path, source }
}

fn file_state(root: &Path, spec: &FileSpec) -> Result<FileState, HostSetupError> {
    let path = under_root(root, &spec.path);
    match std::fs::read(&path) {
        Ok(bytes) if bytes == spec.content.as_bytes() => {
            let mode = std::fs::metadata(&path).map_err(io_err("reading", &path))?.permissions().mode() & 0o7777;
            Ok(if mode == spec.mode { FileState::UpToDate } else { FileState::Differs })
        }
        Ok(_) => Ok(FileState::Differs),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileState::Missing),
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}

/// Writes through a temporary file and a rename, so a crash never leaves half a file.
fn write_file(root: &Path, spec: &FileSpec) -> Result<(), HostSetupError> {
    let path = under_root(root, &spec.path);
    let dir = path.parent().unwrap_or(root);
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let tmp = dir.join(format!(".{}.agentlab-tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    std::fs::write(&tmp, &spec.content).map_err(io_err("writing", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(spec.mode)).map_err(io_err("chmod", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("renaming into place", &path))
}

/// Whether the check holds on the running node, with a phrase for the report. Only
/// asked for with --root /: under another root the node's state is not read.
fn check(root: &Path, check: &LiveCheck) -> (bool, String) {
    match check {
        LiveCheck::PathExists(path) => {
            let ok = under_root(root, path).exists();
            (ok, format!("{path} {}", if ok { "exists" } else { "does not exist" }))
        }
        LiveCheck::FileIs(path, value) => {
            let actual = std::fs::read_to_string(under_root(root, path)).map(|s| s.trim().to_owned());
            match actual {
                Ok(actual) if actual == *value => (true, format!("{path} is {value}")),
                Ok(actual) => (false, format!("{path} is {actual}, not {value}")),
                Err(_) => (false, format!("{path} is unreadable")),
            }
        }
        LiveCheck::FileHasLine(path, line) => {
            let ok =
                std::fs::read_to_string(under_root(root, path)).is_ok_and(|t| t.lines().any(|l| l.trim() == *line));
            (ok, format!("{path} {} `{line}`", if ok { "has" } else { "lacks" }))
        }
        LiveCheck::Succeeds(argv) => {
            let ok = Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            (ok, format!("`{}` {}", argv.join(" "), if ok { "succeeds" } else { "fails" }))
        }
    }
}

/// Whether a command is needed, and why (or why not).
fn needed(root: &Path, spec: &CommandSpec, files_changed: bool) -> (bool, String) {
    let changed = "a file of this step changes".to_owned();
    match &spec.when {
        When::FilesChanged if files_changed => (true, changed),
        When::FilesChanged => (false, "no file of this step changes".into()),
        When::FilesChangedOrUnless(_) if files_changed => (true, changed),
        When::Unless(c) | When::FilesChangedOrUnless(c) => {
            let (holds, why) = check(root, c);
            (!holds, why)
        }
    }
}

fn run_command(spec: &CommandSpec) -> Result<(), HostSetupError> {
    let command = spec.argv.join(" ");
    let out = Command::new(&spec.argv[0])
        .args(&spec.argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HostSetupError::Spawn { command: command.clone(), source, fix: spec.fix.to_owned() })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        return Err(HostSetupError::Command { command, status: out.status.to_string(), stderr });
    }
    Ok(())
}

/// Goes through every step, printing one line per step and per file or command.
/// With `apply`, files are written under `root`; commands run only if `root` is `/`.
pub fn execute(steps: &[Step], root: &Path, apply: bool, out: &mut impl Write) -> Result<(), HostSetupError> {
    let live = root == Path::new("/");
    // Files created or rewritten, commands run, steps with nothing left to do (or, without
    // --apply, what would be).
    let (mut files_written, mut commands_run, mut steps_done) = (0usize, 0usize, 0usize);
    let mode = match (apply, live) {
        (false, _) => format!("plan for {} (nothing is changed; --apply makes the changes)", root.display()),
        (true, true) => "applying to this node".to_owned(),
        (true, false) => format!("applying files under {} (no commands are run under --root)", root.display()),
    };
    let _ = writeln!(out, "agentlab host setup: {mode}");
    for (i, step) in steps.iter().enumerate() {
        let mut lines = Vec::new();
        let mut files_changed = false;
        for spec in &step.files {
            if let Some(packaged) = spec.unless_present
                && under_root(root, packaged).exists()
            {
                lines.push(format!("    file {}: not needed ({packaged} is installed by the package)", spec.path));
                continue;
            }
            let state = file_state(root, spec)?;
            let verb = match (state, apply) {
                (FileState::UpToDate, _) => "up to date",
                (FileState::Missing, false) => "would create",
                (FileState::Differs, false) => "would update",
                (FileState::Missing, true) => "created",
                (FileState::Differs, true) => "updated",
            };
            if state != FileState::UpToDate {
                files_changed = true;
                if apply {
                    write_file(root, spec)?;
                }
                files_written += 1;
            }
            lines.push(format!("    file {}: {verb}", spec.path));
        }
        let mut commands_needed = false;
        for spec in &step.commands {
            let command = spec.argv.join(" ");
            if !live {
                // Under --root only the files are set up; the node's state is not ours to read.
                lines.push(format!("    run  {command}: skipped (--root is not /)"));
                continue;
            }
            let (need, why) = needed(root, spec, files_changed);
            let verb = match (need, apply) {
                (false, _) => "not needed",
                (true, false) => "would run",
                (true, true) => {
                    run_command(spec)?;
                    "ran"
                }
            };
            if need {
                commands_needed = true;
                commands_run += 1;
            }
            lines.push(format!("    run  {command}: {verb} ({why})"));
        }
        let done = !files_changed && !commands_needed;
        if done {
            steps_done += 1;
        }
        let status = match (done, apply) {
            (true, _) => "already done",
            (false, false) => "would change",
            (false, true) => "changed",
        };
        let _ = writeln!(out, "[{}/{}] {}: {status}", i + 1, steps.len(), step.title);
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
    }
    let summary = if files_written == 0 && commands_run == 0 {
        "nothing to do".to_owned()
    } else if apply {
        format!("{files_written} file(s) written, {commands_run} command(s) needed")
    } else {
        format!("{} of {} steps would change something; run again with --apply", steps.len() - steps_done, steps.len())
    };
    let _ = writeln!(out, "agentlab host setup: {summary}");
    Ok(())
}
