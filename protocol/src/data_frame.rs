//! Frames for bulk data sent from a buffer of its own: the sender writes a small head
//! and then the data, so the data is never copied into a frame buffer. Under TCG a
//! copy of every output byte costs as much as the socket write itself.

use crate::frame::{HEADER_LEN, frame_header};
use crate::{GuestMessage, OutputChunk, OutputStream, ProtocolError};

/// A guest message whose last field is a byte string (the data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataMessage {
    /// [`GuestMessage::Output`].
    Output { seq: u64, stream: OutputStream },
    /// [`GuestMessage::ArtifactChunk`].
    ArtifactChunk { seq: u64 },
}

impl DataMessage {
    /// The frame header and every message byte before the data, for data of
    /// `data_len` bytes: `head ++ data` is exactly
    /// [`encode_message`](crate::encode_message) of the whole message.
    pub(crate) fn frame_head(self, data_len: usize) -> Result<Vec<u8>, ProtocolError> {
        let empty = match self {
            DataMessage::Output { seq, stream } => GuestMessage::Output(OutputChunk { seq, stream, data: Vec::new() }),
            DataMessage::ArtifactChunk { seq } => GuestMessage::ArtifactChunk { seq, data: Vec::new() },
        };
        // Postcard writes a byte string as its varint length and the bytes, and the
        // data is the message's last field: the empty message ends in the varint 0,
        // which becomes the real length.
        let mut payload = postcard::to_allocvec(&empty).map_err(ProtocolError::Encode)?;
        if payload.pop() != Some(0) {
            // Unreachable while the data stays the last field (the tests pin it).
            return Err(ProtocolError::Encode(postcard::Error::SerdeSerCustom));
        }
        let payload = postcard::to_extend(&data_len, payload).map_err(ProtocolError::Encode)?;
        let header = frame_header(payload.len() + data_len)?;
        let mut head = Vec::with_capacity(HEADER_LEN + payload.len());
        head.extend_from_slice(&header);
        head.extend_from_slice(&payload);
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;
    use crate::{MAX_DATA_HEAD_LEN, MAX_FRAME_LEN, SEND_CHUNK_LEN, encode_message};

    fn joined(message: DataMessage, data: &[u8]) -> Vec<u8> {
        let mut frame = message.frame_head(data.len()).unwrap();
        frame.extend_from_slice(data);
        frame
    }

    #[test]
    fn head_and_data_are_the_whole_message_at_every_varint_boundary() {
        for len in [0, 1, 127, 128, 16_383, 16_384, 65_536, MAX_FRAME_LEN - 20] {
            let data = vec![0xa5; len];
            for seq in [0, 127, 128, u64::MAX] {
                let output = DataMessage::Output { seq, stream: OutputStream::Stderr };
                let whole = GuestMessage::Output(OutputChunk { seq, stream: OutputStream::Stderr, data: data.clone() });
                assert_eq!(joined(output, &data), encode_message(&whole).unwrap(), "output, {len} bytes, seq {seq}");
                let chunk = DataMessage::ArtifactChunk { seq };
                let whole = GuestMessage::ArtifactChunk { seq, data: data.clone() };
                assert_eq!(joined(chunk, &data), encode_message(&whole).unwrap(), "artifact, {len} bytes, seq {seq}");
            }
        }
    }

    #[test]
    fn a_send_chunk_with_its_head_fits_one_vsock_packet_whatever_the_sequence_number() {
        for seq in [0, u64::MAX] {
            for message in
                [DataMessage::Output { seq, stream: OutputStream::Stdout }, DataMessage::ArtifactChunk { seq }]
            {
                let head = message.frame_head(SEND_CHUNK_LEN).unwrap().len();
                assert!(head <= MAX_DATA_HEAD_LEN, "{message:?}: a head of {head} bytes");
            }
        }
        // The largest head, for the record: 4 (length) + 1 (variant) + 10 (seq) + 1 (stream) + 3 (data length).
        let widest = DataMessage::Output { seq: u64::MAX, stream: OutputStream::Stderr };
        assert_eq!(widest.frame_head(SEND_CHUNK_LEN).unwrap().len(), 19);
    }

    #[test]
    fn data_over_the_frame_limit_is_refused() {
        let err = DataMessage::ArtifactChunk { seq: 1 }.frame_head(MAX_FRAME_LEN).unwrap_err();
        assert!(
            matches!(err, ProtocolError::OutgoingTooLarge { len, max: MAX_FRAME_LEN } if len == MAX_FRAME_LEN + 5),
            "{err:?}"
        );
    }

    proptest! {
        #[test]
        fn any_output_chunk_encodes_the_same_either_way(seq: u64, stderr: bool, data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let stream = if stderr { OutputStream::Stderr } else { OutputStream::Stdout };
            let whole = GuestMessage::Output(OutputChunk { seq, stream, data: data.clone() });
            prop_assert_eq!(joined(DataMessage::Output { seq, stream }, &data), encode_message(&whole).unwrap());
        }
    }
}
