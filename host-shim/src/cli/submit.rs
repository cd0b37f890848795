//! `agentlab job submit`: send the job (and the repo as a tar stream), optionally
//! follow its output, and exit with its exit code.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::ExitCode;

use agentlab_protocol::MAX_CHUNK_LEN;

use super::SubmitArgs;
use super::client::{Client, unexpected};
use crate::api::{ApiRequest, ApiResponse, MAX_REPO_BYTES, SubmitRequest};

pub async fn submit(client: &mut Client, args: SubmitArgs, json: bool) -> Result<ExitCode, String> {
    let repo = match &args.repo {
        Some(path) => Some(pack_repo(path).await?),
        None => None,
    };
    let request = SubmitRequest {
        command: args.cmd,
        timeout_ms: args.timeout.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        repo_label: args
            .repo
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()).display().to_string()),
        repo_bytes: repo.as_ref().map(|(_, len)| *len),
        profile: args.profile.clone(),
        ttl_ms: args.ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        keepalive: args.keepalive.then_some(true),
    };
    client.send(ApiRequest::Submit(request)).await?;
    if let Some((mut file, _)) = repo {
        let mut buf = vec![0u8; MAX_CHUNK_LEN];
        loop {
            let n = file.read(&mut buf).map_err(|e| format!("reading the packed repo: {e}"))?;
            if n == 0 {
                break;
            }
            client.send(ApiRequest::UploadChunk { data: buf[..n].to_vec() }).await?;
        }
    }
    let (job_id, sandbox_id) = match client.recv().await? {
        ApiResponse::Submitted { job_id, sandbox_id } => (job_id, sandbox_id),
        other => return Err(unexpected(other)),
    };
    if !args.follow {
        if json {
            println!("{}", serde_json::json!({ "job_id": job_id, "sandbox_id": sandbox_id }));
        } else {
            println!("{job_id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let request = ApiRequest::Logs { id: job_id.clone(), offset: 0, tail_lines: None, follow: true };
    let progress = super::logs::Progress::choose(args.quiet, json);
    super::logs::follow_output(client, &job_id, request, json, progress).await
}

/// Packs a directory into a temporary tar file; returns it rewound, with its size.
async fn pack_repo(path: &Path) -> Result<(std::fs::File, u64), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("--repo {}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Err(format!("--repo {} is not a directory: pass the repository's top directory", path.display()));
    }
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let file = tempfile::tempfile().map_err(|e| format!("creating a temporary file for the repo: {e}"))?;
        let mut builder = tar::Builder::new(file);
        builder.follow_symlinks(false);
        builder.append_dir_all(".", &path).map_err(|e| format!("packing --repo {}: {e}", path.display()))?;
        let mut file = builder.into_inner().map_err(|e| format!("packing --repo {}: {e}", path.display()))?;
        let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
        if len > MAX_REPO_BYTES {
            return Err(format!(
                "--repo {} packs to {len} bytes, over the {MAX_REPO_BYTES}-byte limit: clone it in the job instead",
                path.display()
            ));
        }
        file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        Ok((file, len))
    })
    .await
    .map_err(|e| format!("packing the repo: {e}"))?
}
