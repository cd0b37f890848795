//! AF_VSOCK, through tokio-vsock. Used by the agent inside a guest and by agentlabd on
//! a Proxmox node (where the peer CID, assigned by the host, identifies the sandbox).

use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

use crate::ProtocolError;

/// Dials `cid:port`.
pub async fn connect(cid: u32, port: u32) -> Result<VsockStream, ProtocolError> {
    VsockStream::connect(VsockAddr::new(cid, port))
        .await
        .map_err(|e| ProtocolError::io(format!("vsock connect to CID {cid} port {port}"), e))
}

/// Listens on `port` for connections from any CID.
pub fn listen(port: u32) -> Result<VsockListener, ProtocolError> {
    VsockListener::bind(VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port)).map_err(|e| {
        ProtocolError::io(
            format!("vsock listen on port {port} (is the vhost_vsock module loaded? modprobe vhost_vsock)"),
            e,
        )
    })
}
