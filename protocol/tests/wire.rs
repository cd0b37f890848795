//! Frames and messages: round trips, and every way a hostile peer can break a frame.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use agentlab_protocol::*;
use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn hello() -> Hello {
    Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Capabilities::ALL,
        agent_version: "0.1.0".into(),
        kernel_release: "6.1.0-40-amd64".into(),
        landlock_abi: 2,
    }
}

fn all_guest_messages() -> Vec<GuestMessage> {
    vec![
        GuestMessage::Hello(hello()),
        GuestMessage::WorkdirAck { seq: 7 },
        GuestMessage::JobStarted { pid: 42 },
        GuestMessage::Output(OutputChunk { seq: 3, stream: OutputStream::Stderr, data: b"x\0y\n".to_vec() }),
        GuestMessage::JobFinished(JobResult {
            outcome: JobOutcome::TimedOut { signal: 15 },
            duration_ms: 1500,
            output_bytes: 9,
            enforcement: Enforcement {
                landlock_abi: 2,
                landlock_fs: true,
                landlock_net: false,
                landlock_scope: false,
                seccomp: true,
                no_new_privs: true,
                user: "agent".into(),
                uid: 1000,
                notes: vec!["network: Landlock ABI 2 < 4, TCP is blocked by seccomp instead".into()],
            },
        }),
        GuestMessage::JobFinished(JobResult {
            outcome: JobOutcome::Exited { code: 3 },
            duration_ms: 1,
            output_bytes: 0,
            enforcement: Enforcement::default(),
        }),
        GuestMessage::JobFinished(JobResult {
            outcome: JobOutcome::Signaled { signal: 9 },
            duration_ms: 1,
            output_bytes: 0,
            enforcement: Enforcement::default(),
        }),
        GuestMessage::JobFinished(JobResult {
            outcome: JobOutcome::Cancelled { signal: 15 },
            duration_ms: 1,
            output_bytes: 0,
            enforcement: Enforcement::default(),
        }),
        GuestMessage::JobFinished(JobResult {
            outcome: JobOutcome::SpawnFailed { reason: "no such file".into() },
            duration_ms: 0,
            output_bytes: 0,
            enforcement: Enforcement::default(),
        }),
        GuestMessage::AgentError { reason: "bad tar".into() },
        GuestMessage::RequestSecrets,
        GuestMessage::ArtifactChunk { seq: 3, data: vec![0; 512] },
        GuestMessage::ArtifactsDone(ArtifactSummary {
            bytes: 10240,
            sha256: [7; 32],
            skipped: vec!["out/big.bin: over the 1048576-byte artifact cap".into()],
        }),
    ]
}

fn all_host_messages() -> Vec<HostMessage> {
    vec![
        HostMessage::HelloAck(HelloAck { version: 1, capabilities: Capabilities(3), sandbox_id: "sb-1".into() }),
        HostMessage::HelloReject { reason: "too old".into(), min_version: 2, max_version: 3 },
        HostMessage::Job(JobSpec {
            job_id: "job-1".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hi".into()],
            env: vec![("A".into(), "b".into())],
            workdir: "/workspace".into(),
            timeout_ms: 10_000,
            kill_grace_ms: 2_000,
            workdir_upload_bytes: Some(10240),
            sandbox: SandboxSpec::default(),
        }),
        HostMessage::Job(JobSpec {
            job_id: "job-2".into(),
            program: "claude".into(),
            args: Vec::new(),
            env: Vec::new(),
            workdir: "/workspace".into(),
            timeout_ms: 0,
            kill_grace_ms: 0,
            workdir_upload_bytes: None,
            sandbox: SandboxSpec {
                landlock: LandlockMode::BestEffort,
                user: "nobody".into(),
                read_only_paths: vec!["/opt/tools".into()],
                read_write_paths: vec!["/var/cache/x".into()],
                secrets_dir: Some("/run/agentlab/secrets".into()),
                network_off: false,
                rlimits: Rlimits { nofile: 64, nproc: 16, fsize_mb: Some(10), cpu_seconds: Some(60), core_dumps: true },
            },
        }),
        HostMessage::Job(JobSpec {
            job_id: "job-3".into(),
            program: "/bin/true".into(),
            args: Vec::new(),
            env: Vec::new(),
            workdir: "/workspace".into(),
            timeout_ms: 0,
            kill_grace_ms: 0,
            workdir_upload_bytes: None,
            sandbox: SandboxSpec { landlock: LandlockMode::Off, ..SandboxSpec::default() },
        }),
        HostMessage::WorkdirChunk { seq: 0, data: vec![1; 100] },
        HostMessage::OutputAck { seq: 9 },
        HostMessage::Cancel,
        HostMessage::Shutdown,
        HostMessage::Secrets(SecretBundle::default()),
        HostMessage::Secrets(SecretBundle {
            name: "default".into(),
            entries: vec![
                SecretEntry { kind: SecretKind::Env, name: "API_KEY".into(), value: SecretBytes::copy_from(b"sk-1") },
                SecretEntry {
                    kind: SecretKind::File,
                    name: "settings.json".into(),
                    value: SecretBytes::copy_from(b"{\"k\": 1}\n"),
                },
                SecretEntry {
                    kind: SecretKind::GitToken,
                    name: GIT_TOKEN_ENV.into(),
                    value: SecretBytes::copy_from(b"ghp"),
                },
            ],
        }),
        HostMessage::SecretsRefused { reason: "already delivered".into() },
        HostMessage::CollectArtifacts(ArtifactRequest { globs: vec!["out/**".into()], max_bytes: 1 << 29 }),
        HostMessage::ArtifactAck { seq: 4 },
        HostMessage::ResumeJob { job_id: "job-1".into(), stored_through: Some(41) },
        HostMessage::ResumeJob { job_id: "job-2".into(), stored_through: None },
    ]
}

