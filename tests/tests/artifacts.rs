//! Artifacts with the real agent on this host against the real host session: the agent
//! selects files by glob, adds its log and report.json, streams a tar with its SHA-256;
//! the host checks the stream and unpacks it through the validating unpacker.
//! The microVM round trip through the CLI and a hostile guest's tar are in `e2e.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use agentlab_host::artifacts::{ArtifactView, unpack};
use agentlab_protocol::{ArtifactRequest, JobOutcome, JobSpec, LandlockMode, SandboxSpec, SecretBundle};
use agentlab_redact::Redactor;
use sha2::{Digest, Sha256};

fn spec(dir: &std::path::Path, cmd: &str) -> JobSpec {
    let sandbox = SandboxSpec {
        landlock: LandlockMode::Off,
        user: agentlab_tests::current_user(),
        network_off: false,
        ..SandboxSpec::default()
    };
    agentlab_tests::sh_job("job-artifacts", &dir.join("work"), cmd, sandbox)
}

#[tokio::test]
async fn the_agent_pushes_matching_files_its_log_and_a_report_and_the_host_verifies_them() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = "mkdir -p out/deep .git/refs/heads && echo result > out/result.txt && printf 'x%.0s' $(seq 3000) > out/deep/big.txt \
               && echo diff > fix.patch && echo no > notes.md && ln -s /etc/passwd out/passwd \
               && echo 'ref: refs/heads/main' > .git/HEAD && echo 0123456789abcdef0123456789abcdef01234567 > .git/refs/heads/main; exit 4";
    let request = ArtifactRequest { globs: vec!["out/**".into(), "*.patch".into()], max_bytes: 1 << 20 };
    let ((result, _, status), pushed) = agentlab_tests::run_agent_job_full(
        dir.path(),
        spec(dir.path(), cmd),
        SecretBundle::default(),
        None,
        Some(request),
    )
    .await;
    assert_eq!(result.unwrap().outcome, JobOutcome::Exited { code: 4 });
    assert!(status.success(), "agent exited with {status}");
    let (summary, tar) = pushed.unwrap().unwrap();
    assert_eq!(summary.bytes, tar.len() as u64);
    assert_eq!(summary.sha256, <[u8; 32]>::from(Sha256::digest(&tar)));
    assert_eq!(summary.skipped, ["out/passwd: a symlink (not followed)"]);

    let tar_path = dir.path().join("artifacts.tar");
    std::fs::write(&tar_path, &tar).unwrap();
    let dest = dir.path().join("stored");
    let unpacked = unpack(&tar_path, &dest, 1 << 20, &Redactor::new(Vec::<Vec<u8>>::new())).unwrap();
    assert!(unpacked.rejected.is_empty(), "{:?}", unpacked.rejected);
    let paths: Vec<&str> = unpacked.stored.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(
        paths,
        ["fix.patch", "out/deep/big.txt", "out/result.txt", ".agentlab/report.json", ".agentlab/agent.log"]
    );
    let result_txt = &unpacked.stored[2];
    assert_eq!(
        result_txt,
        &ArtifactView { path: "out/result.txt".into(), bytes: 7, sha256: hex::encode(Sha256::digest(b"result\n")) }
    );
    assert_eq!(std::fs::read(dest.join("out/deep/big.txt")).unwrap().len(), 3000);

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join(".agentlab/report.json")).unwrap()).unwrap();
    assert_eq!(report["job_id"], "job-artifacts");
    assert_eq!(report["outcome"], "exited");
    assert_eq!(report["exit_code"], 4);
    assert_eq!(report["commit"], "0123456789abcdef0123456789abcdef01234567");
    assert_eq!(report["enforcement"]["seccomp"], true);
    let log = std::fs::read_to_string(dest.join(".agentlab/agent.log")).unwrap();
    assert!(log.contains("connected to unix:"), "{log}");
}
