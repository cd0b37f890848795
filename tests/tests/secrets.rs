//! Secrets, with the real agent on this host against the real host session: one-time
//! delivery, the tmpfs (mode, owner, mount flags), environment and file secrets in the
//! job, redaction of every output byte, and the wipe at job end and on SIGTERM.
//! The microVM side is in `e2e.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::DuplexStream;

use agentlab_host::channel::{HostSession, SessionError};
use agentlab_protocol::{
    Capabilities, GIT_TOKEN_ENV, GuestConnection, GuestMessage, Hello, HostMessage, JobOutcome, JobResult, JobSpec,
    LandlockMode, SandboxSpec, SecretBundle, SecretBytes, SecretEntry, SecretKind,
};
use agentlab_tests::{SessionRecord, bin, require_root, run_agent_job_with_secrets, sh_job};

const API_KEY: &str = "sk-live-4c9f1e2a7b";
const FILE_SECRET: &str = "{\"token\": \"tok-file-98765\"}";
const GIT_TOKEN: &str = "ghp_abcdef123456";

fn bundle() -> SecretBundle {
    let entry = |kind, name: &str, value: &str| SecretEntry {
        kind,
        name: name.into(),
        value: SecretBytes::copy_from(value.as_bytes()),
    };
    SecretBundle {
        name: "default".into(),
        entries: vec![
            entry(SecretKind::Env, "API_KEY", API_KEY),
            entry(SecretKind::File, "settings.json", FILE_SECRET),
            entry(SecretKind::GitToken, GIT_TOKEN_ENV, GIT_TOKEN),
        ],
    }
}

struct Harness {
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The job user must be able to reach its workdir below this directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Harness { dir }
    }

    fn secrets_dir(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }

    /// A job as `nobody` under Landlock, allowed to read the secrets dir.
    fn spec(&self, cmd: &str) -> JobSpec {
        let sandbox = SandboxSpec {
            landlock: LandlockMode::Required,
            user: "nobody".into(),
            secrets_dir: Some(self.secrets_dir().display().to_string()),
            network_off: true,
            ..SandboxSpec::default()
        };
        JobSpec {
            env: vec![("S".into(), self.secrets_dir().display().to_string())],
            ..sh_job("job-secrets", &self.dir.path().join("work"), cmd, sandbox)
        }
    }

    /// No tmpfs is left on the secrets dir, nothing is in it, and no file anywhere under
    /// the test's directory holds a secret value.
    fn assert_wiped(&self) {
        let secrets = self.secrets_dir();
        let parent_dev = std::fs::metadata(self.dir.path()).unwrap().dev();
        assert_eq!(std::fs::metadata(&secrets).unwrap().dev(), parent_dev, "the tmpfs is still mounted");
        assert_eq!(std::fs::read_dir(&secrets).unwrap().count(), 0, "something is left in the secrets dir");
        let mut pending = vec![self.dir.path().to_path_buf()];
        while let Some(path) = pending.pop() {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            } else if meta.is_file() {
                assert_no_secret(&std::fs::read(&path).unwrap(), &path.display().to_string());
            }
        }
    }
}

#[track_caller]
fn assert_no_secret(bytes: &[u8], what: &str) {
    for secret in [API_KEY, FILE_SECRET, GIT_TOKEN, "tok-file-98765"] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret:?} found in {what}");
    }
}

