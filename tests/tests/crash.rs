//! `kill -9` of agentlabd at eleven distinct points of a job's life, through its crash
//! points (`AGENTLAB_CRASH_AT`), each followed by a restart on the same state and the
//! exact end state: a job that had started is taken back and completes with its whole
//! output, each line once, and its artifacts; one that had not is failed with the
//! reason; a result that came in is never lost; and no VM process is left either way.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentlab_tests::{Daemon, describe};
use serde_json::Value;

const LINES: u32 = 25;

/// Prints numbered lines, a little apart, then leaves an artifact.
fn command() -> String {
    format!("for i in $(seq 1 {LINES}); do echo line-$i; sleep 0.05; done; mkdir -p out; echo artifact > out/a.txt")
}

fn expected_output() -> String {
    (1..=LINES).map(|i| format!("line-{i}\n")).collect()
}

/// Runs the job on a daemon that kills itself at `point`, restarts, and waits for the end.
fn crash_at(point: &str, submit: &[&str]) -> (Daemon, Value) {
    let mut d = Daemon::start_with_env(&[], &[("AGENTLAB_CRASH_AT", point)]);
    let cmd = command();
    let mut args = vec!["--json", "job", "submit", "--cmd", cmd.as_str()];
    args.extend_from_slice(submit);
    // At `submitted` the daemon dies before it answers: the job is found afterwards.
    let out = d.cli(&args);
    let status = d.wait_for_crash_and_restart(Duration::from_secs(120));
    assert_eq!(status.signal(), Some(9), "agentlabd was to kill itself at {point}");
    let job_id = if out.status.success() {
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["job_id"].as_str().unwrap().to_owned()
    } else {
        assert_eq!(point, "submitted", "{}", describe(&out));
        let jobs: Value = serde_json::from_slice(&d.cli(&["--json", "job", "list"]).stdout).unwrap();
        assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
        jobs[0]["id"].as_str().unwrap().to_owned()
    };
    let job = d.wait_for_job_end(&job_id);
    (d, job)
}

/// The sandbox is DESTROYED and no process or directory of its VM is left.
fn assert_nothing_left(d: &Daemon, job: &Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sandbox: Value =
            serde_json::from_slice(&d.cli(&["--json", "sandbox", "show", job["sandbox_id"].as_str().unwrap()]).stdout)
                .unwrap();
        if sandbox["state"] == "DESTROYED" && d.processes_using_state().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left: {sandbox:#} {:?}", d.processes_using_state());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.live_sandbox_dirs(), Vec::<PathBuf>::new());
}

fn logs(d: &Daemon, job: &Value) -> String {
    let out = d.cli(&["logs", job["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn artifact_paths(d: &Daemon, job: &Value) -> Vec<String> {
    let out = d.cli(&["--json", "job", "artifacts", job["id"].as_str().unwrap()]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array().unwrap().iter().map(|a| a["path"].as_str().unwrap().to_owned()).collect()
}

/// A job that had not started is failed with the reason, and its VM (if any) is gone.
fn assert_failed_before_start(point: &str, reason: &str) {
    let (d, job) = crash_at(point, &[]);
    assert_eq!(job["state"], "FAILED", "{job:#}");
    let error = job["error"].as_str().unwrap().to_owned();
    let sandbox = job["sandbox_id"].as_str().unwrap();
    assert_eq!(error, reason.replace("{sandbox}", sandbox));
    assert_nothing_left(&d, &job);
}

/// A job that had started comes back and completes with all it printed and left.
fn assert_taken_back(point: &str) {
    let (d, job) = crash_at(point, &[]);
    assert_eq!(job["state"], "COMPLETED", "{job:#}\n{}", d.log());
    assert_eq!(job["exit_code"], 0);
    assert_eq!(logs(&d, &job), expected_output());
    assert_eq!(artifact_paths(&d, &job), [".agentlab/agent.log", ".agentlab/report.json", "out/a.txt"]);
    let kinds: Vec<&str> = job["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"job.resuming"), "{kinds:?}");
    assert_nothing_left(&d, &job);
}

#[test]
fn crash_after_submission() {
    assert_failed_before_start("submitted", "agentlabd stopped before this job started; submit it again");
}

#[test]
fn crash_after_provisioning() {
    assert_failed_before_start(
        "provisioned",
        "agentlabd stopped while sandbox {sandbox} was being prepared (PROVISIONING); submit the job again",
    );
}

#[test]
fn crash_during_boot() {
    assert_failed_before_start(
        "booting",
        "agentlabd stopped while sandbox {sandbox} was being prepared (BOOTING); submit the job again",
    );
}

#[test]
fn crash_after_the_handshake() {
    assert_failed_before_start(
        "handshake",
        "agentlabd stopped while sandbox {sandbox} was being prepared (READY); submit the job again",
    );
}

#[test]
fn crash_as_the_job_starts() {
    assert_taken_back("job-started");
}

#[test]
fn crash_mid_stream() {
    assert_taken_back("mid-stream");
}

#[test]
fn crash_once_the_result_came_in() {
    assert_taken_back("result-received");
}

#[test]
fn crash_mid_artifact() {
    assert_taken_back("mid-artifact");
}

#[test]
fn crash_once_the_artifacts_are_stored() {
    assert_taken_back("artifacts-stored");
}

/// The result is stored before the sandbox goes: a crash in the teardown keeps it, and
/// the restart destroys the VM.
#[test]
fn crash_once_the_result_is_stored() {
    let (d, job) = crash_at("result-stored", &[]);
    assert_eq!(job["state"], "COMPLETED", "{job:#}");
    assert_eq!(logs(&d, &job), expected_output());
    assert_eq!(artifact_paths(&d, &job), [".agentlab/agent.log", ".agentlab/report.json", "out/a.txt"]);
    assert_nothing_left(&d, &job);
}

/// A sandbox kept after its job does not outlive a restart: it is destroyed, the job's
/// result stays.
#[test]
fn crash_with_a_kept_sandbox() {
    let (d, job) = crash_at("kept", &["--keepalive"]);
    assert_eq!(job["state"], "COMPLETED", "{job:#}");
    assert_eq!(logs(&d, &job), expected_output());
    assert_nothing_left(&d, &job);
}
