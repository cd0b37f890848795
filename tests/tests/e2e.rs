//! End to end: the real CLI, a real agentlabd, a real microVM under QEMU with the real
//! agent as PID 1, over vhost-device-vsock. Every test checks that the output came from
//! inside the guest (its kernel differs from the host's).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentlab_protocol::{
    Capabilities, GuestMessage, Hello, HostMessage, OutputChunk, OutputStream, decode_message, encode_message,
};
use agentlab_tests::{Daemon, describe, event_messages, host_kernel, image_dir};
use serde_json::Value;

/// The image's kernel release, which the guest's `uname -r` prints. It is checked to
/// differ from the host's, so output that matches it came from inside the guest.
fn guest_kernel() -> String {
    let kernel = std::fs::read_to_string(image_dir().join("kernel-release")).unwrap().trim().to_owned();
    assert_ne!(kernel, host_kernel(), "guest and host kernels must differ for these tests to prove anything");
    kernel
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn only_job_id(d: &Daemon) -> String {
    let out = d.cli(&["--json", "job", "list"]);
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap();
    jobs[0]["id"].as_str().unwrap().to_owned()
}

/// After a job: its sandbox is DESTROYED (the job's result is stored first, so the
/// teardown may still be under way) and nothing of the VM is left behind.
fn assert_cleaned_up(d: &Daemon, job: &Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let sb = loop {
        let sandboxes: Value = serde_json::from_slice(&d.cli(&["--json", "sandbox", "list"]).stdout).unwrap();
        let sb = sandboxes.as_array().unwrap().iter().find(|s| s["id"] == job["sandbox_id"]).unwrap().clone();
        if sb["state"] == "DESTROYED" {
            break sb;
        }
        assert!(Instant::now() < deadline, "the sandbox was not torn down: {sb}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // KVM only after a successful probe boot; otherwise the log says why not.
    match sb["accel"].as_str() {
        Some("kvm") => {}
        Some("tcg") => assert!(d.log().contains("KVM probe"), "{}", d.log()),
        other => panic!("accel {other:?}"),
    }
    assert_eq!(d.live_sandbox_dirs(), Vec::<PathBuf>::new());
}

fn transitions(job: &Value, kind: &str) -> Vec<String> {
    job["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["to_state"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_job_prints_known_text_from_inside_the_guest_and_exits_zero() {
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the API socket is for its owner and group only");
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "echo hello-from-agentlab; uname -r; echo to-stderr >&2"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    let text = stdout(&out);
    let kernel = guest_kernel();
    assert_eq!(text, format!("hello-from-agentlab\n{kernel}\n"));
    // stderr holds the job's stderr and, not being a terminal, one line per phase.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (progress, job_stderr): (Vec<&str>, Vec<&str>) = stderr.lines().partition(|l| l.starts_with("agentlab: "));
    assert_eq!(job_stderr, ["to-stderr"]);
    let phases =
        ["queued", "provisioning", "booting", "running", "collecting artifacts", "storing artifacts", "tearing down"];
    let mut expected = phases.iter().map(|p| format!("agentlab: {p}"));
    assert!(!progress.is_empty() && progress.iter().all(|line| expected.any(|p| p == *line)), "{progress:?}");

    let job = d.job_json(&only_job_id(&d));
    assert_eq!(job["state"], "COMPLETED");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["guest_kernel"], kernel.as_str());
    assert_eq!(job["profile"], "yolo-ephemeral");
    // What the agent enforced in the Debian 6.1 guest (Landlock ABI 2), as stored by the host.
    let e = &job["enforcement"];
    assert_eq!((e["landlock_abi"].as_u64(), e["landlock_fs"].as_bool()), (Some(2), Some(true)), "{e}");
    assert_eq!((e["landlock_net"].as_bool(), e["landlock_scope"].as_bool()), (Some(false), Some(false)), "{e}");
    assert_eq!((e["seccomp"].as_bool(), e["no_new_privs"].as_bool()), (Some(true), Some(true)), "{e}");
    assert_eq!((e["user"].as_str(), e["uid"].as_u64()), (Some("agent"), Some(1000)), "{e}");
    let shown = stdout(&d.cli(&["job", "show", job["id"].as_str().unwrap()]));
    assert!(
        shown.contains("enforced:   user agent (uid 1000), landlock ABI 2 (fs yes, net no, scope no), seccomp yes, no_new_privs yes\n"),
        "{shown}"
    );
    let provisioned = job["events"].as_array().unwrap().iter().find(|e| e["kind"] == "sandbox.provisioned").unwrap();
    let shape = provisioned["message"].as_str().unwrap();
    assert!(shape.starts_with("profile yolo-ephemeral: "), "{shape}");
    let cpus = std::thread::available_parallelism().unwrap().get().min(2);
    assert!(shape.contains(&format!("{cpus} vCPU, 4096 MiB, ")), "{shape}");
    assert_eq!(job["output_bytes"], (text.len() + "to-stderr\n".len()) as u64);
    assert_eq!(transitions(&job, "job.state"), ["RUNNING", "COMPLETED"]);
    // The default profile names a `default` bundle that this daemon does not have.
    let missing = job["events"].as_array().unwrap().iter().find(|e| e["kind"] == "secrets.missing").unwrap();
    assert_eq!(
        missing["message"],
        "profile yolo-ephemeral names secrets bundle \"default\", which does not exist: the job runs without secrets (create it with `agentlab secrets set --bundle default --env NAME`)"
    );
    // The result is stored before the sandbox goes; the teardown follows.
    assert_cleaned_up(&d, &job);
    let job = d.job_json(job["id"].as_str().unwrap());
    assert_eq!(
        transitions(&job, "sandbox.state"),
        ["PROVISIONING", "BOOTING", "READY", "RUNNING", "COMPLETED", "DESTROYED"]
    );

    // `job show` reads the same record back as text.
    let again = d.cli(&["job", "show", job["id"].as_str().unwrap()]);
    assert!(stdout(&again).contains("state:      COMPLETED\n"), "{}", describe(&again));
}

#[test]
fn a_job_that_exits_3_makes_agentlab_exit_3_and_the_metrics_count_it() {
    let d = Daemon::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "uname -r; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(stdout(&out), format!("{}\n", guest_kernel()));
    let job = d.job_json(&only_job_id(&d));
    assert_eq!(job["state"], "FAILED");
    assert_eq!(job["exit_code"], 3);
    assert_eq!(job["error"], "exited with code 3");
    assert_cleaned_up(&d, &job);

    let log = d.log();
    let addr =
        log.split("metrics on http://").nth(1).and_then(|rest| rest.split("/metrics").next()).unwrap().to_owned();
    let get = |path: &str| {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    let metrics = get("/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
    for line in [
        "agentlab_jobs{state=\"FAILED\"} 1",
        "agentlab_jobs{state=\"COMPLETED\"} 0",
        "agentlab_sandboxes{state=\"DESTROYED\"} 1",
        "agentlab_provision_seconds_count 1",
        "agentlab_boot_seconds_count 1",
        "agentlab_job_seconds_count 1",
        &format!("agentlab_log_bytes_total {}", guest_kernel().len() + 1),
    ] {
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in:\n{metrics}");
    }
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    assert!(get("/other").starts_with("HTTP/1.1 404 Not Found\r\n"));
}

#[test]
fn a_job_that_outlives_its_timeout_is_killed_and_reported_as_timeout() {
    let d = Daemon::start();
    let started = Instant::now();
    let out =
        d.cli(&["job", "submit", "--follow", "--timeout", "3s", "--cmd", "uname -r; sleep 600; echo not-reached"]);
    assert_eq!(out.status.code(), Some(124), "{}", describe(&out));
    assert_eq!(stdout(&out), format!("{}\n", guest_kernel()));
    assert!(started.elapsed() < Duration::from_secs(120));
    let job = d.job_json(&only_job_id(&d));
    assert_eq!(job["state"], "TIMEOUT");
    assert_eq!(job["signal"], 15);
    let ms = job["duration_ms"].as_u64().unwrap();
    assert!((3000..10_000).contains(&ms), "duration {ms} ms");
    assert!(job["error"].as_str().unwrap().starts_with("timed out after "), "{job}");
    assert_cleaned_up(&d, &job);
}

#[test]
fn a_repo_directory_becomes_the_jobs_workdir() {
    let d = Daemon::start();
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(repo.path().join("greeting.txt"), "hi from the repo\n").unwrap();
    std::fs::create_dir(repo.path().join("src")).unwrap();
    std::fs::write(repo.path().join("src/run.sh"), "#!/bin/sh\necho \"run.sh in $(pwd) on $(uname -r)\"\n").unwrap();
    std::fs::set_permissions(repo.path().join("src/run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let out = d.cli(&[
        "job",
        "submit",
        "--follow",
        "--repo",
        repo.path().to_str().unwrap(),
        "--cmd",
        "cat greeting.txt && ./src/run.sh",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    assert_eq!(stdout(&out), format!("hi from the repo\nrun.sh in /workspace on {}\n", guest_kernel()));
    let job = d.job_json(&only_job_id(&d));
    assert_eq!(job["repo"], repo.path().to_str().unwrap());
    assert_cleaned_up(&d, &job);
    // The spooled upload is gone once the job has ended.
    assert_eq!(std::fs::read_dir(d.state.path().join("uploads")).unwrap().count(), 0);
}

#[test]
fn agent_status_in_the_guest_shows_the_channel_job_and_landlock_abi() {
    let d = Daemon::start();
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "agentlab-agent status --json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let job = d.job_json(&only_job_id(&d));
    assert_eq!(status["agent_running"], true);
    assert_eq!(status["kernel_release"], guest_kernel().as_str());
    assert_eq!(status["channel"]["up"], true);
    assert_eq!(status["channel"]["target"], "vsock:2:52000");
    assert_eq!(status["channel"]["sandbox_id"], job["sandbox_id"]);
    assert_eq!(status["job"]["id"], job["id"]);
    assert_eq!(status["job"]["phase"], "running");
    assert_eq!(status["landlock_abi"], 2, "Debian's 6.1 kernel has Landlock ABI 2");
}

/// The inner sandbox in the guest (Landlock ABI 2): `agentlab-agent selftest` run as the
/// job shows each hostile action refused by the layer that can refuse it at that ABI.
#[test]
fn the_inner_sandbox_in_the_guest_blocks_what_landlock_abi_2_and_seccomp_can() {
    let d = Daemon::start();
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "agentlab-agent selftest --json"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    let checks: Value = serde_json::from_str(&stdout(&out)).unwrap();
    eprintln!("{checks:#}");
    let check = |name: &str| (checks[name]["outcome"].as_str().unwrap().to_owned(), checks[name]["errno"].clone());
    // The image's `agent` user (uid 1000), with /workspace handed to it by the agent.
    assert_eq!(check("whoami").0, "uid=1000(agent)");
    assert_eq!(check("write-workdir").0, "allowed");
    assert_eq!(check("write-tmpdir").0, "allowed");
    // /tmp is a mode-1777 tmpfs: only Landlock (file system rules, ABI 1+) refuses it.
    assert_eq!(check("write-outside-roots"), ("blocked (EACCES)".to_owned(), Value::from("EACCES")));
    // The profile does not let the job read secrets, and the guest has none yet.
    assert_eq!(check("read-secrets-dir").0, "not-present");
    // seccomp refuses socket(AF_VSOCK) and ptrace whatever the Landlock ABI.
    assert_eq!(check("vsock-connect-host"), ("blocked (EPERM)".to_owned(), Value::from("EPERM")));
    assert_eq!(check("ptrace-attach"), ("blocked (EPERM)".to_owned(), Value::from("EPERM")));
    // ABI 2 has no signal scoping (ABI 6), but the agent runs as root and the job as
    // uid 1000, so kill(2)'s own permission check refuses it.
    assert_eq!(check("signal-agent"), ("blocked (EPERM)".to_owned(), Value::from("EPERM")));
    // The profile's network is `nat`, so the sandbox lets TCP through; the guest's
    // loopback is down, so the kernel's routing (not the sandbox) answers.
    assert_eq!(check("tcp-connect"), ("allowed (ENETUNREACH)".to_owned(), Value::from("ENETUNREACH")));
}

/// A job cannot make the real agent drop the channel any more (its sandbox refuses
/// `kill` of the agent: see the selftest above), so a fake guest plays the agent that
/// disconnects: handshake, job started, some output, then gone.
#[test]
fn a_guest_agent_that_disconnects_mid_job_fails_the_job_with_that_reason() {
    let d = Daemon::start();
    let (job_id, mut fake, spec) = fake_agent_running(&d, "sleep 60");
    assert_eq!(spec.args, ["-c", "sleep 60"]);
    let chunk = OutputChunk { seq: 0, stream: OutputStream::Stdout, data: b"partial output\n".to_vec() };
    fake.write_all(&encode_message(&GuestMessage::Output(chunk)).unwrap()).unwrap();
    assert!(matches!(read_frame(&mut fake), HostMessage::OutputAck { seq: 0 }));
    drop(fake);

    let job = d.wait_for_job_end(&job_id);
    assert_eq!(job["state"], "FAILED");
    let error = job["error"].as_str().unwrap();
    assert!(error.ends_with("the guest agent disconnected while the job was running"), "{error}");
    assert_eq!(job["output_bytes"], 15);
    assert_cleaned_up(&d, &job);
}

/// Secrets set with the CLI are stored encrypted, delivered once into the guest's
/// tmpfs, redacted from everything the job prints, and never stored in plaintext:
/// not in the database, the job's log, the daemon's log, or anywhere in its state.
#[test]
fn secrets_set_with_the_cli_reach_the_guest_redacted_and_are_never_stored_in_plaintext() {
    const API_KEY: &str = "sk-ant-e2e-7f3a9c21d4";
    const SETTINGS: &str = "{\"apiKeyHelper\": \"hx-55aa77cc\"}";
    let d = Daemon::start();
    let out = d.cli_with_stdin(
        &["secrets", "set", "--bundle", "default", "--env", "API_KEY"],
        format!("{API_KEY}\n").as_bytes(),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let settings = d.state.path().join("settings-for-test.json");
    std::fs::write(&settings, SETTINGS).unwrap();
    let file_arg = format!("settings.json={}", settings.display());
    let out = d.cli(&["secrets", "set", "--bundle", "default", "--file", &file_arg]);
    assert!(out.status.success(), "{}", describe(&out));
    std::fs::remove_file(&settings).unwrap();
    let shown = d.cli(&["--json", "secrets", "show", "default"]);
    let view: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(
        view["entries"],
        serde_json::json!([
            {"kind": "env", "name": "API_KEY", "bytes": API_KEY.len()},
            {"kind": "file", "name": "settings.json", "bytes": SETTINGS.len()},
        ])
    );
    let listed = stdout(&d.cli(&["secrets", "list"]));
    assert!(listed.contains("env API_KEY, file settings.json"), "{listed}");

    let cmd = r#"echo "env=$API_KEY"
printf %s "$API_KEY" | base64
cat /run/agentlab/secrets/settings.json; echo
stat -c '%a %U:%G' /run/agentlab/secrets /run/agentlab/secrets/settings.json
awk '$5 == "/run/agentlab/secrets" { for (i = 7; $i != "-"; i++); print $6, $(i+2), $(i+3) }' /proc/self/mountinfo
agentlab-agent status | grep '^secrets:'"#;
    let out = d.cli(&["job", "submit", "--follow", "--profile", "yolo-workspace", "--cmd", cmd]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    assert_eq!(
        stdout(&out),
        "env=[REDACTED]\n[REDACTED]\n[REDACTED]\n750 root:agent\n440 root:agent\n\
         rw,nosuid,nodev,noexec,relatime agentlab-secrets rw,size=1024k,nr_inodes=256,mode=700,inode64\n\
         secrets:        tmpfs on /run/agentlab/secrets (mode=0700,uid=0,gid=0,size=1m,nr_inodes=256,nosuid,nodev,noexec; \
         swap possible, kernel < 6.4 has no noswap): env API_KEY, file settings.json\n"
    );
    let job = d.job_json(&only_job_id(&d));
    let delivered: Vec<&Value> =
        job["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "secrets.delivered").collect();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["message"], "bundle default: env API_KEY, file settings.json");
    assert_cleaned_up(&d, &job);

    // Nothing under the state directory holds a value in plaintext.
    let mut pending = vec![d.state.path().to_path_buf()];
    let mut files = 0;
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            for secret in [API_KEY, SETTINGS, "hx-55aa77cc"] {
                assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} in {}", path.display());
            }
        }
    }
    assert!(files >= 5, "scanned only {files} files");
}

/// Exactly one agent session per sandbox: a fake agent takes the session first, so the
/// real agent's dial-in is the second connection. It is refused with the reason and
/// recorded; the refused agent powers its VM off.
#[test]
fn a_second_connection_to_the_agent_port_is_refused_and_recorded() {
    let d = Daemon::start();
    let (job_id, fake, _) = fake_agent_running(&d, "sleep 60");
    // A second fake, as a job that got hold of a vsock socket would be.
    let path = d
        .state
        .path()
        .join("sandboxes")
        .join(d.job_json(&job_id)["sandbox_id"].as_str().unwrap())
        .join("vsock.sock_52000");
    let mut second = UnixStream::connect(&path).unwrap();
    second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Capabilities::ALL,
        agent_version: "impostor".into(),
        kernel_release: "x".into(),
        landlock_abi: 0,
    };
    second.write_all(&encode_message(&GuestMessage::Hello(hello)).unwrap()).unwrap();
    let HostMessage::HelloReject { reason, .. } = read_frame(&mut second) else { panic!("not rejected") };
    assert!(
        reason.ends_with("already has its agent session; a second connection to the agent port is refused"),
        "{reason}"
    );
    let job = d.wait_for_job_end(&job_id);
    let refused = event_messages(&job, "channel.refused");
    let sandbox = job["sandbox_id"].as_str().unwrap();
    let reason =
        format!("sandbox {sandbox} already has its agent session; a second connection to the agent port is refused");
    assert_eq!(refused, [reason.as_str(), reason.as_str()], "the impostor and the real agent: {job:#}");
    assert_eq!(job["state"], "FAILED");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("the VM stopped during the session"), "{error}");
    let console =
        std::fs::read_to_string(d.state.path().join("jobs").join(&job_id).join("console.log")).unwrap_or_default();
    assert!(console.contains("already has its agent session"), "the refused agent says why: {console}");
    assert_cleaned_up(&d, &job);
    drop(fake);
}

/// The profile's globs pick files in the guest; the host verifies and stores them; the
/// CLI lists them and downloads them, re-checking each checksum.
#[test]
fn artifacts_round_trip_from_the_guest_with_checksums_verified() {
    let d = Daemon::start();
    let cmd = "mkdir -p out/deep && echo hello > out/hello.txt && head -c 200000 /dev/urandom > out/deep/random.bin \
               && echo 'diff --git' > fix.patch && echo not-collected > notes.txt";
    let out = d.cli(&["job", "submit", "--follow", "--cmd", cmd]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    let job = d.job_json(&only_job_id(&d));
    let id = job["id"].as_str().unwrap();
    let listed: Value = serde_json::from_slice(&d.cli(&["--json", "job", "artifacts", id]).stdout).unwrap();
    let paths: Vec<&str> = listed.as_array().unwrap().iter().map(|a| a["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [".agentlab/agent.log", ".agentlab/report.json", "fix.patch", "out/deep/random.bin", "out/hello.txt"]
    );
    assert_eq!(listed[3]["bytes"], 200_000);
    let stored = job["events"].as_array().unwrap().iter().find(|e| e["kind"] == "artifacts.stored").unwrap();
    assert!(stored["message"].as_str().unwrap().starts_with("5 file(s), "), "{stored}");

    let dest = tempfile::tempdir().unwrap();
    let out = d.cli(&["job", "artifacts", "download", id, "--out", dest.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout(&out).matches("sha256 ok").count(), 5, "{}", stdout(&out));
    assert_eq!(std::fs::read_to_string(dest.path().join("out/hello.txt")).unwrap(), "hello\n");
    let random = std::fs::read(dest.path().join("out/deep/random.bin")).unwrap();
    let stored_random = d.state.path().join("jobs").join(id).join("artifacts/out/deep/random.bin");
    assert_eq!(random, std::fs::read(&stored_random).unwrap());
    let report: Value =
        serde_json::from_slice(&std::fs::read(dest.path().join(".agentlab/report.json")).unwrap()).unwrap();
    assert_eq!((report["outcome"].as_str(), report["exit_code"].as_i64()), (Some("exited"), Some(0)), "{report}");
    assert_eq!(report["enforcement"]["landlock_abi"], 2);
    assert!(!dest.path().join("notes.txt").exists());

    // A stored file that changed on disk is caught, and nothing is written for it.
    std::fs::write(&stored_random, b"tampered").unwrap();
    let again = tempfile::tempdir().unwrap();
    let out = d.cli(&[
        "job",
        "artifacts",
        "download",
        id,
        "--name",
        "out/deep/random.bin",
        "--out",
        again.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("artifact out/deep/random.bin of job") && err.contains("is corrupt"), "{err}");
    assert!(!again.path().join("out/deep/random.bin").exists());
    assert_cleaned_up(&d, &job);
}

/// A hostile guest pushes a tar that tries to escape the artifact directory: every bad
/// entry is rejected and recorded, the good one is kept, nothing lands outside.
#[test]
fn a_hostile_guests_artifact_tar_cannot_escape_and_is_recorded() {
    let d = Daemon::start();
    let (job_id, mut fake, _) = fake_agent_running(&d, "true");
    fake.write_all(&encode_message(&GuestMessage::JobFinished(exited_zero())).unwrap()).unwrap();
    let HostMessage::CollectArtifacts(request) = read_frame(&mut fake) else { panic!("no artifact request") };
    assert_eq!(request.globs, ["out/**", "*.patch"]);
    assert_eq!(request.max_bytes, 512 * 1024 * 1024);

    let mut tar = Vec::new();
    agentlab_tests::raw_tar_entry(&mut tar, "out/good.txt", b'0', "", b"good\n");
    agentlab_tests::raw_tar_entry(&mut tar, "../../../../escape.txt", b'0', "", b"evil");
    agentlab_tests::raw_tar_entry(&mut tar, "/tmp/agentlab-absolute.txt", b'0', "", b"evil");
    agentlab_tests::raw_tar_entry(&mut tar, "out/shadow", b'2', "/etc/shadow", b"");
    agentlab_tests::raw_tar_entry(&mut tar, "out/null", b'3', "", b"");
    tar.extend_from_slice(&[0u8; 1024]);
    // Three chunks at once get one acknowledgement (cumulative), held back until no
    // more came: a guest waiting on its last chunk's is not left waiting.
    let mut frames = Vec::new();
    for (seq, piece) in tar.chunks(tar.len() / 3 + 1).enumerate() {
        frames.extend(encode_message(&GuestMessage::ArtifactChunk { seq: seq as u64, data: piece.to_vec() }).unwrap());
    }
    fake.write_all(&frames).unwrap();
    assert_eq!(read_frame(&mut fake), HostMessage::ArtifactAck { seq: 2 });
    let summary = agentlab_protocol::ArtifactSummary {
        bytes: tar.len() as u64,
        sha256: sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&tar)).into(),
        skipped: Vec::new(),
    };
    fake.write_all(&encode_message(&GuestMessage::ArtifactsDone(summary)).unwrap()).unwrap();
    assert!(matches!(read_frame(&mut fake), HostMessage::Shutdown));

    let job = d.wait_for_job_end(&job_id);
    assert_eq!(job["state"], "COMPLETED");
    let rejected = event_messages(&job, "artifacts.rejected");
    assert_eq!(
        rejected,
        [
            "../../../../escape.txt: the path climbs out with `..`",
            "/tmp/agentlab-absolute.txt: absolute paths are not accepted",
            "out/shadow: symlink entries are not accepted",
            "out/null: character device entries are not accepted",
        ]
    );
    let listed: Value = serde_json::from_slice(&d.cli(&["--json", "job", "artifacts", &job_id]).stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["path"], "out/good.txt");
    assert!(!std::path::Path::new("/tmp/agentlab-absolute.txt").exists());
    for dir in [d.state.path().to_path_buf(), d.state.path().join("jobs"), d.state.path().join("jobs").join(&job_id)] {
        assert!(!dir.join("escape.txt").exists(), "escaped into {}", dir.display());
    }
    assert_cleaned_up(&d, &job);
}

/// Ctrl-C stops `job submit --follow`, not the job; `agentlab logs --follow` then
/// prints the rest, each line exactly once. `--tail` and `--json` read the stored log,
/// and `agentlab events` the job's history.
#[test]
fn follow_can_be_interrupted_and_resumed_without_losing_or_repeating_a_line() {
    let d = Daemon::start();
    let state_home = tempfile::tempdir().unwrap();
    let cmd = "for i in $(seq 1 40); do echo line-$i; sleep 0.1; done";
    let mut first = std::process::Command::new(agentlab_tests::bin("agentlab"))
        .args(["--socket", d.socket.to_str().unwrap(), "job", "submit", "--follow", "--cmd", cmd])
        .env("XDG_STATE_HOME", state_home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once a few lines are out.
    let mut stdout = first.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while seen.iter().filter(|b| **b == b'\n').count() < 3 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the follow ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    stdout.read_to_end(&mut seen).unwrap();
    let status = first.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let mut err = String::new();
    first.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let id = only_job_id(&d);
    assert!(
        err.contains(&format!("stopped following; job {id} keeps running. Resume with: agentlab logs {id} --follow")),
        "{err}"
    );
    assert_eq!(d.job_json(&id)["state"], "RUNNING", "Ctrl-C must not cancel the job");

    let rest = std::process::Command::new(agentlab_tests::bin("agentlab"))
        .args(["--socket", d.socket.to_str().unwrap(), "logs", &id, "--follow"])
        .env("XDG_STATE_HOME", state_home.path())
        .output()
        .unwrap();
    assert_eq!(rest.status.code(), Some(0), "{}", describe(&rest));
    assert!(
        String::from_utf8_lossy(&rest.stderr)
            .starts_with(&format!("agentlab: resuming job {id} where the last follow stopped"))
    );
    seen.extend_from_slice(&rest.stdout);
    let expected: String = (1..=40).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(String::from_utf8(seen).unwrap(), expected);

    assert_eq!(stdout_of(&d.cli(&["logs", &id, "--tail", "2"])), "line-39\nline-40\n");
    let json = stdout_of(&d.cli(&["--json", "logs", &id, "--tail", "1"]));
    let line: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!((line["stream"].as_str(), line["data"].as_str()), (Some("stdout"), Some("line-40\n")), "{json}");

    let events: Vec<Value> = stdout_of(&d.cli(&["--json", "events", "--job", &id]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"job.created"));
    let job_states: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["kind"] == "job.state")
        .map(|e| (e["from_state"].as_str().unwrap(), e["to_state"].as_str().unwrap()))
        .collect();
    assert_eq!(job_states, [("QUEUED", "RUNNING"), ("RUNNING", "COMPLETED")], "{kinds:?}");
    // Following a finished job's events ends by itself.
    let followed = d.cli(&["events", "--job", &id, "--follow"]);
    assert_eq!(stdout_of(&followed).lines().count(), kinds.len());
}

/// On a terminal the phases show as a spinner, cleared before the job's output.
#[test]
fn progress_is_a_spinner_on_a_terminal() {
    let d = Daemon::start();
    // script(1) gives the CLI a pseudo-terminal.
    let cli = format!(
        "{} --socket {} job submit --follow --cmd 'sleep 1; echo done-x'",
        agentlab_tests::bin("agentlab").display(),
        d.socket.display()
    );
    let out = std::process::Command::new("script").args(["-qfec", &cli, "/dev/null"]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains(" booting (") && screen.contains(" running ("), "{screen:?}");
    // The spinner's line is erased before the output is written.
    assert!(screen.contains("\u{1b}[2Kdone-x"), "{screen:?}");
    assert!(!screen.contains("agentlab: booting"), "plain phase lines are for non-terminals: {screen:?}");
}

/// `agentlab job cancel` stops a running job in the guest (SIGTERM) and the sandbox goes.
#[test]
fn cancel_stops_a_running_job_and_destroys_its_sandbox() {
    let d = Daemon::start();
    let out = d.cli(&["--json", "job", "submit", "--cmd", "echo started; sleep 600"]);
    let ids: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = ids["job_id"].as_str().unwrap();
    d.wait_for_running(id);
    let out = d.cli(&["job", "cancel", id]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout_of(&out), format!("job {id} is being stopped: SIGTERM now, SIGKILL after 5 s\n"));
    let job = d.wait_for_job_end(id);
    assert_eq!(job["state"], "FAILED");
    assert_eq!(job["signal"], 15);
    assert_eq!(job["error"], "cancelled (agentlab job cancel); stopped with SIGTERM");
    assert_cleaned_up(&d, &job);
    let again = d.cli(&["job", "cancel", id]);
    assert_eq!(again.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&again.stderr),
        format!("agentlab: invalid: job {id} has already finished (FAILED)\n")
    );
}

/// 300 MiB to push: seconds under TCG, time enough to cancel mid-way.
const BIG_ARTIFACT: &str = "mkdir -p out && dd if=/dev/zero of=out/big.bin bs=1M count=300 2>/dev/null && echo written";

/// Follows the job's phases until `phase` (as the CLI prints it) begins.
fn follow_until_phase(d: &Daemon, id: &str, phase: &str) -> std::process::Child {
    let mut follow = std::process::Command::new(agentlab_tests::bin("agentlab"))
        .args(["--socket", d.socket.to_str().unwrap(), "logs", id, "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut phases = std::io::BufReader::new(follow.stderr.take().unwrap());
    let mut line = String::new();
    while line.trim_end() != format!("agentlab: {phase}") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut phases, &mut line).unwrap();
        assert!(n > 0, "the follow ended before {phase}: {}", d.job_json(id));
    }
    follow
}

/// Cancels `id` in the artifact push and checks that nothing of it was stored.
fn cancel_the_push(d: &Daemon, id: &str) -> Value {
    let follow = follow_until_phase(d, id, "collecting artifacts");
    let out = d.cli(&["job", "cancel", id]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout_of(&out), format!("job {id} has finished; its artifact push is stopped and nothing is stored\n"));
    let job = d.wait_for_job_end(id);
    let followed = follow.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&followed.stdout), "written\n");
    assert_eq!(
        event_messages(&job, "artifacts.cancelled"),
        ["cancelled (agentlab job cancel) while the guest pushed its artifacts; none were stored"]
    );
    assert_eq!(event_messages(&job, "artifacts.stored"), Vec::<&str>::new());
    let listed: Value = serde_json::from_slice(&d.cli(&["--json", "job", "artifacts", id]).stdout).unwrap();
    assert_eq!(listed, serde_json::json!([]));
    assert!(!d.state.path().join("jobs").join(id).join("artifacts").exists());
    assert_cleaned_up(d, &job);
    job
}

/// A cancel that comes while the guest pushes its artifacts stops the push at once:
/// the job's own result stands, nothing half-pushed is stored, and the event says why.
#[test]
fn cancel_during_the_artifact_push_stops_it_and_stores_nothing() {
    let d = Daemon::start();
    let out = d.cli(&["--json", "job", "submit", "--cmd", BIG_ARTIFACT]);
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["job_id"].as_str().unwrap().to_owned();
    let job = cancel_the_push(&d, &id);
    assert_eq!((job["state"].as_str(), job["exit_code"].as_i64()), (Some("COMPLETED"), Some(0)), "{job}");
}

/// A job cancelled while it ran still pushes its artifacts; cancelling it again stops that.
#[test]
fn a_second_cancel_stops_the_push_of_a_cancelled_job() {
    let d = Daemon::start();
    let cmd = format!("{BIG_ARTIFACT}; sleep 600");
    let out = d.cli(&["--json", "job", "submit", "--cmd", &cmd]);
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["job_id"].as_str().unwrap().to_owned();
    let mut follow = follow_until_phase(&d, &id, "running");
    let mut written = [0u8; 8];
    follow.stdout.take().unwrap().read_exact(&mut written).unwrap();
    assert_eq!(&written, b"written\n");
    follow.kill().unwrap();
    follow.wait().unwrap();
    assert!(d.cli(&["job", "cancel", &id]).status.success());
    let job = cancel_the_push(&d, &id);
    assert_eq!((job["state"].as_str(), job["signal"].as_i64()), (Some("FAILED"), Some(15)), "{job}");
    assert_eq!(job["error"], "cancelled (agentlab job cancel); stopped with SIGTERM");
}

/// A cancel the job outran (it exited 0 before the guest acted on it): the result
/// stands, and the artifacts are not collected, since the cancel came after the job.
#[test]
fn a_cancel_the_job_outran_skips_its_artifacts() {
    let d = Daemon::start();
    let (job_id, mut fake, _) = fake_agent_running(&d, "sleep 60");
    d.wait_for_running(&job_id);
    assert!(d.cli(&["job", "cancel", &job_id]).status.success());
    assert!(matches!(read_frame(&mut fake), HostMessage::Cancel));
    fake.write_all(&encode_message(&GuestMessage::JobFinished(exited_zero())).unwrap()).unwrap();
    let job = d.wait_for_job_end(&job_id);
    assert_eq!((job["state"].as_str(), job["exit_code"].as_i64()), (Some("COMPLETED"), Some(0)), "{job}");
    assert_eq!(
        event_messages(&job, "artifacts.cancelled"),
        ["cancelled (agentlab job cancel) after the job ended; its artifacts were not collected"]
    );
    // The host never asked for them: what follows the result is the goodbye.
    assert!(matches!(read_frame(&mut fake), HostMessage::Shutdown));
    let mut rest = Vec::new();
    fake.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"");
}

fn sandbox_json(d: &Daemon, id: &str) -> Value {
    serde_json::from_slice(&d.cli(&["--json", "sandbox", "show", id]).stdout).unwrap()
}

fn wait_for_sandbox_state(d: &Daemon, id: &str, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let sb = sandbox_json(d, id);
        if sb["state"] == state {
            return sb;
        }
        assert!(Instant::now() < deadline, "sandbox never reached {state}: {sb:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the sandbox is kept after its job (the result is stored first).
fn wait_until_kept(d: &Daemon, sb: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = sandbox_json(d, sb);
        if event_kinds(&view).iter().any(|k| k == "sandbox.kept") {
            return view;
        }
        assert!(Instant::now() < deadline, "the sandbox was never kept: {view:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn event_kinds(view: &Value) -> Vec<String> {
    view["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_owned()).collect()
}

/// `--keepalive` keeps the VM after the job; the lease can be renewed; when it ends the
/// reaper destroys the sandbox.
#[test]
fn a_kept_sandbox_lives_until_its_lease_ends_and_renewal_moves_the_end() {
    let d = Daemon::start_with(&["--lease-check-interval", "200ms"]);
    let out = d.cli(&["job", "submit", "--follow", "--keepalive", "--ttl", "10m", "--cmd", "echo kept"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    assert_eq!(stdout(&out), "kept\n");
    let job = d.job_json(&only_job_id(&d));
    let sb = job["sandbox_id"].as_str().unwrap();
    let view = wait_until_kept(&d, sb);
    assert_eq!((view["state"].as_str(), view["keepalive"].as_bool()), (Some("COMPLETED"), Some(true)), "{view:#}");
    assert_eq!(d.processes_using_state().len(), 2, "the VM and its device stay");
    let shown = stdout(&d.cli(&["sandbox", "show", sb]));
    assert!(shown.contains("keepalive:  yes\n") && shown.contains("lease:      ends "), "{shown}");

    let renewed = d.cli(&["--json", "sandbox", "lease", "renew", sb, "--ttl", "2s"]);
    assert!(renewed.status.success(), "{}", describe(&renewed));
    let view: Value = serde_json::from_slice(&renewed.stdout).unwrap();
    let ends = view["lease_expires_at_ms"].as_i64().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!((now..now + 2500).contains(&ends), "lease ends {ends}, now {now}");
    let view = wait_for_sandbox_state(&d, sb, "DESTROYED", Duration::from_secs(30));
    let kinds = event_kinds(&view);
    assert!(kinds.contains(&"lease.renewed".to_owned()) && kinds.contains(&"lease.expired".to_owned()), "{kinds:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.processes_using_state().is_empty() {
        assert!(Instant::now() < deadline, "left behind: {:?}", d.processes_using_state());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.job_json(job["id"].as_str().unwrap())["state"], "COMPLETED", "the job's result stays");
}

/// A lease that ends while the job runs stops the job and destroys the sandbox;
/// `sandbox destroy` needs --force for a running job; `prune` ends kept sandboxes.
#[test]
fn leases_and_destroy_stop_running_jobs_and_prune_ends_kept_sandboxes() {
    let d = Daemon::start_with(&["--lease-check-interval", "200ms"]);
    let out = d.cli(&["--json", "job", "submit", "--cmd", "echo started; sleep 600"]);
    let ids: Value = serde_json::from_slice(&out.stdout).unwrap();
    d.wait_for_running(ids["job_id"].as_str().unwrap());
    // The lease ends a second from now, while the job runs.
    assert!(d.cli(&["sandbox", "lease", "renew", ids["sandbox_id"].as_str().unwrap(), "--ttl", "1s"]).status.success());
    let job = d.wait_for_job_end(ids["job_id"].as_str().unwrap());
    assert_eq!(job["state"], "FAILED");
    assert_eq!(job["error"], "cancelled: the sandbox's lease expired; stopped with SIGTERM");
    wait_for_sandbox_state(&d, ids["sandbox_id"].as_str().unwrap(), "DESTROYED", Duration::from_secs(30));

    let out = d.cli(&["--json", "job", "submit", "--cmd", "echo started; sleep 600"]);
    let ids: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (job_id, sb) = (ids["job_id"].as_str().unwrap(), ids["sandbox_id"].as_str().unwrap());
    d.wait_for_running(job_id);
    let refused = d.cli(&["sandbox", "destroy", sb]);
    assert_eq!(refused.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        format!(
            "agentlab: invalid: sandbox {sb} is running job {job_id}: cancel the job (agentlab job cancel {job_id}) or pass --force\n"
        )
    );
    assert!(d.cli(&["sandbox", "destroy", "--force", sb]).status.success());
    let job = d.wait_for_job_end(job_id);
    assert_eq!(
        job["error"],
        "cancelled: its sandbox was destroyed (agentlab sandbox destroy --force); stopped with SIGTERM"
    );
    wait_for_sandbox_state(&d, sb, "DESTROYED", Duration::from_secs(30));

    let out = d.cli(&["--json", "job", "submit", "--follow", "--keepalive", "--cmd", "true"]);
    assert!(out.status.success(), "{}", describe(&out));
    let kept = d.job_json(&only_job_id(&d));
    let kept_sb = kept["sandbox_id"].as_str().unwrap();
    assert_eq!(wait_until_kept(&d, kept_sb)["state"], "COMPLETED");
    assert_eq!(stdout(&d.cli(&["sandbox", "prune"])), format!("{kept_sb}: destroyed\n"));
    assert_eq!(sandbox_json(&d, kept_sb)["state"], "DESTROYED");
    assert_eq!(stdout(&d.cli(&["sandbox", "prune"])), "no sandbox is kept after its job\n");
    assert_eq!(d.live_sandbox_dirs(), Vec::<PathBuf>::new());
}

/// Four microVM jobs run at once within the budget; a fifth waits in the queue, says
/// what for, and runs when one of the four is done.
#[test]
fn four_jobs_run_at_once_and_a_fifth_waits_for_the_budget() {
    let d = Daemon::start_with(&["--budget-cores", "8", "--budget-memory-mb", "2048", "--max-vm-memory-mb", "512"]);
    let cpus = std::thread::available_parallelism().unwrap().get().min(2) as u32;
    assert_eq!(cpus, 2, "the budget below assumes 2-vCPU sandboxes");
    let submit = |n: u32| -> String {
        let cmd = format!("echo start-{n}; sleep 40; echo end-{n}");
        let out = d.cli(&["--json", "job", "submit", "--cmd", &cmd]);
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["job_id"].as_str().unwrap().to_owned()
    };
    let first: Vec<String> = (1..=4).map(submit).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let states: Vec<Value> = first.iter().map(|id| d.job_json(id)["state"].clone()).collect();
        if states.iter().all(|s| s == "RUNNING") {
            break;
        }
        assert!(Instant::now() < deadline, "never all four running: {states:?}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let fifth = submit(5);
    std::thread::sleep(Duration::from_millis(500));
    let queued = d.job_json(&fifth);
    assert_eq!(queued["state"], "QUEUED");
    assert_eq!(
        queued["queue"],
        "position 1 of 1, waiting for 2 vCPUs (8 of 8 in use) and 512 MiB of memory (2048 of 2048 MiB in use)"
    );
    let shown = stdout(&d.cli(&["job", "show", &fifth]));
    assert!(shown.contains("queued:     position 1 of 1, waiting for 2 vCPUs"), "{shown}");
    for (n, id) in first.iter().chain(std::iter::once(&fifth)).enumerate() {
        let job = d.wait_for_job_end(id);
        assert_eq!(job["state"], "COMPLETED", "{job:#}");
        let out = stdout(&d.cli(&["logs", id]));
        assert_eq!(out, format!("start-{0}\nend-{0}\n", n + 1));
    }
    // The fifth started only after one of the first four had finished.
    let fifth_job = d.job_json(&fifth);
    let fifth_started = fifth_job["started_at_ms"].as_i64().unwrap();
    let first_done = first.iter().map(|id| d.job_json(id)["finished_at_ms"].as_i64().unwrap()).min().unwrap();
    assert!(fifth_started > first_done, "the fifth ran before any slot was free");
    let waited = fifth_job["events"].as_array().unwrap().iter().find(|e| e["kind"] == "job.queued").unwrap();
    assert!(waited["message"].as_str().unwrap().starts_with("position 1 of 1, waiting for 2 vCPUs"), "{waited}");
}

fn stdout_of(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", describe(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Plays the agent up to the job: Hello, the job, and the (empty) secrets it asks for.
fn fake_agent_handshake(fake: &mut UnixStream) -> agentlab_protocol::JobSpec {
    let hello = Hello {
        min_version: agentlab_protocol::MIN_PROTOCOL_VERSION,
        max_version: agentlab_protocol::PROTOCOL_VERSION,
        capabilities: Capabilities::ALL,
        agent_version: "0.1.0".into(),
        kernel_release: "fake".into(),
        landlock_abi: 2,
    };
    fake.write_all(&encode_message(&GuestMessage::Hello(hello)).unwrap()).unwrap();
    fake.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert!(matches!(read_frame(fake), HostMessage::HelloAck(_)));
    let HostMessage::Job(spec) = read_frame(fake) else { panic!("no job") };
    fake.write_all(&encode_message(&GuestMessage::RequestSecrets).unwrap()).unwrap();
    assert!(matches!(read_frame(fake), HostMessage::Secrets(b) if b.entries.is_empty()));
    spec
}

/// A fake guest on the agent socket of a job running `cmd`, past the handshake and
/// with the job reported started (pid 42); with the job's id and the spec it was sent.
fn fake_agent_running(d: &Daemon, cmd: &str) -> (String, UnixStream, agentlab_protocol::JobSpec) {
    let (job_id, mut fake) = hijack_agent_socket(d, cmd);
    let spec = fake_agent_handshake(&mut fake);
    fake.write_all(&encode_message(&GuestMessage::JobStarted { pid: 42 }).unwrap()).unwrap();
    (job_id, fake, spec)
}

/// A fake guest's report of a job that exited 0.
fn exited_zero() -> agentlab_protocol::JobResult {
    agentlab_protocol::JobResult {
        outcome: agentlab_protocol::JobOutcome::Exited { code: 0 },
        duration_ms: 5,
        output_bytes: 0,
        enforcement: Default::default(),
    }
}

/// Reads one host frame as a fake guest.
fn read_frame(stream: &mut UnixStream) -> HostMessage {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut payload).unwrap();
    decode_message(&payload).unwrap()
}

/// Connects as a fake guest to a sandbox's agent socket before the real guest boots.
fn hijack_agent_socket(d: &Daemon, cmd: &str) -> (String, UnixStream) {
    let out = d.cli(&["--json", "job", "submit", "--cmd", cmd]);
    assert!(out.status.success(), "{}", describe(&out));
    let ids: Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = d.state.path().join("sandboxes").join(ids["sandbox_id"].as_str().unwrap()).join("vsock.sock_52000");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(stream) = UnixStream::connect(&path) {
            return (ids["job_id"].as_str().unwrap().to_owned(), stream);
        }
        assert!(Instant::now() < deadline, "the agent socket never appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn hostile_frames_close_that_session_and_the_daemon_keeps_serving() {
    let d = Daemon::start();

    // 1. A frame header announcing 4 GiB, before any handshake.
    let (job_a, mut fake) = hijack_agent_socket(&d, "echo never");
    fake.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let job = d.wait_for_job_end(&job_a);
    assert_eq!(job["state"], "FAILED");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("peer sent a frame of 4294967295 bytes, over the 1048576-byte limit"), "{error}");
    // The session is closed: the fake guest reads end-of-stream, or a reset if the host
    // closed with bytes unread. A timeout (the session still open) fails.
    fake.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match fake.read(&mut [0u8; 16]) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the host did not close the session: {other:?}"),
    }

    // 2. A valid handshake, then garbage where a message should be.
    let (job_b, mut fake) = hijack_agent_socket(&d, "echo never");
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Capabilities::ALL,
        agent_version: "fake\u{7}agent".into(),
        kernel_release: "x".repeat(10_000),
        landlock_abi: 99,
    };
    fake.write_all(&encode_message(&GuestMessage::Hello(hello)).unwrap()).unwrap();
    fake.write_all(&[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0xff]).unwrap();
    let job = d.wait_for_job_end(&job_b);
    assert_eq!(job["state"], "FAILED");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("peer sent an undecodable 5-byte message"), "{error}");
    // What the fake claimed was bounded and cleaned before it was stored.
    assert_eq!(job["guest_kernel"].as_str().unwrap().len(), 256);
    assert_eq!(job["agent_version"], "fake?agent");

    // 3. The daemon still runs a real job.
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "uname -r"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe(&out), d.log());
    assert_eq!(stdout(&out), format!("{}\n", guest_kernel()));
    d.wait_for_teardowns();
}

#[test]
fn missing_qemu_or_vhost_device_vsock_is_named_with_the_fix() {
    let d = Daemon::start_with(&["--qemu", "/nonexistent/qemu-system-x86_64"]);
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/qemu-system-x86_64 not found (searched /nonexistent/qemu-system-x86_64): install it (apt-get install qemu-system-x86) or pass agentlabd --qemu PATH"),
        "{err}"
    );
    let job = d.job_json(&only_job_id(&d));
    assert_eq!(job["state"], "FAILED");
    assert_eq!(transitions(&job, "sandbox.state"), ["PROVISIONING", "FAILED", "DESTROYED"]);

    let d = Daemon::start_with(&["--vhost-device-vsock", "no-such-vhost-device-vsock"]);
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-vhost-device-vsock not found (searched PATH="), "{err}");
    assert!(err.contains("install it (cargo install vhost-device-vsock --locked)"), "{err}");
}

#[test]
fn an_unbuilt_image_is_named_with_the_fix() {
    let empty = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(&["--image-dir", empty.path().to_str().unwrap()]);
    let out = d.cli(&["job", "submit", "--follow", "--cmd", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "the guest image is not built: {}/vmlinux does not exist; build it with `make image` (image/build.sh)",
        empty.path().display()
    );
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn bad_input_to_the_cli_is_explained() {
    let d = Daemon::start();
    let out = d.cli(&["job", "submit", "--cmd", "true", "--repo", "/nonexistent/repo"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--repo /nonexistent/repo: No such file or directory"));
    let out = d.cli(&["job", "submit", "--cmd", "  "]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid: the command is empty: pass --cmd 'COMMAND'"));
    let out = d.cli(&["job", "show", "job-000000000000"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "agentlab: no job with id job-000000000000\n");
    // Nothing was recorded for the refused submissions.
    assert_eq!(stdout(&d.cli(&["--json", "job", "list"])).trim(), "[]");

    let out = std::process::Command::new(agentlab_tests::bin("agentlab"))
        .args(["--socket", "/nonexistent/agentlabd.sock", "job", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with("agentlab: cannot reach agentlabd at /nonexistent/agentlabd.sock")
    );
}

/// `kill -9` of agentlabd mid-job: the VM runs on, the restarted daemon takes the job
/// back, the agent sends what was not stored yet, and the output is complete, each
/// line exactly once.
#[test]
fn killing_the_daemon_mid_job_loses_nothing_and_the_restart_takes_the_job_back() {
    let mut d = Daemon::start();
    let cmd = "for i in $(seq 1 40); do echo line-$i; sleep 0.1; done";
    let out = d.cli(&["--json", "job", "submit", "--cmd", cmd]);
    assert!(out.status.success(), "{}", describe(&out));
    let ids: Value = serde_json::from_slice(&out.stdout).unwrap();
    let job_id = ids["job_id"].as_str().unwrap().to_owned();
    d.wait_for_output(&job_id);
    assert_eq!(d.job_json(&job_id)["state"], "RUNNING");
    assert_eq!(d.processes_using_state().len(), 2, "one QEMU and one vhost-device-vsock while it runs");

    d.kill_and_restart();
    assert_eq!(d.processes_using_state().len(), 2, "the VM outlives the daemon");
    let job = d.wait_for_job_end(&job_id);
    assert_eq!(job["state"], "COMPLETED", "{job:#}\n{}", d.log());
    assert_eq!(job["exit_code"], 0);
    let expected: String = (1..=40).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(stdout_of(&d.cli(&["logs", &job_id])), expected);
    let kinds: Vec<&str> = job["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"job.resuming") && kinds.contains(&"channel.resumed"), "{kinds:?}");
    assert_cleaned_up(&d, &job);
    assert!(d.processes_using_state().is_empty(), "{:?}", d.processes_using_state());
}
