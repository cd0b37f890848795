//! The job's inner sandbox, on this host: the real agent binary with `--unix` against
//! the real host session code, running jobs as `nobody` (uid 65534). This host's kernel
//! has Landlock ABI 7, so every layer is in force: Landlock file system, network and
//! scope rules, the seccomp filter, `no_new_privs`, rlimits and the user switch.
//! `agentlab-agent selftest --json`, run as the job, reports what was refused and how.
//! The agent must run as root to switch users: as anyone else these tests fail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agentlab_host::channel::SessionError;
use agentlab_protocol::{Enforcement, JobOutcome, JobResult, JobSpec, LandlockMode, Rlimits, SandboxSpec};
use agentlab_tests::{SessionRecord, bin, require_root, run_agent_job, sh_job};
use serde_json::Value;

const NOBODY: u32 = 65534;

struct Harness {
    dir: tempfile::TempDir,
    job_id: String,
}

impl Harness {
    fn new(job_id: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The job user must be able to reach its workdir below this directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Harness { dir, job_id: job_id.to_owned() }
    }

    fn workdir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// A directory Unix permissions let anyone write (mode 1777) outside the job's roots.
    fn world_writable(&self) -> PathBuf {
        let dir = self.dir.path().join("outside");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        dir
    }

    /// A secrets directory Unix permissions let anyone read.
    fn secrets(&self) -> PathBuf {
        let dir = self.dir.path().join("secrets");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "s3cret\n").unwrap();
        std::fs::set_permissions(dir.join("token"), std::fs::Permissions::from_mode(0o644)).unwrap();
        dir
    }

    fn spec(&self, cmd: &str) -> JobSpec {
        let sandbox = SandboxSpec {
            landlock: LandlockMode::Required,
            user: "nobody".into(),
            network_off: true,
            ..SandboxSpec::default()
        };
        sh_job(&self.job_id, &self.workdir(), cmd, sandbox)
    }

    async fn run(&self, spec: JobSpec, upload: Option<&Path>) -> (Result<JobResult, SessionError>, SessionRecord) {
        let (result, seen, status) = run_agent_job(self.dir.path(), spec, upload).await;
        assert!(status.success(), "agent exited with {status}");
        (result, seen)
    }

    /// Runs `agentlab-agent selftest --json` as the job; returns its checks and the result.
    async fn selftest(&self, mut spec: JobSpec, outside: &Path, secrets: &Path) -> (Value, JobResult) {
        let cmd = format!(
            "{} selftest --json --outside {} --secrets-dir {}",
            bin("agentlab-agent").display(),
            outside.display(),
            secrets.display()
        );
        spec.args = vec!["-c".into(), cmd];
        let (result, seen) = self.run(spec, None).await;
        let result = result.unwrap();
        assert_eq!(result.outcome, JobOutcome::Exited { code: 0 }, "{}", String::from_utf8_lossy(&seen.stderr));
        (serde_json::from_slice(&seen.stdout).unwrap(), result)
    }
}

#[track_caller]
fn assert_check(checks: &Value, name: &str, outcome: &str, errno: Option<&str>) {
    let check = &checks[name];
    assert_eq!(check["outcome"], outcome, "{name}: {check}");
    assert_eq!(check["errno"].as_str(), errno, "{name}: {check}");
}

