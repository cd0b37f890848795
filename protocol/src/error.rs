use std::io;

/// Everything that can go wrong on an AgentLab channel.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ProtocolError {
    /// peer sent a frame of {len} bytes, over the {max}-byte limit: the peer is broken or hostile, so the session is closed
    FrameTooLarge { len: usize, max: usize },
    /// refusing to send a {len}-byte message, over the {max}-byte frame limit
    OutgoingTooLarge { len: usize, max: usize },
    /// peer sent an empty frame: the session is closed
    EmptyFrame,
    /// peer sent an undecodable {len}-byte message ({source}): it is broken, hostile or speaks another protocol
    Decode { len: usize, source: postcard::Error },
    /// peer sent a message with {extra} unexpected trailing bytes
    TrailingBytes { extra: usize },
    /// could not encode a message: {0}
    Encode(postcard::Error),
    /// connection closed by the peer while waiting for {waiting_for}
    Closed { waiting_for: &'static str },
    /// protocol version mismatch: this side speaks {local_min}..={local_max}, the peer {peer_min}..={peer_max}; {fix}
    VersionMismatch { local_min: u16, local_max: u16, peer_min: u16, peer_max: u16, fix: &'static str },
    /// the host rejected the handshake: {reason}
    Rejected { reason: String },
    /// unexpected message: waiting for {expected}, got {got}
    Unexpected { expected: &'static str, got: String },
    /// hybrid vsock: {0}
    Hybrid(String),
    /// {context}: {source}
    Io { context: String, source: io::Error },
}

impl ProtocolError {
    /// Wraps an I/O error with what was being done when it happened.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

impl From<io::Error> for ProtocolError {
    fn from(source: io::Error) -> Self {
        Self::io("channel i/o", source)
    }
}
