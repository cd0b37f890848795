//! The wire protocol between `agentlabd` (host) and `agentlab-agent` (guest).
//!
//! Every message travels in a frame: a big-endian `u32` payload length followed by a
//! [postcard](https://docs.rs/postcard) payload. The length is checked against
//! [`MAX_FRAME_LEN`] before a single payload byte is buffered, so a hostile peer cannot
//! make the other side allocate more than that per connection.
//!
//! A connection opens with [`GuestMessage::Hello`] and [`HostMessage::HelloAck`] (or
//! [`HostMessage::HelloReject`]); both sides then speak the lower of their highest
//! supported versions. The `Hello`/`HelloAck`/`HelloReject` layouts are frozen: a later
//! protocol version adds new messages or capability bits, never new fields in them.

mod data_frame;
mod error;
mod frame;
mod handshake;
mod messages;
mod secret;
pub mod transport;

pub use data_frame::DataMessage;
pub use error::ProtocolError;
pub use frame::{Connection, FrameCodec, GuestConnection, HostConnection, decode_message, encode_message};
pub use handshake::{guest_handshake, host_handshake, negotiate_version};
pub use messages::*;
pub use secret::{GIT_TOKEN_ENV, MAX_BUNDLE_BYTES, MAX_SECRET_ENTRIES, MAX_SECRET_VALUE, SecretError};

/// The vsock port on the host (CID 2) that every agent dials.
pub const AGENT_VSOCK_PORT: u32 = 52_000;

/// Where the agent mounts the job's secrets tmpfs in the guest. The host names it in
/// the job's sandbox policy when the profile lets the job read its secret files.
pub const GUEST_SECRETS_DIR: &str = "/run/agentlab/secrets";

/// The vsock CID of the host, as seen from a guest.
pub const HOST_CID: u32 = 2;

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Largest frame payload either side accepts or sends: 1 MiB.
///
/// Chunked transfers use [`MAX_CHUNK_LEN`], far below it, so a frame over this limit
/// always means a broken or hostile peer.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Largest data chunk in a streamed transfer (output, workdir upload): 64 KiB.
pub const MAX_CHUNK_LEN: usize = 64 * 1024;

/// The most bytes a data frame carries before its data: the frame header and the
/// message's fields up to the data's length (pinned by a test).
pub const MAX_DATA_HEAD_LEN: usize = 32;

/// The data a sender puts in one chunk: with its head, a frame fits one virtio-vsock
/// packet (at most 64 KiB). A whole [`MAX_CHUNK_LEN`] would spill a few bytes into a
/// packet of their own, each with its own round of the device and credit.
pub const SEND_CHUNK_LEN: usize = MAX_CHUNK_LEN - MAX_DATA_HEAD_LEN;

/// How many chunks a sender may have in flight before it waits for an acknowledgement.
///
/// Together with [`MAX_CHUNK_LEN`] this bounds what a receiver must buffer (4 MiB) and is
/// what gives a slow host backpressure all the way into the job's pipes.
pub const CHUNK_WINDOW: u64 = 64;
