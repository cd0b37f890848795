//! `agentlab`: the CLI.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = agentlab_host::cli::Cli::parse();
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(agentlab_host::cli::run(cli)),
        Err(e) => {
            eprintln!("agentlab: cannot start the async runtime: {e}");
            ExitCode::from(agentlab_host::cli::EXIT_AGENTLAB_ERROR)
        }
    }
}