#[tokio::test]
async fn secrets_reach_the_job_through_a_private_tmpfs_and_never_leave_in_its_output() {
    require_root();
    let h = Harness::new();
    let status_cmd = format!(
        "{} status --json --socket {}",
        bin("agentlab-agent").display(),
        h.dir.path().join("status.sock").display()
    );
    let cmd = format!(
        r#"echo "env=$API_KEY"
printf %s "$API_KEY" | base64
echo "git=$GIT_TOKEN"
cat "$S/settings.json"; echo
ls -A "$S"
cat "$S/.env/API_KEY" 2>/dev/null || echo "env file: unreadable"
stat -c '%a %U:%G' "$S" "$S/settings.json"
awk -v dir="$S" '$5 == dir {{ for (i = 7; $i != "-"; i++); print $6, $(i+2), $(i+3) }}' /proc/self/mountinfo
echo "$API_KEY" > leak.txt
{status_cmd} > status.json"#
    );
    let (result, seen, status) = run_agent_job_with_secrets(h.dir.path(), h.spec(&cmd), bundle(), None).await;
    let result: JobResult = result.unwrap();
    assert!(status.success(), "agent exited with {status}");
    assert_eq!(result.outcome, JobOutcome::Exited { code: 0 }, "{}", String::from_utf8_lossy(&seen.stderr));
    let stdout = String::from_utf8(seen.stdout.clone()).unwrap();
    let mount = {
        let noswap = if agentlab_tests::host_kernel_at_least(6, 4) { ",noswap" } else { "" };
        format!("rw,nosuid,nodev,noexec,relatime agentlab-secrets rw,size=1024k,nr_inodes=256,mode=700{noswap}")
    };
    assert_eq!(
        stdout,
        format!(
            "env=[REDACTED]\n[REDACTED]\ngit=[REDACTED]\n[REDACTED]\n.env\nsettings.json\nenv file: unreadable\n750 root:nogroup\n440 root:nogroup\n{mount}\n"
        )
    );
    assert_no_secret(&seen.stdout, "stdout");
    assert_no_secret(&seen.stderr, "stderr");
    assert_eq!(seen.secrets_delivered, [vec!["env API_KEY", "file settings.json", "git-token GIT_TOKEN"]]);
    assert!(seen.secrets_refused.is_empty());

    // What `agentlab-agent status` showed the job: names and the tmpfs, never values.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.dir.path().join("work/status.json")).unwrap()).unwrap();
    let secrets = &status["secrets"];
    assert_eq!(secrets["state"], "mounted");
    assert_eq!(secrets["dir"], h.secrets_dir().display().to_string());
    assert_eq!(secrets["names"], serde_json::json!(["env API_KEY", "file settings.json", "git-token GIT_TOKEN"]));
    assert_eq!(secrets["noswap"], agentlab_tests::host_kernel_at_least(6, 4));

    // The job wrote the value it was given into its workdir: that is the job's business,
    // and is the one place it may be. Everything else is clean.
    let leak = h.dir.path().join("work/leak.txt");
    assert_eq!(std::fs::read_to_string(&leak).unwrap(), format!("{API_KEY}\n"));
    std::fs::remove_file(leak).unwrap();
    h.assert_wiped();
}

#[tokio::test]
async fn without_read_permission_the_job_gets_env_secrets_but_cannot_open_the_directory() {
    require_root();
    let h = Harness::new();
    let mut spec = h.spec(r#"echo "env=$API_KEY"; ls "$S" 2>&1 | sed 's/^.*: //'"#);
    spec.sandbox.secrets_dir = None;
    let (result, seen, _) = run_agent_job_with_secrets(h.dir.path(), spec, bundle(), None).await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Exited { code: 0 });
    assert_eq!(String::from_utf8(seen.stdout).unwrap(), "env=[REDACTED]\nPermission denied\n");
    h.assert_wiped();
}

fn fake_hello(capabilities: Capabilities, agent_version: &str) -> Hello {
    Hello {
        min_version: agentlab_protocol::MIN_PROTOCOL_VERSION,
        max_version: agentlab_protocol::PROTOCOL_VERSION,
        capabilities,
        agent_version: agent_version.to_owned(),
        kernel_release: "fake".into(),
        landlock_abi: 0,
    }
}

/// What the host side of [`fake_session`] ends with.
type HostRun = tokio::task::JoinHandle<(Result<JobResult, SessionError>, SessionRecord)>;

