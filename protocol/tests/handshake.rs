//! The handshake over a real byte stream, and hybrid-vsock CONNECT against a fake device.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use agentlab_protocol::transport::hybrid;
use agentlab_protocol::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn hello(min: u16, max: u16) -> Hello {
    Hello {
        min_version: min,
        max_version: max,
        capabilities: Capabilities::ALL,
        agent_version: "test".into(),
        kernel_release: "test".into(),
        landlock_abi: 0,
    }
}

#[tokio::test]
async fn matching_versions_agree() {
    let (host_io, guest_io) = tokio::io::duplex(4096);
    let host = tokio::spawn(async move {
        let mut conn = HostConnection::new(host_io);
        host_handshake(&mut conn, "sb-abc").await
    });
    let mut guest = GuestConnection::new(guest_io);
    let ack = guest_handshake(&mut guest, hello(1, 1)).await.unwrap();
    assert_eq!(ack.version, 1);
    assert_eq!(ack.sandbox_id, "sb-abc");
    assert_eq!(ack.capabilities, Capabilities::ALL);
    let (got_hello, host_ack) = host.await.unwrap().unwrap();
    assert_eq!(got_hello, hello(1, 1));
    assert_eq!(host_ack, ack);
}

#[tokio::test]
async fn newer_agent_falls_back_to_the_hosts_version() {
    let (host_io, guest_io) = tokio::io::duplex(4096);
    let host = tokio::spawn(async move { host_handshake(&mut HostConnection::new(host_io), "sb").await });
    let ack = guest_handshake(&mut GuestConnection::new(guest_io), hello(1, 9)).await.unwrap();
    assert_eq!(ack.version, PROTOCOL_VERSION);
    host.await.unwrap().unwrap();
}

#[tokio::test]
async fn version_mismatch_is_a_clear_error_on_both_sides() {
    let (host_io, guest_io) = tokio::io::duplex(4096);
    let host = tokio::spawn(async move { host_handshake(&mut HostConnection::new(host_io), "sb").await });
    let guest_err = guest_handshake(&mut GuestConnection::new(guest_io), hello(7, 9)).await.unwrap_err();
    let host_err = host.await.unwrap().unwrap_err();
    assert_eq!(
        host_err.to_string(),
        "protocol version mismatch: this side speaks 1..=1, the peer 7..=9; rebuild the guest image with a matching agent (make image) or upgrade agentlabd"
    );
    assert_eq!(guest_err.to_string(), format!("the host rejected the handshake: {host_err} (host speaks 1..=1)"));
}

#[tokio::test]
async fn a_host_that_hangs_up_is_reported_with_what_was_awaited() {
    let (host_io, guest_io) = tokio::io::duplex(4096);
    drop(host_io);
    let err = guest_handshake(&mut GuestConnection::new(guest_io), hello(1, 1)).await.unwrap_err();
    assert!(
        matches!(err, ProtocolError::Io { .. } | ProtocolError::Closed { waiting_for: "the host's HelloAck" }),
        "{err}"
    );
}

#[tokio::test]
async fn host_refuses_a_first_message_that_is_not_hello() {
    let (host_io, guest_io) = tokio::io::duplex(4096);
    let host = tokio::spawn(async move { host_handshake(&mut HostConnection::new(host_io), "sb").await });
    let mut guest = GuestConnection::new(guest_io);
    guest.send(GuestMessage::JobStarted { pid: 1 }).await.unwrap();
    let err = host.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "unexpected message: waiting for Hello, got JobStarted");
}

#[tokio::test]
async fn hybrid_listen_uses_the_port_suffixed_path_and_connect_speaks_connect() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    assert_eq!(hybrid::guest_port_path(&uds, 52000), dir.path().join("vsock.sock_52000"));

    // A guest-initiated connection arrives on <uds>_<port>.
    let listener = hybrid::listen(&uds, 52000).unwrap();
    let mut client = tokio::net::UnixStream::connect(dir.path().join("vsock.sock_52000")).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // A host-initiated connection: a fake device answers CONNECT, then the bytes after
    // the OK line belong to the guest and must not be swallowed.
    let device = tokio::net::UnixListener::bind(&uds).unwrap();
    let fake = tokio::spawn(async move {
        let (mut s, _) = device.accept().await.unwrap();
        let mut line = vec![0; "CONNECT 1234\n".len()];
        s.read_exact(&mut line).await.unwrap();
        assert_eq!(line, b"CONNECT 1234\n");
        s.write_all(b"OK 1073741824\nfirst-guest-bytes").await.unwrap();
        s
    });
    let mut stream = hybrid::connect(&uds, 1234).await.unwrap();
    let mut rest = vec![0; "first-guest-bytes".len()];
    stream.read_exact(&mut rest).await.unwrap();
    assert_eq!(rest, b"first-guest-bytes");
    drop(fake.await.unwrap());
}

#[tokio::test]
async fn hybrid_connect_reports_a_refusal_and_a_missing_device() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let err = hybrid::connect(&uds, 5).await.unwrap_err();
    assert!(err.to_string().starts_with(&format!("connecting to hybrid vsock socket {}", uds.display())), "{err}");

    let device = tokio::net::UnixListener::bind(&uds).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = device.accept().await.unwrap();
        let mut line = [0; 10];
        s.read_exact(&mut line).await.unwrap();
        s.write_all(b"NO\n").await.unwrap();
    });
    let err = hybrid::connect(&uds, 5).await.unwrap_err();
    assert_eq!(err.to_string(), format!("hybrid vsock: CONNECT 5 refused on {}: \"NO\"", uds.display()));
}
