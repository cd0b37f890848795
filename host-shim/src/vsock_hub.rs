//! The production channel on a Proxmox node: ONE AF_VSOCK listener on the agent port
//! for the whole daemon. Each sandbox registers the CID its VM was given (through
//! `args`); a connection is handed to the sandbox whose CID made it. The CID is set by
//! the host, so a guest cannot pose as another. Connections from CIDs nobody waits for
//! are closed. The listener is bound on first use, so a daemon that never runs a
//! vsock sandbox (the local backend, the tests' hybrid channel) never opens AF_VSOCK.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::oneshot;

use crate::agent_listener::BoxedStream;

/// CID -> the sandbox waiting for its agent.
#[derive(Default)]
pub struct Dispatcher {
    waiting: Mutex<HashMap<u32, oneshot::Sender<BoxedStream>>>,
}

impl Dispatcher {
    /// Waits for `cid`'s agent; fails if another sandbox already waits for it.
    pub fn register(self: &Arc<Self>, cid: u32) -> Result<Registration, String> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.contains_key(&cid) {
            return Err(format!("another sandbox already waits for vsock CID {cid}"));
        }
        let (tx, rx) = oneshot::channel();
        waiting.insert(cid, tx);
        Ok(Registration { cid, rx, dispatcher: self.clone() })
    }

    /// Hands a connection from `cid` to whoever waits for it; false (and the stream is
    /// dropped, closing it) if nobody does.
    pub fn dispatch(&self, cid: u32, stream: BoxedStream) -> bool {
        let sender = self.waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(&cid);
        match sender {
            Some(tx) => tx.send(stream).is_ok(),
            None => false,
        }
    }
}

/// One sandbox's place in the dispatcher; leaving it (drop) stops the wait.
pub struct Registration {
    cid: u32,
    rx: oneshot::Receiver<BoxedStream>,
    dispatcher: Arc<Dispatcher>,
}

impl Registration {
    pub async fn accept(&mut self) -> std::io::Result<BoxedStream> {
        (&mut self.rx).await.map_err(|_| std::io::Error::other("the vsock listener stopped"))
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
                                "closed a vsock connection from CID {}, which no sandbox waits for",
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

    #[tokio::test]
    async fn connections_go_to_the_sandbox_of_their_cid_and_strangers_are_closed() {
        let d = Arc::new(Dispatcher::default());
        let mut a = d.register(1001).unwrap();
        let mut b = d.register(1002).unwrap();
        assert!(d.register(1001).is_err(), "one waiter per CID");
        let (x, _x_peer) = tokio::net::UnixStream::pair().unwrap();
        let (y, _y_peer) = tokio::net::UnixStream::pair().unwrap();
        let (z, mut z_peer) = tokio::net::UnixStream::pair().unwrap();
        assert!(d.dispatch(1002, Box::new(y)));
        assert!(d.dispatch(1001, Box::new(x)));
        assert!(!d.dispatch(1003, Box::new(z)), "nobody waits for 1003");
        let mut buf = [0u8; 1];
        assert_eq!(tokio::io::AsyncReadExt::read(&mut z_peer, &mut buf).await.unwrap(), 0, "closed");
        a.accept().await.unwrap();
        b.accept().await.unwrap();
        // A second connection from the same CID is refused: the sandbox took its one.
        let (w, _w_peer) = tokio::net::UnixStream::pair().unwrap();
        assert!(!d.dispatch(1001, Box::new(w)));
        drop(a);
        assert!(d.register(1001).is_ok(), "a dropped registration frees its CID");
    }
}
