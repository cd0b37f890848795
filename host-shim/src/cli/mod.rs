//! `agentlab`, the operator's CLI. It talks to agentlabd over its Unix socket.

mod client;
mod render;
mod submit;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::api::{ApiRequest, ApiResponse};
use crate::config::DEFAULT_SOCKET;
use client::Client;

/// Exit code for failures of agentlab or agentlabd themselves (as `docker run` uses).
pub const EXIT_AGENTLAB_ERROR: u8 = 125;

#[derive(Parser)]
#[command(name = "agentlab", version, about = "Run AI coding agents and commands in disposable sandboxes")]
pub struct Cli {
    /// agentlabd's socket.
    #[arg(long, global = true, env = "AGENTLABD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Jobs: submit, inspect, list.
    #[command(subcommand)]
    Job(JobCommand),
    /// Sandboxes (the VMs jobs run in).
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Sandbox profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// This node: prepare it for AgentLab (needs no daemon).
    #[command(subcommand)]
    Host(HostCommand),
}

#[derive(Subcommand)]
enum HostCommand {
    /// Print, and with --apply perform, each idempotent step of preparing a Proxmox VE node.
    Setup(crate::hostsetup::HostSetupArgs),
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// List the daemon's profiles.
    List,
    /// Show one profile as the daemon loaded it (defaults filled in).
    Show { name: String },
    /// Check a profile file locally, without a daemon: every document, every key.
    Validate { file: PathBuf },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Run a command in a new sandbox.
    Submit(SubmitArgs),
    /// Show one job, with its recent events.
    Show { id: String },
    /// List recent jobs, newest first.
    List,
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// List sandboxes, newest first.
    List,
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Shell command to run in the sandbox (`/bin/sh -c CMD`, in /workspace).
    #[arg(long)]
    cmd: String,
    /// Local directory to copy into the sandbox's /workspace.
    #[arg(long)]
    repo: Option<PathBuf>,
    /// Wall-clock limit, like 90s, 10m or 2h (default: the daemon's, 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Stream the job's output and exit with its exit code.
    #[arg(long)]
    follow: bool,
    /// Sandbox profile (see `agentlab profile list`) [default: yolo-ephemeral].
    #[arg(long)]
    profile: Option<String>,
}

pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("agentlab: {message}");
            ExitCode::from(EXIT_AGENTLAB_ERROR)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode, String> {
    if let Command::Profile(ProfileCommand::Validate { file }) = &cli.command {
        return validate_profile_file(file, cli.json);
    }
    if let Command::Host(HostCommand::Setup(args)) = &cli.command {
        return crate::hostsetup::run(args);
    }
    let mut client = Client::connect(&cli.socket).await?;
    match cli.command {
        Command::Job(JobCommand::Submit(args)) => submit::submit(&mut client, args, cli.json).await,
        Command::Job(JobCommand::Show { id }) => match client.call(ApiRequest::JobShow { id }).await? {
            ApiResponse::Job(job) => {
                render::print(cli.json, &*job, || render::job_detail(&job));
                Ok(ExitCode::SUCCESS)
            }
            other => Err(client::unexpected(other)),
        },
        Command::Job(JobCommand::List) => match client.call(ApiRequest::JobList).await? {
            ApiResponse::Jobs(jobs) => {
                render::print(cli.json, &jobs, || render::job_table(&jobs));
                Ok(ExitCode::SUCCESS)
            }
            other => Err(client::unexpected(other)),
        },
        Command::Profile(ProfileCommand::Validate { .. }) => Err("unreachable: validated above".into()),
        Command::Host(_) => Err("unreachable: handled above".into()),
        Command::Profile(command) => match client.call(ApiRequest::ProfileList).await? {
            ApiResponse::Profiles(profiles) => match command {
                ProfileCommand::Show { name } => {
                    let Some(profile) = profiles.iter().find(|p| p.name == name) else {
                        let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
                        return Err(format!("no profile named `{name}` (known: {})", names.join(", ")));
                    };
                    render::print(cli.json, profile, || serde_norway::to_string(profile).unwrap_or_default());
                    Ok(ExitCode::SUCCESS)
                }
                _ => {
                    render::print(cli.json, &profiles, || render::profile_table(&profiles));
                    Ok(ExitCode::SUCCESS)
                }
            },
            other => Err(client::unexpected(other)),
        },
        Command::Sandbox(SandboxCommand::List) => match client.call(ApiRequest::SandboxList).await? {
            ApiResponse::Sandboxes(list) => {
                render::print(cli.json, &list, || render::sandbox_table(&list));
                Ok(ExitCode::SUCCESS)
            }
            other => Err(client::unexpected(other)),
        },
    }
}

fn validate_profile_file(file: &std::path::Path, json: bool) -> Result<ExitCode, String> {
    let profiles = crate::profile::load_file(file).map_err(|e| e.to_string())?;
    let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
    if json {
        println!("{}", serde_json::json!({ "file": file.display().to_string(), "profiles": names }));
    } else {
        println!("{}: {} valid profile(s): {}", file.display(), names.len(), names.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
