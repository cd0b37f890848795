//! Serving stored artifacts.

use tokio::net::UnixStream;

use super::error;
use crate::api::{ApiResponse, ServerConnection};
use crate::daemon::Daemon;

/// Streams one stored artifact. Only paths the database knows are served, and never
/// through a symlink.
pub(super) async fn fetch(
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
