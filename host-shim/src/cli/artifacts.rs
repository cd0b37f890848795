//! `agentlab job artifacts`: list a job's artifacts, or download them and check each
//! against the SHA-256 recorded when it was stored.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use sha2::{Digest, Sha256};

use super::client::{Client, unexpected};
use super::render;
use crate::api::{ApiRequest, ApiResponse, ArtifactView};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ArtifactsArgs {
    /// The job whose artifacts to list.
    id: Option<String>,
    #[command(subcommand)]
    command: Option<ArtifactsCommand>,
}

#[derive(clap::Subcommand)]
enum ArtifactsCommand {
    /// Download a job's artifacts, verifying each checksum.
    Download {
        id: String,
        /// Where to put them [default: ./artifacts-JOB].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only this artifact (its path as listed).
        #[arg(long)]
        name: Option<String>,
    },
}

pub async fn run(client: &mut Client, args: ArtifactsArgs, json: bool) -> Result<ExitCode, String> {
    match (args.id, args.command) {
        (Some(id), None) => {
            let list = list(client, &id).await?;
            render::print(json, &list, || table(&list));
            Ok(ExitCode::SUCCESS)
        }
        (None, Some(ArtifactsCommand::Download { id, out, name })) => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("artifacts-{id}")));
            let mut wanted = list(client, &id).await?;
            if let Some(name) = &name {
                wanted.retain(|a| &a.path == name);
                if wanted.is_empty() {
                    return Err(format!("job {id} has no artifact {name:?}; `agentlab job artifacts {id}` lists them"));
                }
            }
            let mut done = Vec::new();
            for artifact in &wanted {
                done.push(download(client, &id, artifact, &out).await?);
            }
            render::print(json, &done, || {
                done.iter().fold(String::new(), |mut text, (a, path)| {
                    let _ = writeln!(text, "{}  {:>10}  sha256 ok  {}", a.sha256, a.bytes, path.display());
                    text
                })
            });
            Ok(ExitCode::SUCCESS)
        }
        _ => Err("name a job: `agentlab job artifacts ID` or `agentlab job artifacts download ID`".into()),
    }
}

async fn list(client: &mut Client, id: &str) -> Result<Vec<ArtifactView>, String> {
    match client.call(ApiRequest::ArtifactList { job: id.to_owned() }).await? {
        ApiResponse::Artifacts(list) => Ok(list),
        other => Err(unexpected(other)),
    }
}

/// Fetches one artifact into `out`, through a temporary file that is renamed into place
/// only when its SHA-256 matches the record.
async fn download(
    client: &mut Client,
    job: &str,
    artifact: &ArtifactView,
    out: &Path,
) -> Result<(ArtifactView, PathBuf), String> {
    // The daemon only serves recorded paths; this keeps them inside `out` all the same.
    if Path::new(&artifact.path).components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("refusing artifact path {:?}: it is not a plain relative path", artifact.path));
    }
    let target = out.join(&artifact.path);
    let parent = target.parent().unwrap_or(out);
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let partial = target.with_extension("agentlab-partial");
    let mut file = std::fs::File::create(&partial).map_err(|e| format!("creating {}: {e}", partial.display()))?;
    let mut hasher = Sha256::new();
    client.send(ApiRequest::ArtifactFetch { job: job.to_owned(), path: artifact.path.clone() }).await?;
    let recorded = loop {
        match client.recv().await {
            Ok(ApiResponse::ArtifactData { data }) => {
                hasher.update(&data);
                file.write_all(&data).map_err(|e| format!("writing {}: {e}", partial.display()))?;
            }
            Ok(ApiResponse::Artifact(view)) => break view,
            Ok(other) => {
                let _ = std::fs::remove_file(&partial);
                return Err(unexpected(other));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        }
    };
    let got = hex::encode(hasher.finalize());
    if got != recorded.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(format!(
            "artifact {} of job {job} is corrupt: its SHA-256 is {got}, the record says {}; nothing was written",
            artifact.path, recorded.sha256
        ));
    }
    file.sync_all().map_err(|e| format!("writing {}: {e}", partial.display()))?;
    std::fs::rename(&partial, &target).map_err(|e| format!("writing {}: {e}", target.display()))?;
    Ok((recorded, target))
}

fn table(list: &[ArtifactView]) -> String {
    let mut out = format!("{:>10}  {:<64}  {}\n", "BYTES", "SHA256", "PATH");
    for a in list {
        let _ = writeln!(out, "{:>10}  {:<64}  {}", a.bytes, a.sha256, a.path);
    }
    out
}
