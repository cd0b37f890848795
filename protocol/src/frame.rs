//! Length-prefixed postcard frames, as a tokio-util codec and a typed connection.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed};
use zeroize::Zeroize;

use crate::{GuestMessage, HostMessage, MAX_FRAME_LEN, ProtocolError};

pub(crate) const HEADER_LEN: usize = 4;

/// Encodes one message as a complete frame (header and payload), in one allocation of
/// exactly the frame's size: no growing buffer leaves a stale copy of the payload.
pub fn encode_message<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let len = postcard::experimental::serialized_size(msg).map_err(ProtocolError::Encode)?;
    let header = frame_header(len)?;
    let mut out = vec![0u8; HEADER_LEN + len];
    out[..HEADER_LEN].copy_from_slice(&header);
    postcard::to_slice(msg, &mut out[HEADER_LEN..]).map_err(ProtocolError::Encode)?;
    Ok(out)
}

/// The header of a frame whose payload is `len` bytes; a payload over
/// [`MAX_FRAME_LEN`] is refused.
pub(crate) fn frame_header(len: usize) -> Result<[u8; HEADER_LEN], ProtocolError> {
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::OutgoingTooLarge { len, max: MAX_FRAME_LEN });
    }
    // The length fits: it was just checked against MAX_FRAME_LEN, far below u32::MAX.
    Ok((len as u32).to_be_bytes())
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
        let mut payload = src.split_to(len);
        let decoded = decode_message(&payload);
        // Frames may carry secrets: the decoded message owns its copy, so the read
        // buffer's is wiped at once (a few microseconds per 64 KiB chunk).
        payload.as_mut().zeroize();
        decoded.map(Some)
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = ProtocolError;

    /// Serialises straight into the write buffer. Nothing secret comes this way:
    /// secrets go through [`Connection::send_secret`], which bypasses the codec.
    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let len = postcard::experimental::serialized_size(&item).map_err(ProtocolError::Encode)?;
        let header = frame_header(len)?;
        let start = dst.len();
        dst.reserve(HEADER_LEN + len);
        dst.put_slice(&header);
        dst.resize(start + HEADER_LEN + len, 0);
        if let Err(e) = postcard::to_slice(&item, &mut dst[start + HEADER_LEN..]) {
            dst.truncate(start);
            return Err(ProtocolError::Encode(e));
        }
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

    /// Sends a message that carries secrets: encoded into a buffer of its own, written
    /// straight to the stream (the codec's write buffer would keep a copy after the
    /// flush), and wiped once written. The message itself is dropped (and, with its
    /// [`crate::SecretBytes`], wiped) before this returns.
    pub async fn send_secret(&mut self, msg: Out) -> Result<(), ProtocolError> {
        use tokio::io::AsyncWriteExt;
        SinkExt::<Out>::flush(&mut self.framed).await?;
        let frame = zeroize::Zeroizing::new(encode_message(&msg)?);
        drop(msg);
        let stream = self.framed.get_mut();
        stream.write_all(&frame).await.map_err(|e| ProtocolError::io("sending secrets", e))?;
        stream.flush().await.map_err(|e| ProtocolError::io("sending secrets", e))?;
        Ok(())
    }

    /// Sends a [`crate::DataMessage`] with its data as a small head and the data itself,
    /// in one vectored write where the stream supports it: the data is not copied into
    /// a frame. Not wiped: use it for nothing secret.
    pub async fn send_data_frame(&mut self, msg: crate::DataMessage, data: &[u8]) -> Result<(), ProtocolError> {
        use bytes::Buf;
        use tokio::io::AsyncWriteExt;
        let head = msg.frame_head(data.len())?;
        SinkExt::<Out>::flush(&mut self.framed).await?;
        let stream = self.framed.get_mut();
        stream
            .write_all_buf(&mut head.as_slice().chain(data))
            .await
            .map_err(|e| ProtocolError::io("sending a frame", e))?;
        Ok(())
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