/// A host session on `sandbox_id` for a `true` job with [`bundle`], and the fake guest at
/// its other end, past the handshake with `hello`.
async fn fake_session(sandbox_id: &'static str, hello: Hello) -> (HostRun, GuestConnection<DuplexStream>) {
    let (host_io, guest_io) = tokio::io::duplex(1 << 20);
    let host = tokio::spawn(async move {
        let mut seen = SessionRecord::default();
        let spec = Harness::new().spec("true");
        let result = HostSession::new(host_io).run(sandbox_id, spec, bundle(), None, &mut seen).await;
        (result, seen)
    });
    let mut guest = GuestConnection::new(guest_io);
    agentlab_protocol::guest_handshake(&mut guest, hello).await.unwrap();
    (host, guest)
}

/// A fake agent asks twice: the second request is refused, recorded, and the session
/// goes on to the job's result.
#[tokio::test]
async fn secrets_are_delivered_once_and_a_second_request_is_refused() {
    let (host, mut guest) = fake_session("sb-once", fake_hello(Capabilities::ALL, "fake")).await;
    assert!(matches!(guest.recv().await.unwrap(), Some(HostMessage::Job(_))));
    guest.send(GuestMessage::RequestSecrets).await.unwrap();
    let Some(HostMessage::Secrets(got)) = guest.recv().await.unwrap() else { panic!("no secrets") };
    assert_eq!(got, bundle());
    guest.send(GuestMessage::RequestSecrets).await.unwrap();
    let refusal = "sandbox sb-once already received its secrets; a sandbox gets them once, right after its job";
    assert_eq!(guest.recv().await.unwrap(), Some(HostMessage::SecretsRefused { reason: refusal.into() }));
    guest.send(GuestMessage::JobStarted { pid: 7 }).await.unwrap();
    // Asking again while the job runs is refused the same way.
    guest.send(GuestMessage::RequestSecrets).await.unwrap();
    assert_eq!(guest.recv().await.unwrap(), Some(HostMessage::SecretsRefused { reason: refusal.into() }));
    let finished = JobResult {
        outcome: JobOutcome::Exited { code: 0 },
        duration_ms: 1,
        output_bytes: 0,
        enforcement: Default::default(),
    };
    guest.send(GuestMessage::JobFinished(finished.clone())).await.unwrap();
    let (result, seen) = host.await.unwrap();
    assert_eq!(result.unwrap(), finished);
    assert_eq!(seen.secrets_delivered, [vec!["env API_KEY", "file settings.json", "git-token GIT_TOKEN"]]);
    assert_eq!(seen.secrets_refused, [refusal, refusal]);
}

/// An agent without the secrets capability bit (an image built before it) cannot run a
/// job that has secrets: the session ends with the fix instead of running it without them.
#[tokio::test]
async fn an_agent_without_the_secrets_capability_cannot_run_a_job_that_has_secrets() {
    let before_secrets = Capabilities(Capabilities::WORKDIR_UPLOAD.0 | Capabilities::OUTPUT_ACK.0);
    let (host, _guest) = fake_session("sb-old", fake_hello(before_secrets, "0.0.9")).await;
    let err = host.await.unwrap().0.unwrap_err();
    assert!(matches!(err, SessionError::SecretsUnsupported { .. }));
    assert_eq!(
        err.to_string(),
        "the guest agent (0.0.9) cannot receive secrets and this job has some: rebuild the guest image with a current agent (make image)"
    );
}

