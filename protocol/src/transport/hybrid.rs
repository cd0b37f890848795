//! Hybrid vsock: vsock carried over Unix sockets by a userspace device
//! (vhost-device-vsock, Firecracker, Cloud Hypervisor).
//!
//! * A guest that connects to host port `P` arrives as a connection on the Unix socket
//!   `<uds>_P`, which the host must be listening on.
//! * The host reaches guest port `P` by connecting to `<uds>`, writing `CONNECT P\n`
//!   and reading one `OK ...\n` line. What follows `OK` differs between implementations
//!   (vhost-device-vsock 0.3.0 sends the guest port), so it is not interpreted.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::ProtocolError;

/// Longest reply line accepted after `CONNECT`.
const MAX_REPLY_LINE: usize = 64;

/// The socket a guest's connection to host port `port` arrives on.
pub fn guest_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut name = uds.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Listens for guest connections to host port `port`, replacing a stale socket file.
pub fn listen(uds: &Path, port: u32) -> Result<UnixListener, ProtocolError> {
    let path = guest_port_path(uds, port);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ProtocolError::io(format!("removing stale socket {}", path.display()), e));
        }
    }
    UnixListener::bind(&path).map_err(|e| ProtocolError::io(format!("listening on {}", path.display()), e))
}

/// Opens a host-initiated connection to guest port `port` through `uds`.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream, ProtocolError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|e| ProtocolError::io(format!("connecting to hybrid vsock socket {}", uds.display()), e))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| ProtocolError::io("sending CONNECT", e))?;
    // Byte by byte, so nothing after the reply line is consumed from the stream.
    let mut line = Vec::with_capacity(16);
    loop {
        let byte = stream.read_u8().await.map_err(|e| {
            ProtocolError::Hybrid(format!(
                "no reply to CONNECT {port} on {} ({e}): is a guest listening on port {port}?",
                uds.display()
            ))
        })?;
        if byte == b'\n' {
            break;
        }
        if line.len() == MAX_REPLY_LINE {
            return Err(ProtocolError::Hybrid(format!("reply to CONNECT {port} exceeds {MAX_REPLY_LINE} bytes")));
        }
        line.push(byte);
    }
    if line == b"OK" || line.starts_with(b"OK ") {
        Ok(stream)
    } else {
        Err(ProtocolError::Hybrid(format!(
            "CONNECT {port} refused on {}: {:?}",
            uds.display(),
            String::from_utf8_lossy(&line)
        )))
    }
}