#[tokio::test]
async fn every_hostile_action_is_blocked_and_the_enforcement_is_reported() {
    require_root();
    let h = Harness::new("job-hostile");
    let (outside, secrets) = (h.world_writable(), h.secrets());
    // Something listens, so a refusal can only come from the sandbox.
    let _listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (checks, result) = h.selftest(h.spec(""), &outside, &secrets).await;

    assert_check(&checks, "whoami", "uid=65534(nobody)", None);
    assert_check(&checks, "write-workdir", "allowed", None);
    assert_check(&checks, "write-tmpdir", "allowed", None);
    // Mode 1777 lets nobody write there; Landlock does not.
    assert_check(&checks, "write-outside-roots", "blocked (EACCES)", Some("EACCES"));
    // Mode 0755/0644 lets nobody read it; Landlock does not.
    assert_check(&checks, "read-secrets-dir", "blocked (EACCES)", Some("EACCES"));
    // seccomp refuses the socket before the kernel looks at the family.
    assert_check(&checks, "vsock-connect-host", "blocked (EPERM)", Some("EPERM"));
    assert_check(&checks, "ptrace-attach", "blocked (EPERM)", Some("EPERM"));
    assert_check(&checks, "signal-agent", "blocked (EPERM)", Some("EPERM"));
    // Network off: socket(AF_INET) is refused by seccomp (Landlock would refuse connect with EACCES).
    assert_check(&checks, "tcp-connect", "blocked (EPERM)", Some("EPERM"));
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    assert_eq!(
        result.enforcement,
        Enforcement {
            landlock_abi: 7,
            landlock_fs: true,
            landlock_net: true,
            landlock_scope: true,
            seccomp: true,
            no_new_privs: true,
            user: "nobody".into(),
            uid: NOBODY,
            notes: Vec::new(),
        }
    );
}

/// As root, Unix permissions allow everything: what is refused is refused by Landlock
/// (file system, signal scope) and seccomp alone.
#[tokio::test]
async fn landlock_scope_and_seccomp_hold_even_for_a_root_job() {
    require_root();
    let h = Harness::new("job-root");
    let (outside, secrets) = (h.world_writable(), h.secrets());
    let mut spec = h.spec("");
    spec.sandbox.user = "root".into();
    let (checks, result) = h.selftest(spec, &outside, &secrets).await;
    assert_check(&checks, "whoami", "uid=0(root)", None);
    assert_check(&checks, "write-outside-roots", "blocked (EACCES)", Some("EACCES"));
    assert_check(&checks, "read-secrets-dir", "blocked (EACCES)", Some("EACCES"));
    assert_check(&checks, "signal-agent", "blocked (EPERM)", Some("EPERM"));
    assert_check(&checks, "ptrace-attach", "blocked (EPERM)", Some("EPERM"));
    assert_check(&checks, "vsock-connect-host", "blocked (EPERM)", Some("EPERM"));
    assert_eq!(result.enforcement.uid, 0);
    assert_eq!(result.enforcement.notes, vec!["user: the job runs as root (uid 0)".to_owned()]);
}

#[tokio::test]
async fn the_secrets_dir_is_readable_only_when_the_policy_names_it_and_network_on_lets_tcp_through() {
    require_root();
    let h = Harness::new("job-secrets");
    let (outside, secrets) = (h.world_writable(), h.secrets());
    let _listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut spec = h.spec("");
    spec.sandbox.secrets_dir = Some(secrets.display().to_string());
    spec.sandbox.network_off = false;
    let (checks, result) = h.selftest(spec, &outside, &secrets).await;
    assert_check(&checks, "read-secrets-dir", "allowed", None);
    assert_check(&checks, "write-outside-roots", "blocked (EACCES)", Some("EACCES"));
    let tcp = checks["tcp-connect"]["outcome"].as_str().unwrap();
    assert!(tcp == "allowed" || tcp == "allowed (ECONNREFUSED)", "{}", checks["tcp-connect"]);
    assert_check(&checks, "vsock-connect-host", "blocked (EPERM)", Some("EPERM"));
    assert!(!result.enforcement.landlock_net && result.enforcement.landlock_fs);

    // Reading is all: the secrets dir is not writable.
    let cat = format!("cat {0}/token; echo x > {0}/token", secrets.display());
    let mut spec = h.spec(&cat);
    spec.sandbox.secrets_dir = Some(secrets.display().to_string());
    let (result, seen) = h.run(spec, None).await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Exited { code: 2 });
    assert_eq!(seen.stdout, b"s3cret\n");
    assert!(String::from_utf8_lossy(&seen.stderr).contains("Permission denied"), "{:?}", seen.stderr);
}