fn decode_all<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<Vec<T>, ProtocolError> {
    let mut codec = FrameCodec::<T, ()>::default();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(msg) = codec.decode(&mut buf)? {
        out.push(msg);
    }
    Ok(out)
}

#[test]
fn every_guest_message_round_trips() {
    for msg in all_guest_messages() {
        let frame = encode_message(&msg).unwrap();
        assert_eq!(u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
        assert_eq!(decode_all::<GuestMessage>(&frame).unwrap(), vec![msg]);
    }
}

#[test]
fn every_host_message_round_trips() {
    for msg in all_host_messages() {
        let frame = encode_message(&msg).unwrap();
        assert_eq!(decode_all::<HostMessage>(&frame).unwrap(), vec![msg]);
    }
}

#[test]
fn codec_encoder_writes_the_same_frame() {
    let mut codec = FrameCodec::<(), HostMessage>::default();
    let mut buf = BytesMut::new();
    codec.encode(HostMessage::Shutdown, &mut buf).unwrap();
    assert_eq!(&buf[..], &encode_message(&HostMessage::Shutdown).unwrap()[..]);
}

#[test]
fn truncated_frame_waits_for_more_and_never_yields_a_partial_message() {
    let frame = encode_message(&all_guest_messages()[3]).unwrap();
    for cut in 0..frame.len() {
        let mut codec = FrameCodec::<GuestMessage, ()>::default();
        let mut buf = BytesMut::from(&frame[..cut]);
        assert!(codec.decode(&mut buf).unwrap().is_none(), "cut at {cut}");
        buf.extend_from_slice(&frame[cut..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(all_guest_messages()[3].clone()));
    }
}

#[test]
fn oversized_frame_is_refused_from_its_header_alone() {
    let mut codec = FrameCodec::<GuestMessage, ()>::default();
    let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, ProtocolError::FrameTooLarge { len, max } if len == u32::MAX as usize && max == MAX_FRAME_LEN)
    );
    assert_eq!(
        err.to_string(),
        "peer sent a frame of 4294967295 bytes, over the 1048576-byte limit: the peer is broken or hostile, so the session is closed"
    );
    // Nothing was reserved for the payload it announced.
    assert!(buf.capacity() < 1024);
}

#[test]
fn frame_at_exactly_the_limit_is_accepted_by_the_framing() {
    let mut codec = FrameCodec::<HostMessage, ()>::default();
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&(MAX_FRAME_LEN as u32).to_be_bytes());
    buf.extend_from_slice(&vec![0xff; MAX_FRAME_LEN]);
    // Framing accepts it; the payload is garbage, which is a decode error, not a size error.
    assert!(matches!(codec.decode(&mut buf), Err(ProtocolError::Decode { len, .. }) if len == MAX_FRAME_LEN));
}

