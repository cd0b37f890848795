//! AF_VSOCK, through tokio-vsock. Used by the agent inside a guest and by agentlabd on
//! a Proxmox node (where the peer CID, assigned by the host, identifies the sandbox).

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

use crate::ProtocolError;

/// Dials `cid:port`.
pub async fn connect(cid: u32, port: u32) -> Result<VsockConn, ProtocolError> {
    let what = || format!("vsock connect to CID {cid} port {port}");
    let stream = VsockStream::connect(VsockAddr::new(cid, port)).await.map_err(|e| ProtocolError::io(what(), e))?;
    VsockConn::new(OwnedFd::from(stream)).map_err(|e| ProtocolError::io(what(), e))
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

/// A connected stream socket that writes vectored. tokio-vsock's stream writes one
/// slice per call, so a data frame's head and data would leave the guest as two
/// virtio-vsock packets, each with its own trip through the device and its own credit;
/// with `writev` they leave as one.
#[derive(Debug)]
pub struct VsockConn(AsyncFd<OwnedFd>);

impl VsockConn {
    /// Takes over a connected, non-blocking stream socket.
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        // SAFETY: the AsyncFd owns the OwnedFd, which keeps the descriptor open and its
        // number unchanged until the AsyncFd is dropped; nothing else closes it.
        unsafe { AsyncFd::register(fd) }.map(Self).map_err(std::io::Error::from)
    }
}

impl AsyncRead for VsockConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for VsockConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::sys::uio::writev(fd.get_ref(), slices).map_err(std::io::Error::from)) {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(done) => return Poll::Ready(done),
                Err(_would_block) => {}
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let fd = self.0.get_ref().as_raw_fd();
        Poll::Ready(nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write).map_err(std::io::Error::from))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::{Read, Write};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A stream socket pair: the tests never open AF_VSOCK on the build machine, and
    /// nothing here depends on the address family.
    fn pair() -> (VsockConn, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (VsockConn::new(OwnedFd::from(ours)).unwrap(), theirs)
    }

    #[tokio::test]
    async fn one_vectored_write_takes_every_slice() {
        let (mut conn, mut peer) = pair();
        assert!(conn.is_write_vectored());
        let head = [1u8, 2, 3];
        let data = vec![7u8; 4096];
        let n = conn.write_vectored(&[IoSlice::new(&head), IoSlice::new(&data)]).await.unwrap();
        assert_eq!(n, head.len() + data.len(), "head and data in one call");
        conn.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, [&head[..], &data[..]].concat());
    }

    #[tokio::test]
    async fn reads_what_the_peer_wrote_and_sees_its_end() {
        let (mut conn, mut peer) = pair();
        let sent: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                peer.write_all(&sent).unwrap();
            })
        };
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        writer.join().unwrap();
        assert_eq!(got, sent);
    }
}
