//! `agentlab-agent`: the guest half of AgentLab.
//!
//! As PID 1 of the micro image it sets the machine up, then runs one job session and
//! powers off. Elsewhere (a systemd image) `agentlab-agent run` does the session alone.
//! `agentlab-agent status` asks a running agent what it is doing; `agentlab-agent selftest`,
//! run as a job, shows what the job's sandbox blocks.

mod agentlog;
mod artifacts;
mod error;
mod init;
mod job;
mod link;
mod modules;
mod output;
mod sandbox;
mod secrets;
mod selftest;
mod session;
mod status;
mod sysinfo;
mod upload;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Where the running agent answers `agentlab-agent status`.
pub const STATUS_SOCKET: &str = "/run/agentlab/agent.sock";

#[derive(Parser)]
#[command(name = "agentlab-agent", version, about = "AgentLab guest agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dial the host, receive one job, run it, report, exit.
    Run(session::RunArgs),
    /// Show what the agent on this machine is doing.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The running agent's status socket.
        #[arg(long, default_value = STATUS_SOCKET)]
        socket: PathBuf,
    },
    /// Run as a job: attempt what the job's sandbox should block and print the outcomes.
    Selftest(selftest::SelftestArgs),
    /// Internal: sandbox this process as the JSON policy in the environment says, then exec the job.
    #[command(name = "sandbox-exec", hide = true)]
    SandboxExec {
        /// Pipe to report what was enforced on.
        #[arg(long)]
        report_fd: i32,
        /// The job's program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        // Like the Kata agent: PID 1 means we are the init of a micro image.
        init::run_as_pid1();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logging();
            match session::run_blocking(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { json, socket } => status::print_status(&socket, json),
        Command::Selftest(args) => selftest::run(&args),
        Command::SandboxExec { report_fd, command } => sandbox::launcher::run(report_fd, &command),
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(agentlog::Tee)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
}