#[test]
fn sending_an_oversized_message_is_refused() {
    let msg = HostMessage::WorkdirChunk { seq: 0, data: vec![0; MAX_FRAME_LEN] };
    assert!(matches!(encode_message(&msg), Err(ProtocolError::OutgoingTooLarge { .. })));
}

#[test]
fn garbage_frames_are_decode_errors() {
    for payload in [&[0xffu8, 0xff, 0xff][..], &[0x03, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]] {
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        let err = decode_all::<GuestMessage>(&frame).unwrap_err();
        assert!(matches!(err, ProtocolError::Decode { .. }), "{err}");
    }
}

#[test]
fn empty_frame_is_an_error() {
    assert!(matches!(decode_all::<GuestMessage>(&[0, 0, 0, 0]), Err(ProtocolError::EmptyFrame)));
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut payload = postcard::to_stdvec(&HostMessage::Shutdown).unwrap();
    payload.push(0);
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    assert!(matches!(decode_all::<HostMessage>(&frame), Err(ProtocolError::TrailingBytes { extra: 1 })));
}

#[test]
fn unknown_variants_are_rejected() {
    // Variant indexes are varints: GuestMessage has 9 variants, HostMessage 12.
    for (index, is_guest) in [(9u8, true), (12u8, false), (200u8, true)] {
        let frame = [0, 0, 0, 1, index];
        let res = if is_guest {
            decode_all::<GuestMessage>(&frame).map(|_| ())
        } else {
            decode_all::<HostMessage>(&frame).map(|_| ())
        };
        assert!(matches!(res, Err(ProtocolError::Decode { len: 1, .. })), "index {index}");
    }
}

#[test]
fn version_negotiation_picks_the_lower_max() {
    assert_eq!(negotiate_version((1, 3), (2, 5), "fix").unwrap(), 3);
    assert_eq!(negotiate_version((1, 3), (1, 1), "fix").unwrap(), 1);
    let err = negotiate_version((2, 3), (1, 1), "upgrade it").unwrap_err();
    assert_eq!(err.to_string(), "protocol version mismatch: this side speaks 2..=3, the peer 1..=1; upgrade it");
    assert!(negotiate_version((1, 1), (2, 3), "fix").is_err());
    assert!(negotiate_version((1, 3), (3, 2), "fix").is_err(), "an inverted range is refused");
}

proptest! {
    #[test]
    fn output_chunks_survive_any_split(data in proptest::collection::vec(any::<u8>(), 0..4096),
                                       seq in any::<u64>(),
                                       splits in proptest::collection::vec(0usize..5000, 0..8)) {
        let msgs = vec![
            GuestMessage::Output(OutputChunk { seq, stream: OutputStream::Stdout, data: data.clone() }),
            GuestMessage::WorkdirAck { seq },
        ];
        let mut wire = Vec::new();
        for m in &msgs { wire.extend(encode_message(m).unwrap()); }
        let mut points: Vec<usize> = splits.into_iter().map(|s| s % (wire.len() + 1)).collect();
        points.sort_unstable();
        let mut codec = FrameCodec::<GuestMessage, ()>::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut last = 0;
        for p in points.into_iter().chain(std::iter::once(wire.len())) {
            buf.extend_from_slice(&wire[last..p]);
            last = p;
            while let Some(m) = codec.decode(&mut buf).unwrap() { got.push(m); }
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_all::<GuestMessage>(&bytes);
        let _ = decode_all::<HostMessage>(&bytes);
    }
}

/// `serde_bytes` on data fields changes speed, not the wire: the same bytes as a plain
/// `Vec<u8>` field, so agents and hosts built before it interoperate.
#[test]
fn byte_fields_encode_exactly_as_plain_vectors() {
    #[derive(serde::Serialize)]
    struct PlainChunk {
        seq: u64,
        stream: OutputStream,
        data: Vec<u8>,
    }
    #[derive(serde::Serialize)]
    enum PlainGuest {
        _Hello(Hello),
        _WorkdirAck { seq: u64 },
        _JobStarted { pid: u32 },
        Output(PlainChunk),
    }
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let ours =
        encode_message(&GuestMessage::Output(OutputChunk { seq: 5, stream: OutputStream::Stdout, data: data.clone() }))
            .unwrap();
    let plain = encode_message(&PlainGuest::Output(PlainChunk { seq: 5, stream: OutputStream::Stdout, data })).unwrap();
    assert_eq!(ours, plain);
}
