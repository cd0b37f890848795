//! Serves the CLI on the daemon's Unix socket (mode 0660).

mod artifacts;
mod logs;
mod secrets;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use crate::api::{ApiRequest, ApiResponse, ServerConnection, SubmitRequest};
use crate::daemon::Daemon;
use crate::ids::new_id;
use crate::leases;

const JOB_LIST_LIMIT: usize = 200;

/// Binds the API socket: refuses to steal it from a live daemon, replaces a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another agentlabd is already serving {}; stop it or use another --socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

pub async fn serve(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(daemon, stream).await {
                        tracing::debug!("API connection ended: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("accepting an API connection: {e}"),
        }
    }
}

async fn handle(daemon: Arc<Daemon>, stream: UnixStream) -> Result<(), agentlab_protocol::ProtocolError> {
    let mut conn = ServerConnection::new(stream);
    while let Some(request) = conn.recv().await? {
        let reply = match request {
            ApiRequest::Submit(req) => submit(&daemon, &mut conn, req).await?,
            ApiRequest::UploadChunk { .. } => error("upload data without a submission"),
            ApiRequest::JobShow { id } => match daemon.store.job(&id) {
                Ok(mut job) => {
                    job.queue = daemon.admission.describe(&job.id);
                    ApiResponse::Job(Box::new(job))
                }
                Err(e) => error(e),
            },
            ApiRequest::JobList => match daemon.store.jobs(JOB_LIST_LIMIT) {
                Ok(mut jobs) => {
                    for job in &mut jobs {
                        job.queue = daemon.admission.describe(&job.id);
                    }
                    ApiResponse::Jobs(jobs)
                }
                Err(e) => error(e),
            },
            ApiRequest::SandboxList => match daemon.store.sandboxes() {
                Ok(s) => ApiResponse::Sandboxes(s),
                Err(e) => error(e),
            },
            ApiRequest::ProfileList => ApiResponse::Profiles(daemon.profiles.all().cloned().collect()),
            ApiRequest::Logs { id, offset, tail_lines, follow } => {
                logs::logs(&daemon, &mut conn, &id, offset, tail_lines, follow).await?
            }
            ApiRequest::Events { job, after, follow } => {
                logs::events(&daemon, &mut conn, job.as_deref(), after, follow).await?
            }
            ApiRequest::Cancel { id } => match daemon.cancel(&id) {
                Ok(text) => ApiResponse::Message { text },
                Err(e) => error(e),
            },
            ApiRequest::SandboxShow { id } => match daemon.store.sandbox(&id) {
                Ok(view) => ApiResponse::Sandbox(Box::new(view)),
                Err(e) => error(e),
            },
            ApiRequest::LeaseRenew { id, ttl_ms } => {
                match leases::renew(&daemon, &id, std::time::Duration::from_millis(ttl_ms)) {
                    Ok(view) => ApiResponse::Sandbox(Box::new(view)),
                    Err(e) => error(e),
                }
            }
            ApiRequest::SandboxDestroy { id, force } => match leases::destroy(&daemon, &id, force).await {
                Ok(text) => ApiResponse::Message { text },
                Err(e) => error(e),
            },
            ApiRequest::Doctor => ApiResponse::Checks(crate::doctor::run(&daemon).await),
            ApiRequest::SandboxPrune => {
                let done = leases::prune(&daemon).await;
                let text =
                    if done.is_empty() { "no sandbox is kept after its job".to_owned() } else { done.join("\n") };
                ApiResponse::Message { text }
            }
            ApiRequest::SecretSet { .. }
            | ApiRequest::SecretRemove { .. }
            | ApiRequest::SecretShow { .. }
            | ApiRequest::SecretList => secrets::request(&daemon, request).await,
            ApiRequest::ArtifactList { job } => match daemon.store.job(&job).and_then(|_| daemon.store.artifacts(&job))
            {
                Ok(list) => ApiResponse::Artifacts(list),
                Err(e) => error(e),
            },
            ApiRequest::ArtifactFetch { job, path } => artifacts::fetch(&daemon, &mut conn, &job, &path).await?,
        };
        conn.send(reply).await?;
    }
    Ok(())
}

pub(super) fn error(e: impl ToString) -> ApiResponse {
    ApiResponse::Error { message: e.to_string() }
}

async fn submit(
    daemon: &Arc<Daemon>,
    conn: &mut ServerConnection<UnixStream>,
    req: SubmitRequest,
) -> Result<ApiResponse, agentlab_protocol::ProtocolError> {
    let profile = match daemon.validate(&req) {
        Ok(profile) => profile,
        Err(e) => return Ok(error(e)),
    };
    let upload = match req.repo_bytes {
        None => None,
        Some(total) => {
            let path = daemon.upload_path(&new_id("upload"));
            match receive_upload(conn, &path, total).await {
                Ok(()) => Some(path),
                Err(message) => {
                    let _ = std::fs::remove_file(&path);
                    return Ok(ApiResponse::Error { message });
                }
            }
        }
    };
    Ok(match daemon.submit(req, profile, upload.clone()) {
        Ok((job_id, sandbox_id)) => ApiResponse::Submitted { job_id, sandbox_id },
        Err(e) => {
            if let Some(path) = upload {
                let _ = std::fs::remove_file(path);
            }
            error(e)
        }
    })
}

async fn receive_upload(conn: &mut ServerConnection<UnixStream>, path: &Path, total: u64) -> Result<(), String> {
    let mut file = tokio::fs::File::create(path).await.map_err(|e| format!("storing the repo upload: {e}"))?;
    let mut received = 0u64;
    while received < total {
        match conn.recv().await {
            Ok(Some(ApiRequest::UploadChunk { data })) => {
                received += data.len() as u64;
                if received > total {
                    return Err(format!("the repo upload sent more than the announced {total} bytes"));
                }
                file.write_all(&data).await.map_err(|e| format!("storing the repo upload: {e}"))?;
            }
            Ok(Some(_)) => return Err("the repo upload was interrupted by another request".into()),
            Ok(None) | Err(_) => {
                return Err(format!("the client went away after {received} of {total} upload bytes"));
            }
        }
    }
    file.sync_all().await.map_err(|e| format!("storing the repo upload: {e}"))?;
    Ok(())
}
