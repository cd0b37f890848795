//! The production channel on a Proxmox node: ONE AF_VSOCK listener on the agent port
//! for the whole daemon. Each sandbox registers the CID its VM was given (through
//! `args`); a connection is handed to the sandbox whose CID made it. The CID is set by
//! the host, so a guest cannot pose as another. Connections from CIDs nobody waits for
//! are closed. The listener is bound on first use, so a daemon that never runs a
//! vsock sandbox (the local backend, the tests' hybrid channel) never opens AF_VSOCK.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::mpsc;

use crate::agent_listener::BoxedStream;

/// Connections from one CID held for its sandbox before it takes them; more are
/// closed. The first is its agent's; the rest it refuses and records.
const QUEUED_PER_CID: usize = 4;

/// CID -> the sandbox that takes its connections.
#[derive(Default)]
pub struct Dispatcher {
    waiting: Mutex<HashMap<u32, mpsc::Sender<BoxedStream>>>,
}

impl Dispatcher {
    /// Takes `cid`'s connections until the registration is dropped; fails if another
    /// sandbox already does.
    pub fn register(self: &Arc<Self>, cid: u32) -> Result<Registration, String> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.contains_key(&cid) {
            return Err(format!("another sandbox already waits for vsock CID {cid}"));
        }
        let (tx, rx) = mpsc::channel(QUEUED_PER_CID);
        waiting.insert(cid, tx);
        Ok(Registration { cid, rx, dispatcher: self.clone() })
    }

    /// Hands a connection from `cid` to its sandbox; false (and the stream is dropped,
    /// closing it) if no sandbox has that CID or its queue is full.
    pub fn dispatch(&self, cid: u32, stream: BoxedStream) -> bool {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.get(&cid).is_some_and(|tx| tx.try_send(stream).is_ok())
    }
}

/// One sandbox's place in the dispatcher; leaving it (drop) frees the CID.
pub struct Registration {
    cid: u32,
    rx: mpsc::Receiver<BoxedStream>,
    dispatcher: Arc<Dispatcher>,
}

impl Registration {
    pub async fn accept(&mut self) -> std::io::Result<BoxedStream> {
        self.rx.recv().await.ok_or_else(|| std::io::Error::other("the vsock listener stopped"))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.dispatcher.waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.cid);
    }
}

static HUB: OnceLock<Result<Arc<Dispatcher>, String>> = OnceLock::new();

/// The daemon's vsock dispatcher, binding the AF_VSOCK listener the first time.
pub fn hub() -> Result<Arc<Dispatcher>, String> {
    HUB.get_or_init(|| {
        let listener = agentlab_protocol::transport::vsock::listen(agentlab_protocol::AGENT_VSOCK_PORT)
            .map_err(|e| e.to_string())?;
        let dispatcher = Arc::new(Dispatcher::default());
        let d = dispatcher.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, addr)) => {
                        if !d.dispatch(addr.cid(), Box::new(stream)) {
                            tracing::warn!(
                                "closed a vsock connection from CID {}: no sandbox has it, or its sandbox has {QUEUED_PER_CID} not taken yet",
                                addr.cid()
                            );
                        }
                    }
                    Err(e) => {
                        tracing::error!("vsock accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(dispatcher)
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn first_byte(stream: &mut BoxedStream) -> u8 {
        let mut buf = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(stream, &mut buf).await.unwrap();
        buf[0]
    }

    #[tokio::test]
    async fn connections_go_to_the_sandbox_of_their_cid_and_strangers_are_closed() {
        use tokio::io::AsyncWriteExt;
        let d = Arc::new(Dispatcher::default());
        let mut a = d.register(1001).unwrap();
        let mut b = d.register(1002).unwrap();
        assert!(d.register(1001).is_err(), "one sandbox per CID");
        let (x, mut x_peer) = tokio::net::UnixStream::pair().unwrap();
        let (y, mut y_peer) = tokio::net::UnixStream::pair().unwrap();
        let (z, mut z_peer) = tokio::net::UnixStream::pair().unwrap();
        x_peer.write_all(b"x").await.unwrap();
        y_peer.write_all(b"y").await.unwrap();
        assert!(d.dispatch(1002, Box::new(y)));
        assert!(d.dispatch(1001, Box::new(x)));
        assert!(!d.dispatch(1003, Box::new(z)), "nobody has 1003");
        let mut buf = [0u8; 1];
        assert_eq!(tokio::io::AsyncReadExt::read(&mut z_peer, &mut buf).await.unwrap(), 0, "closed");
        assert_eq!(first_byte(&mut a.accept().await.unwrap()).await, b'x');
        assert_eq!(first_byte(&mut b.accept().await.unwrap()).await, b'y');

        // Later connections from the same CID still reach its sandbox (which refuses
        // and records them), a bounded number at a time; accepting again never panics.
        let mut peers = Vec::new();
        for n in 0..QUEUED_PER_CID {
            let (w, mut w_peer) = tokio::net::UnixStream::pair().unwrap();
            w_peer.write_all(&[n as u8]).await.unwrap();
            assert!(d.dispatch(1001, Box::new(w)), "connection {n}");
            peers.push(w_peer);
        }
        let (over, mut over_peer) = tokio::net::UnixStream::pair().unwrap();
        assert!(!d.dispatch(1001, Box::new(over)), "the queue is full");
        assert_eq!(tokio::io::AsyncReadExt::read(&mut over_peer, &mut buf).await.unwrap(), 0, "closed");
        for n in 0..QUEUED_PER_CID {
            assert_eq!(first_byte(&mut a.accept().await.unwrap()).await, n as u8);
        }
        drop(a);
        assert!(d.register(1001).is_ok(), "a dropped registration frees its CID");
    }
}
