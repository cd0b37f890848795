//! The CLI's connection to agentlabd.

use std::path::Path;

use tokio::net::UnixStream;

use crate::api::{ApiRequest, ApiResponse, ClientConnection};

pub struct Client {
    conn: ClientConnection<UnixStream>,
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Client, String> {
        match UnixStream::connect(socket).await {
            Ok(stream) => Ok(Client { conn: ClientConnection::new(stream) }),
            Err(e) => Err(format!(
                "cannot reach agentlabd at {}: {e}. Is it running? Start it (systemctl start agentlabd, or `agentlabd --state-dir DIR` for a local one) or point --socket / AGENTLABD_SOCKET at its socket",
                socket.display()
            )),
        }
    }

    pub async fn send(&mut self, request: ApiRequest) -> Result<(), String> {
        self.conn.send(request).await.map_err(|e| format!("talking to agentlabd: {e}"))
    }

    pub async fn recv(&mut self) -> Result<ApiResponse, String> {
        match self.conn.recv().await {
            Ok(Some(ApiResponse::Error { message })) => Err(message),
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err("agentlabd closed the connection".to_owned()),
            Err(e) => Err(format!("talking to agentlabd: {e}")),
        }
    }

    pub async fn call(&mut self, request: ApiRequest) -> Result<ApiResponse, String> {
        self.send(request).await?;
        self.recv().await
    }
}

pub fn unexpected(response: ApiResponse) -> String {
    let name = match response {
        ApiResponse::Submitted { .. } => "Submitted",
        ApiResponse::Job(_) => "Job",
        ApiResponse::Jobs(_) => "Jobs",
        ApiResponse::Sandboxes(_) => "Sandboxes",
        ApiResponse::Profiles(_) => "Profiles",
        ApiResponse::Output { .. } => "Output",
        ApiResponse::Error { .. } => "Error",
        ApiResponse::Bundle(_) => "Bundle",
        ApiResponse::Bundles(_) => "Bundles",
        ApiResponse::Done => "Done",
        ApiResponse::Artifacts(_) => "Artifacts",
        ApiResponse::ArtifactData { .. } => "ArtifactData",
        ApiResponse::Artifact(_) => "Artifact",
        ApiResponse::Event(_) => "Event",
        ApiResponse::Message { .. } => "Message",
        ApiResponse::Sandbox(_) => "Sandbox",
        ApiResponse::Checks(_) => "Checks",
        ApiResponse::Phase { .. } => "Phase",
    };
    format!("agentlabd sent an unexpected {name} response; are agentlab and agentlabd the same version?")
}
