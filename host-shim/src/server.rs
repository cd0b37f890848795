//! Serves the CLI on the daemon's Unix socket (mode 0660).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use crate::api::{ApiRequest, ApiResponse, ServerConnection, SubmitRequest};
use crate::daemon::Daemon;
use crate::ids::new_id;
use crate::joblog::{LogProgress, LogReader};

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
                Ok(job) => ApiResponse::Job(Box::new(job)),
                Err(e) => error(e),
            },
            ApiRequest::JobList => match daemon.store.jobs(JOB_LIST_LIMIT) {
                Ok(jobs) => ApiResponse::Jobs(jobs),
                Err(e) => error(e),
            },
            ApiRequest::SandboxList => match daemon.store.sandboxes() {
                Ok(s) => ApiResponse::Sandboxes(s),
                Err(e) => error(e),
            },
            ApiRequest::ProfileList => ApiResponse::Profiles(daemon.profiles.all().cloned().collect()),
            ApiRequest::Follow { id, offset } => follow(&daemon, &mut conn, &id, offset).await?,
            ApiRequest::SecretSet { .. }
            | ApiRequest::SecretRemove { .. }
            | ApiRequest::SecretShow { .. }
            | ApiRequest::SecretList => secrets_request(&daemon, request).await,
            ApiRequest::ArtifactList { job } => match daemon.store.job(&job).and_then(|_| daemon.store.artifacts(&job))
            {
                Ok(list) => ApiResponse::Artifacts(list),
                Err(e) => error(e),
            },
            ApiRequest::ArtifactFetch { job, path } => fetch_artifact(&daemon, &mut conn, &job, &path).await?,
        };
        conn.send(reply).await?;
    }
    Ok(())
}

/// Secrets requests touch files and run age: off the async threads. Values go in,
/// names and sizes come out, never values.
async fn secrets_request(daemon: &Arc<Daemon>, request: ApiRequest) -> ApiResponse {
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

/// Streams one stored artifact. Only paths the database knows are served, and never
/// through a symlink.
async fn fetch_artifact(
    daemon: &Daemon,
    conn: &mut ServerConnection<UnixStream>,
    job: &str,
    path: &str,
) -> Result<ApiResponse, agentlab_protocol::ProtocolError> {
    use std::os::unix::fs::OpenOptionsExt;
    use tokio::io::AsyncReadExt;
    let list = match daemon.store.job(job).and_then(|_| daemon.store.artifacts(job)) {
        Ok(list) => list,
        Err(e) => return Ok(error(e)),
    };
    let Some(view) = list.into_iter().find(|a| a.path == path) else {
        return Ok(error(format!("job {job} has no artifact {path:?}; `agentlab job artifacts {job}` lists them")));
    };
    let file_path = daemon.config.job_dir(job).join("artifacts").join(&view.path);
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&file_path);
    let mut file = match file {
        Ok(f) => tokio::fs::File::from_std(f),
        Err(e) => return Ok(error(format!("reading {}: {e}", file_path.display()))),
    };
    let mut buf = vec![0u8; agentlab_protocol::MAX_CHUNK_LEN];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => return Ok(error(format!("reading {}: {e}", file_path.display()))),
        };
        if n == 0 {
            break;
        }
        conn.send(ApiResponse::ArtifactData { data: buf[..n].to_vec() }).await?;
    }
    Ok(ApiResponse::Artifact(view))
}

fn error(e: impl ToString) -> ApiResponse {
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

/// Streams a job's stored and live output from `offset`, then its final view.
async fn follow(
    daemon: &Daemon,
    conn: &mut ServerConnection<UnixStream>,
    id: &str,
    offset: u64,
) -> Result<ApiResponse, agentlab_protocol::ProtocolError> {
    if let Err(e) = daemon.store.job(id) {
        return Ok(error(e));
    }
    let path = daemon.config.job_dir(id).join("output.log");
    let mut progress = daemon.live_log(id).map(|log| log.subscribe());
    let mut reader = match LogReader::open(&path, offset) {
        Ok(r) => Some(r),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Ok(error(format!("reading {}: {e}", path.display()))),
    };
    loop {
        let now = match progress.as_mut() {
            Some(rx) => *rx.borrow_and_update(),
            None => LogProgress { len: std::fs::metadata(&path).map_or(0, |m| m.len()), closed: true },
        };
        if let Some(reader) = reader.as_mut() {
            loop {
                match reader.next_record(now.len) {
                    Ok(Some((stream, data))) => conn.send(ApiResponse::Output { stream, data }).await?,
                    Ok(None) => break,
                    Err(e) => return Ok(error(format!("reading {}: {e}", path.display()))),
                }
            }
        }
        if now.closed {
            break;
        }
        if let Some(rx) = progress.as_mut()
            && rx.changed().await.is_err()
        {
            // The runner dropped the log: everything is on disk now.
            progress = None;
        }
    }
    Ok(match daemon.store.job(id) {
        Ok(job) => ApiResponse::Job(Box::new(job)),
        Err(e) => error(e),
    })
}
