//! Length-prefixed postcard frames, as a tokio-util codec and a typed connection.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed};

use crate::{GuestMessage, HostMessage, MAX_FRAME_LEN, ProtocolError};

const HEADER_LEN: usize = 4;

/// Encodes one message as a complete frame (header and payload).
pub fn encode_message<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let payload = postcard::to_stdvec(msg).map_err(ProtocolError::Encode)?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::OutgoingTooLarge { len: payload.len(), max: MAX_FRAME_LEN });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    // The length fits: it was just checked against MAX_FRAME_LEN, far below u32::MAX.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes one frame payload. Trailing bytes are an error: a message is exactly its frame.
pub fn decode_message<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtocolError> {
    if payload.is_empty() {
        return Err(ProtocolError::EmptyFrame);
    }
    let (msg, rest) =
        postcard::take_from_bytes(payload).map_err(|source| ProtocolError::Decode { len: payload.len(), source })?;
    if !rest.is_empty() {
        return Err(ProtocolError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

/// A codec that reads frames of `In` and writes frames of `Out`.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self { _types: PhantomData }
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, ProtocolError> {
        let Some(header) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        // Checked before buffering the payload: nothing is reserved for an oversized frame.
        if len > MAX_FRAME_LEN {
            return Err(ProtocolError::FrameTooLarge { len, max: MAX_FRAME_LEN });
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(len);
        decode_message(&payload).map(Some)
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = ProtocolError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let frame = encode_message(&item)?;
        dst.reserve(frame.len());
        dst.put_slice(&frame);
        Ok(())
    }
}

/// A typed, framed, bidirectional channel over any byte stream.
pub struct Connection<S, In, Out> {
    framed: Framed<S, FrameCodec<In, Out>>,
}

/// The host's end: receives [`GuestMessage`]s, sends [`HostMessage`]s.
pub type HostConnection<S> = Connection<S, GuestMessage, HostMessage>;
/// The guest's end: receives [`HostMessage`]s, sends [`GuestMessage`]s.
pub type GuestConnection<S> = Connection<S, HostMessage, GuestMessage>;

impl<S, In, Out> Connection<S, In, Out>
where
    S: AsyncRead + AsyncWrite + Unpin,
    In: DeserializeOwned,
    Out: Serialize,
{
    pub fn new(stream: S) -> Self {
        Self { framed: Framed::new(stream, FrameCodec::default()) }
    }

    /// Sends one message and flushes it.
    pub async fn send(&mut self, msg: Out) -> Result<(), ProtocolError> {
        self.framed.send(msg).await
    }

    /// Queues one message without flushing; call [`Self::flush`] after a batch.
    pub async fn feed(&mut self, msg: Out) -> Result<(), ProtocolError> {
        self.framed.feed(msg).await
    }

    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        SinkExt::<Out>::flush(&mut self.framed).await
    }

    /// The next message, or `None` on a clean end of stream.
    pub async fn recv(&mut self) -> Result<Option<In>, ProtocolError> {
        self.framed.next().await.transpose()
    }

    /// The next message; end of stream is an error naming what was awaited.
    pub async fn recv_required(&mut self, waiting_for: &'static str) -> Result<In, ProtocolError> {
        self.recv().await?.ok_or(ProtocolError::Closed { waiting_for })
    }

    pub fn get_ref(&self) -> &S {
        self.framed.get_ref()
    }

    pub fn into_inner(self) -> S {
        self.framed.into_inner()
    }
}