#[tokio::test]
async fn sigterm_kills_the_job_and_wipes_the_secrets() {
    require_root();
    let h = Harness::new();
    let (mut agent, stream) = agentlab_tests::spawn_agent(h.dir.path()).await;
    let spec = h.spec("echo $$ > job.pid; exec sleep 60");
    let session = tokio::spawn(async move {
        let mut seen = SessionRecord::default();
        HostSession::new(stream).run("sb-term", spec, bundle(), None, &mut seen).await
    });

    // Wait until the job runs with its secrets in place.
    let pid_file = h.dir.path().join("work/job.pid");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&pid_file).map_or(true, |p| !p.ends_with('\n')) {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job_pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert_ne!(
        std::fs::metadata(h.secrets_dir()).unwrap().dev(),
        std::fs::metadata(h.dir.path()).unwrap().dev(),
        "the secrets tmpfs is mounted while the job runs"
    );
    assert!(h.secrets_dir().join("settings.json").is_file());

    let agent_pid = agent.id().unwrap();
    let job_tmpdir = PathBuf::from(format!("/tmp/agentlab-job-job-secrets.{agent_pid}"));
    assert!(job_tmpdir.is_dir(), "the job's private tmp dir exists while it runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent_pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(1), "the agent reports the stop as a failure");
    let err = session.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "the guest agent disconnected while the job was running");
    // The job is gone (its group was killed) and so are the secrets.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{job_pid}")).exists() {
        assert!(Instant::now() < deadline, "job {job_pid} survived the agent's SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_file(&pid_file).unwrap();
    h.assert_wiped();
    assert!(!job_tmpdir.exists(), "the job's tmp dir outlived the agent's SIGTERM");
}

/// The CLI against a real agentlabd: values in through stdin, never out.
#[test]
fn the_secrets_cli_takes_values_from_stdin_and_never_prints_them() {
    let d = agentlab_tests::Daemon::start();
    let value = "v@lue-123456";
    let out =
        d.cli_with_stdin(&["secrets", "set", "--bundle", "ci", "--env", "TOKEN"], format!("{value}\n").as_bytes());
    assert!(out.status.success(), "{}", agentlab_tests::describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("env        TOKEN                                  12  [redacted]\n"), "{text}");
    assert!(!text.contains(value));

    let out = d.cli_with_stdin(&["secrets", "set", "--bundle", "ci", "--env", "EMPTY"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "agentlab: no value for EMPTY on stdin: pipe it in, e.g. `printf %s \"$VALUE\" | agentlab secrets set --env EMPTY`\n"
    );
    let out = d.cli_with_stdin(&["secrets", "set", "--bundle", "ci", "--env", "PIN"], b"1234");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "agentlab: warning: PIN is 4 bytes; values under 6 bytes are too short to redact from job output safely\n"
    );
    let out = d.cli_with_stdin(&["secrets", "set", "--bundle", "ci", "--env", "LD_PRELOAD"], b"/tmp/x.so");
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "agentlab: secret name \"LD_PRELOAD\" is not a valid env name: PATH, HOME, LANG, USER, LOGNAME, TMPDIR, SHELL, IFS, BASH_ENV, ENV, LD_* and AGENTLAB_* are reserved\n"
    );

    let shown: serde_json::Value = serde_json::from_slice(&d.cli(&["--json", "secrets", "show", "ci"]).stdout).unwrap();
    assert_eq!(
        shown["entries"],
        serde_json::json!([{"kind": "env", "name": "PIN", "bytes": 4}, {"kind": "env", "name": "TOKEN", "bytes": 12}])
    );
    let secrets = d.state.path().join("secrets");
    for (path, mode) in
        [(secrets.clone(), 0o700), (secrets.join("identity.txt"), 0o600), (secrets.join("bundles/ci.age"), 0o600)]
    {
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, mode, "{}", path.display());
    }

    let out = d.cli(&["secrets", "rm", "--bundle", "ci"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "agentlab: say what to remove: --env NAME, --git-token, --file NAME, or --all for the bundle\n"
    );
    assert!(d.cli(&["secrets", "rm", "--bundle", "ci", "--env", "PIN"]).status.success());
    assert_eq!(String::from_utf8(d.cli(&["secrets", "rm", "--bundle", "ci", "--all"]).stdout).unwrap(), "removed\n");
    let out = d.cli(&["secrets", "show", "ci"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "agentlab: no secrets bundle named \"ci\"; create it with `agentlab secrets set --bundle ci --env NAME`\n"
    );
    assert!(!d.log().contains(value), "the daemon logged a value");
}
