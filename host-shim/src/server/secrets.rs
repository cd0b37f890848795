//! Secrets requests.

use std::sync::Arc;

use super::error;
use crate::api::{ApiRequest, ApiResponse};
use crate::daemon::Daemon;

/// Secrets requests touch files and run age: off the async threads. Values go in,
/// names and sizes come out, never values.
pub(super) async fn request(daemon: &Arc<Daemon>, request: ApiRequest) -> ApiResponse {
    let daemon = daemon.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let store = &daemon.secrets;
        match request {
            ApiRequest::SecretSet { bundle, entry } => {
                let what = format!("{} {}", entry.kind.as_str(), entry.name);
                let view = store.set(&bundle, entry)?;
                tracing::info!("secrets: set {what} in bundle {bundle}");
                Ok(ApiResponse::Bundle(view))
            }
            ApiRequest::SecretRemove { bundle, entry } => {
                let removed = store.remove(&bundle, entry.as_ref().map(|(k, n)| (*k, n.as_str())))?;
                tracing::info!(
                    "secrets: removed {} from bundle {bundle}",
                    entry.as_ref().map_or("everything".into(), |(k, n)| format!("{} {n}", k.as_str()))
                );
                Ok(removed.map_or(ApiResponse::Done, ApiResponse::Bundle))
            }
            ApiRequest::SecretShow { bundle } => store.show(&bundle).map(ApiResponse::Bundle),
            ApiRequest::SecretList => store.list().map(ApiResponse::Bundles),
            _ => Ok(error("not a secrets request")),
        }
    })
    .await;
    match answer {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => error(e),
        Err(e) => error(format!("the secrets task failed: {e}")),
    }
}
