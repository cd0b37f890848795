//! `agentlab`, the operator's CLI. It talks to agentlabd over its Unix socket.

mod artifacts;
mod client;
mod doctor;
mod logs;
mod render;
mod secrets;
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
    /// A job's output: stored, the last lines, or live (`--follow`).
    Logs(logs::LogsArgs),
    /// State changes and other events, of one job or all.
    Events(logs::EventsArgs),
    /// Check every prerequisite and say how to fix what is missing.
    Doctor,
    /// Secrets bundles: stored encrypted by agentlabd, delivered once to each sandbox.
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
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
    /// Stop a job (SIGTERM, then SIGKILL after the grace); a queued job never starts.
    Cancel { id: String },
    /// A job's artifacts: list them, or `download` them (checksums verified).
    Artifacts(artifacts::ArtifactsArgs),
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// List sandboxes, newest first.
    List,
    /// One sandbox: state, lease, events.
    Show { id: String },
    /// The sandbox's lease.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Destroy a sandbox kept after its job (--force: one running a job too).
    Destroy {
        id: String,
        #[arg(long)]
        force: bool,
    },
    /// Destroy every sandbox kept after its job.
    Prune,
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// Make the lease end DURATION from now.
    Renew {
        id: String,
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
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
    /// The sandbox's lease, like 30m or 8h, after which it is stopped and destroyed
    /// [default: the profile's behavior.ttl_minutes_default].
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Keep the sandbox after the job, until its lease ends or `agentlab sandbox destroy`.
    #[arg(long)]
    keepalive: bool,
    /// With --follow: no progress (spinner or phase lines) on stderr.
    #[arg(long, short)]
    quiet: bool,
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
    if let Command::Doctor = &cli.command {
        return doctor::run(&cli.socket, cli.json).await;
    }
    if let Command::Host(HostCommand::Setup(args)) = &cli.command {
        return crate::hostsetup::run(args);
    }
    let mut client = Client::connect(&cli.socket).await?;
    match cli.command {
        Command::Job(JobCommand::Submit(args)) => submit::submit(&mut client, args, cli.json).await,
        Command::Secrets(command) => secrets::run(&mut client, command, cli.json).await,
        Command::Job(JobCommand::Artifacts(args)) => artifacts::run(&mut client, args, cli.json).await,
        Command::Job(JobCommand::Cancel { id }) => match client.call(ApiRequest::Cancel { id }).await? {
            ApiResponse::Message { text } => print_message(cli.json, &text),
            other => Err(client::unexpected(other)),
        },
        Command::Sandbox(SandboxCommand::Show { id }) => match client.call(ApiRequest::SandboxShow { id }).await? {
            ApiResponse::Sandbox(view) => {
                render::print(cli.json, &*view, || render::sandbox_detail(&view));
                Ok(ExitCode::SUCCESS)
            }
            other => Err(client::unexpected(other)),
        },
        Command::Sandbox(SandboxCommand::Lease(LeaseCommand::Renew { id, ttl })) => {
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            match client.call(ApiRequest::LeaseRenew { id, ttl_ms }).await? {
                ApiResponse::Sandbox(view) => {
                    render::print(cli.json, &*view, || render::sandbox_detail(&view));
                    Ok(ExitCode::SUCCESS)
                }
                other => Err(client::unexpected(other)),
            }
        }
        Command::Sandbox(SandboxCommand::Destroy { id, force }) => {
            match client.call(ApiRequest::SandboxDestroy { id, force }).await? {
                ApiResponse::Message { text } => print_message(cli.json, &text),
                other => Err(client::unexpected(other)),
            }
        }
        Command::Sandbox(SandboxCommand::Prune) => match client.call(ApiRequest::SandboxPrune).await? {
            ApiResponse::Message { text } => print_message(cli.json, &text),
            other => Err(client::unexpected(other)),
        },
        Command::Logs(args) => logs::logs(&mut client, args, cli.json).await,
        Command::Events(args) => logs::events(&mut client, args, cli.json).await,
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
        Command::Profile(ProfileCommand::Validate { .. }) | Command::Doctor | Command::Host(_) => {
            Err("unreachable: handled above".into())
        }
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

fn print_message(json: bool, text: &str) -> Result<ExitCode, String> {
    render::print(json, &serde_json::json!({ "message": text }), || format!("{text}\n"));
    Ok(ExitCode::SUCCESS)
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