#[tokio::test]
async fn required_landlock_runs_and_rlimits_apply() {
    require_root();
    let h = Harness::new("job-rlimits");
    let mut spec = h.spec("ulimit -n; ulimit -c; ulimit -t; head -c 2000000 /dev/zero > big; echo $?; stat -c %s big");
    spec.sandbox.rlimits =
        Rlimits { nofile: 123, nproc: 500, fsize_mb: Some(1), cpu_seconds: Some(60), core_dumps: false };
    let (result, seen) = h.run(spec, None).await;
    let result = result.unwrap();
    assert_eq!(result.outcome, JobOutcome::Exited { code: 0 }, "{}", String::from_utf8_lossy(&seen.stderr));
    // head dies of SIGXFSZ (128 + 25) at the 1 MiB RLIMIT_FSIZE.
    assert_eq!(String::from_utf8(seen.stdout).unwrap(), "123\n0\n60\n153\n1048576\n");
    assert!(result.enforcement.landlock_fs);
}

#[tokio::test]
async fn the_workdir_is_the_job_users_and_tmp_is_private() {
    require_root();
    let h = Harness::new("job-workdir");
    let src = h.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/uploaded.txt"), "v1\n").unwrap();
    let tarball = h.dir.path().join("repo.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
    builder.append_dir_all(".", &src).unwrap();
    builder.into_inner().unwrap();
    let cmd = "echo v2 >> sub/uploaded.txt && echo made > made-by-job && mkdir -p new/dir && touch new/dir/f \
               && echo \"$TMPDIR\" && touch \"$TMPDIR/t\" && stat -c %a \"$TMPDIR\" && id -u && echo \"$HOME\"";
    let mut spec = h.spec(cmd);
    spec.workdir_upload_bytes = Some(std::fs::metadata(&tarball).unwrap().len());
    let (result, seen) = h.run(spec, Some(&tarball)).await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Exited { code: 0 }, "{}", String::from_utf8_lossy(&seen.stderr));
    let out = String::from_utf8(seen.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let tmpdir = lines[0];
    assert!(tmpdir.starts_with("/tmp/agentlab-job-job-workdir."), "{out}");
    assert_eq!(&lines[1..], ["700", "65534", h.workdir().display().to_string().as_str()]);
    // The tmp dir goes with the job.
    assert!(!Path::new(tmpdir).exists());

    let work = h.workdir();
    assert_eq!(std::fs::read_to_string(work.join("sub/uploaded.txt")).unwrap(), "v1\nv2\n");
    for path in [work.clone(), work.join("sub/uploaded.txt"), work.join("made-by-job"), work.join("new/dir/f")] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY), "{}", path.display());
    }
}

#[tokio::test]
async fn a_job_user_missing_from_passwd_or_a_missing_program_is_a_spawn_failure() {
    require_root();
    let h = Harness::new("job-nouser");
    let mut spec = h.spec("true");
    spec.sandbox.user = "no-such-user".into();
    let (result, _) = h.run(spec, None).await;
    let result = result.unwrap();
    assert_eq!(
        result.outcome,
        JobOutcome::SpawnFailed {
            reason: "cannot sandbox the job: the job user \"no-such-user\" is not in /etc/passwd".into()
        }
    );
    assert_eq!(result.enforcement, Enforcement::default());

    // The sandbox was in place when exec failed: the result says so.
    let mut spec = h.spec("");
    spec.program = "/nonexistent/tool".into();
    spec.args.clear();
    let (result, _) = h.run(spec, None).await;
    let result = result.unwrap();
    match &result.outcome {
        JobOutcome::SpawnFailed { reason } => {
            assert_eq!(reason, "cannot start \"/nonexistent/tool\": No such file or directory (os error 2)")
        }
        other => panic!("{other:?}"),
    }
    assert!(result.enforcement.landlock_fs && result.enforcement.seccomp, "{:?}", result.enforcement);
}
