//! Version negotiation: both sides speak the lower of their highest versions, if that
//! is still within both ranges.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    Capabilities, GuestConnection, GuestMessage, Hello, HelloAck, HostConnection, HostMessage, MIN_PROTOCOL_VERSION,
    MessageKind, PROTOCOL_VERSION, ProtocolError,
};

/// Picks the version two ranges share, preferring the newest one both speak.
pub fn negotiate_version(local: (u16, u16), peer: (u16, u16), fix: &'static str) -> Result<u16, ProtocolError> {
    let chosen = local.1.min(peer.1);
    if chosen < local.0 || chosen < peer.0 || peer.0 > peer.1 {
        return Err(ProtocolError::VersionMismatch {
            local_min: local.0,
            local_max: local.1,
            peer_min: peer.0,
            peer_max: peer.1,
            fix,
        });
    }
    Ok(chosen)
}

/// Host side: waits for the agent's Hello and answers it. On a version mismatch the
/// agent is told why before the error is returned.
pub async fn host_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut HostConnection<S>,
    sandbox_id: &str,
) -> Result<(Hello, HelloAck), ProtocolError> {
    let hello = match conn.recv_required("the agent's Hello").await? {
        GuestMessage::Hello(hello) => hello,
        other => {
            return Err(ProtocolError::Unexpected { expected: "Hello", got: other.kind().to_owned() });
        }
    };
    let fix = "rebuild the guest image with a matching agent (make image) or upgrade agentlabd";
    match negotiate_version((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), (hello.min_version, hello.max_version), fix) {
        Ok(version) => {
            let ack = HelloAck {
                version,
                capabilities: Capabilities::ALL.intersect(hello.capabilities),
                sandbox_id: sandbox_id.to_owned(),
            };
            conn.send(HostMessage::HelloAck(ack.clone())).await?;
            Ok((hello, ack))
        }
        Err(err) => {
            // Best effort: the agent should learn why it is being turned away.
            let _ = conn
                .send(HostMessage::HelloReject {
                    reason: err.to_string(),
                    min_version: MIN_PROTOCOL_VERSION,
                    max_version: PROTOCOL_VERSION,
                })
                .await;
            Err(err)
        }
    }
}

/// Guest side: sends Hello and waits for the host's answer.
pub async fn guest_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut GuestConnection<S>,
    hello: Hello,
) -> Result<HelloAck, ProtocolError> {
    let ours = (hello.min_version, hello.max_version);
    conn.send(GuestMessage::Hello(hello)).await?;
    match conn.recv_required("the host's HelloAck").await? {
        HostMessage::HelloAck(ack) => {
            if ack.version < ours.0 || ack.version > ours.1 {
                return Err(ProtocolError::VersionMismatch {
                    local_min: ours.0,
                    local_max: ours.1,
                    peer_min: ack.version,
                    peer_max: ack.version,
                    fix: "the host chose a version this agent does not speak; upgrade agentlabd",
                });
            }
            Ok(ack)
        }
        HostMessage::HelloReject { reason, min_version, max_version } => {
            Err(ProtocolError::Rejected { reason: format!("{reason} (host speaks {min_version}..={max_version})") })
        }
        other => Err(ProtocolError::Unexpected { expected: "HelloAck", got: other.kind().to_owned() }),
    }
}
