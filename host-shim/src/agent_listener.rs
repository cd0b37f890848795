//! Accepting a sandbox's one agent connection on its [`ChannelEndpoint`]: hybrid
//! vsock (a Unix socket per sandbox) or AF_VSOCK (the daemon's one listener, by CID).

use agentlab_protocol::AGENT_VSOCK_PORT;
use agentlab_protocol::transport::hybrid;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;

use crate::backend::ChannelEndpoint;
use crate::vsock_hub::{self, Registration};

/// A byte stream to an agent, whatever carried it.
pub trait AgentStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AgentStream for T {}
pub type BoxedStream = Box<dyn AgentStream>;

pub enum AgentListener {
    Hybrid(UnixListener),
    Vsock(Registration),
}

impl AgentListener {
    /// Starts listening; call before the VM starts, since the agent dials at once.
    pub fn listen(endpoint: &ChannelEndpoint) -> Result<AgentListener, String> {
        match endpoint {
            ChannelEndpoint::Hybrid { uds } => {
                let listener = hybrid::listen(uds, AGENT_VSOCK_PORT).map_err(|e| e.to_string())?;
                Ok(AgentListener::Hybrid(listener))
            }
            ChannelEndpoint::Vsock { cid } => Ok(AgentListener::Vsock(vsock_hub::hub()?.register(*cid)?)),
        }
    }

    pub async fn accept(&mut self) -> std::io::Result<BoxedStream> {
        match self {
            AgentListener::Hybrid(listener) => Ok(Box::new(listener.accept().await?.0)),
            AgentListener::Vsock(registration) => registration.accept().await,
        }
    }
}
