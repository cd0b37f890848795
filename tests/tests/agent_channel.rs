//! The real agent binary, run on the host with `--unix`, against the real host session
//! code: job execution, streaming with acknowledgements, timeouts, uploads and status.
//! Fast, and no VM involved; the microVM tests in `e2e.rs` cover the guest side.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentlab_host::channel::SessionError;
use agentlab_protocol::{CHUNK_WINDOW, JobOutcome, JobResult, JobSpec, LandlockMode, MAX_CHUNK_LEN, SandboxSpec};
use agentlab_tests::{SessionRecord, bin, current_user, run_agent_job, sh_job};

struct Harness {
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Harness { dir: tempfile::tempdir().unwrap() }
    }

    fn workdir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    fn status_socket(&self) -> PathBuf {
        self.dir.path().join("status.sock")
    }

    fn spec(&self, cmd: &str) -> JobSpec {
        // These tests are about the channel: the job runs as whoever runs the tests,
        // without Landlock (inner_sandbox.rs covers the sandbox).
        let sandbox = SandboxSpec {
            landlock: LandlockMode::Off,
            user: current_user(),
            network_off: false,
            ..SandboxSpec::default()
        };
        JobSpec {
            env: vec![("GREETING".into(), "hello from env".into())],
            ..sh_job("job-test", &self.workdir(), cmd, sandbox)
        }
    }

    async fn run(&self, spec: JobSpec, upload: Option<&Path>) -> (Result<JobResult, SessionError>, SessionRecord) {
        let (result, seen, status) = run_agent_job(self.dir.path(), spec, upload).await;
        if result.is_ok() {
            assert!(status.success(), "agent exited with {status}");
        }
        (result, seen)
    }
}

#[tokio::test]
async fn stdout_stderr_env_and_exit_code_zero() {
    let h = Harness::new();
    let (result, seen) = h.run(h.spec("echo out; echo err >&2; echo \"$GREETING\"; pwd"), None).await;
    let result = result.unwrap();
    assert_eq!(result.outcome, JobOutcome::Exited { code: 0 });
    let expected = format!("out\nhello from env\n{}\n", h.workdir().display());
    assert_eq!(String::from_utf8(seen.stdout).unwrap(), expected);
    assert_eq!(seen.stderr, b"err\n");
    assert_eq!(result.output_bytes, (expected.len() + 4) as u64);
    let hello = seen.hello.unwrap();
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.kernel_release, agentlab_tests::host_kernel());
    assert!(seen.pid.is_some());
    // Even without Landlock the job went through the launcher: seccomp and no_new_privs.
    let e = &result.enforcement;
    assert!(e.seccomp && e.no_new_privs && !e.landlock_fs && !e.landlock_net && !e.landlock_scope, "{e:?}");
    assert_eq!(e.landlock_abi, 7);
    assert_eq!(e.user, current_user());
    assert!(e.notes.iter().any(|n| n.starts_with("landlock: off by policy")), "{:?}", e.notes);
}

#[tokio::test]
async fn nonzero_exit_code_and_signal_are_reported() {
    let h = Harness::new();
    let (result, _) = h.run(h.spec("exit 3"), None).await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Exited { code: 3 });
    let (result, _) = h.run(h.spec("kill -SEGV $$"), None).await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Signaled { signal: 11 });
}

#[tokio::test]
async fn timeout_sends_sigterm_then_sigkill_to_the_whole_group() {
    let h = Harness::new();
    let mut spec = h.spec("sleep 30");
    spec.timeout_ms = 500;
    let started = Instant::now();
    let (result, _) = h.run(spec, None).await;
    let result = result.unwrap();
    assert_eq!(result.outcome, JobOutcome::TimedOut { signal: 15 });
    assert!((500..5000).contains(&result.duration_ms), "{}", result.duration_ms);

    // A job that ignores SIGTERM (and whose child inherits that) is killed after the grace.
    let mut spec = h.spec("trap '' TERM; sleep 30; echo survived");
    spec.timeout_ms = 400;
    let (result, seen) = h.run(spec, None).await;
    let result = result.unwrap();
    assert_eq!(result.outcome, JobOutcome::TimedOut { signal: 9 });
    assert!(result.duration_ms >= 400 + 300, "{}", result.duration_ms);
    assert!(seen.stdout.is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn background_children_do_not_hold_the_job_open() {
    let h = Harness::new();
    let started = Instant::now();
    let (result, seen) = h.run(h.spec("sleep 30 & echo done"), None).await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Exited { code: 0 });
    assert_eq!(seen.stdout, b"done\n");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn large_output_arrives_complete_and_in_order_through_the_window() {
    let h = Harness::new();
    let (result, seen) = h.run(h.spec("seq 1 1000000"), None).await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Exited { code: 0 });
    let expected: String = (1..=1_000_000).map(|n| format!("{n}\n")).collect();
    assert_eq!(seen.stdout.len(), expected.len());
    assert!(seen.stdout == expected.as_bytes());
    // ~6.9 MB is more than the 64 × 64 KiB window: the agent had to wait for acks.
    assert!(expected.len() > (CHUNK_WINDOW as usize) * MAX_CHUNK_LEN);
    assert!(seen.chunks > CHUNK_WINDOW, "{} chunks", seen.chunks);
}

#[tokio::test]
async fn workdir_upload_is_unpacked_before_the_job_runs() {
    let h = Harness::new();
    let src = h.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("hello.txt"), "hello\n").unwrap();
    std::fs::write(src.join("sub/big.bin"), vec![7u8; 300_000]).unwrap();
    let tarball = h.dir.path().join("repo.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
    builder.append_dir_all(".", &src).unwrap();
    builder.into_inner().unwrap();
    let mut spec = h.spec("cat hello.txt; wc -c < sub/big.bin");
    spec.workdir_upload_bytes = Some(std::fs::metadata(&tarball).unwrap().len());
    let (result, seen) = h.run(spec, Some(&tarball)).await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Exited { code: 0 });
    assert_eq!(String::from_utf8(seen.stdout).unwrap(), "hello\n300000\n");
}

#[tokio::test]
async fn a_program_that_cannot_start_is_reported_as_such() {
    let h = Harness::new();
    let mut spec = h.spec("");
    spec.program = "/nonexistent/tool".into();
    spec.args.clear();
    let (result, _) = h.run(spec, None).await;
    match result.unwrap().outcome {
        JobOutcome::SpawnFailed { reason } => {
            assert!(reason.starts_with("cannot start \"/nonexistent/tool\": "), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn status_reports_the_channel_and_the_running_job() {
    let h = Harness::new();
    let cmd = format!("{} status --json --socket {}", bin("agentlab-agent").display(), h.status_socket().display());
    let (result, seen) = h.run(h.spec(&cmd), None).await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Exited { code: 0 });
    let status: serde_json::Value = serde_json::from_slice(&seen.stdout).unwrap();
    assert_eq!(status["agent_running"], true);
    assert_eq!(status["channel"]["up"], true);
    assert_eq!(status["channel"]["protocol_version"], 1);
    assert_eq!(status["channel"]["sandbox_id"], "sb-test");
    assert_eq!(status["job"]["id"], "job-test");
    assert_eq!(status["job"]["phase"], "running");
    assert_eq!(status["job"]["pid"], seen.pid.unwrap());
    assert_eq!(status["landlock_abi"], 7, "this build machine's kernel has Landlock ABI 7");
}
