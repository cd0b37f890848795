//! Receives the workdir as a tar stream in acknowledged chunks and unpacks it.

use std::path::Path;

use agentlab_protocol::{GuestConnection, GuestMessage, HostMessage, MessageKind};
use tokio::io::AsyncWriteExt;
use tokio_util::io::SyncIoBridge;

use crate::error::AgentError;
use crate::session::Stream;

/// Bytes buffered between the channel and the unpacker.
const PIPE_BYTES: usize = 256 * 1024;

pub async fn receive<S: Stream>(conn: &mut GuestConnection<S>, total: u64, workdir: &Path) -> Result<(), AgentError> {
    let (mut sink, source) = tokio::io::duplex(PIPE_BYTES);
    let reader = SyncIoBridge::new(source);
    let dir = workdir.to_owned();
    let unpacker = tokio::task::spawn_blocking(move || {
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        // unpack() refuses entries that would land outside `dir` (`..`, absolute paths,
        // paths through symlinks).
        archive.unpack(&dir)
    });

    let mut received: u64 = 0;
    let mut next_seq: u64 = 0;
    let mut sink_open = true;
    while received < total {
        let msg = conn.recv_required("a workdir chunk").await?;
        let HostMessage::WorkdirChunk { seq, data } = msg else {
            return Err(AgentError::Upload(format!("expected a workdir chunk, got {}", msg.kind())));
        };
        if seq != next_seq {
            return Err(AgentError::Upload(format!("chunk {seq} arrived where {next_seq} was due")));
        }
        received += data.len() as u64;
        if received > total {
            return Err(AgentError::Upload(format!("received {received} bytes, more than the announced {total}")));
        }
        // The unpacker stops at the end-of-archive marker and may drop its end early;
        // the remaining padding is then acknowledged and discarded.
        if sink_open && sink.write_all(&data).await.is_err() {
            sink_open = false;
        }
        conn.send(GuestMessage::WorkdirAck { seq }).await?;
        next_seq += 1;
    }
    drop(sink);
    match unpacker.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(AgentError::Upload(format!("unpacking into {}: {e}", workdir.display()))),
        Err(e) => Err(AgentError::Upload(format!("unpacker died: {e}"))),
    }
}
