//! `agentlab host setup [--apply]`: prepares a Proxmox VE node for AgentLab in
//! idempotent steps (sandbox bridge, IPv4 forwarding, the nftables policy, DHCP,
//! vhost_vsock at boot, the agentlabd unit). Without `--apply` it only reports what each
//! step would do and whether it is already done. Every file it writes comes from the
//! repository's `host/` directory, embedded at build time.

mod execute;
mod params;
mod plan;

use std::path::PathBuf;
use std::process::ExitCode;

use execute::execute;
use params::SandboxNet;
use plan::plan;

#[derive(clap::Args, Debug)]
pub struct HostSetupArgs {
    /// Make the changes. Without it nothing is changed and each step says what it would do.
    #[arg(long)]
    pub apply: bool,
    /// The sandboxes' bridge.
    #[arg(long, default_value = "vmbr1")]
    pub bridge: String,
    /// The sandboxes' IPv4 subnet; the node takes its first address.
    #[arg(long, default_value = "10.77.0.0/16")]
    pub subnet: String,
    /// Write files under this directory instead of / and run no commands (for staging
    /// an image, and for tests).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
}

/// Host setup errors. Each names the cause and the fix.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum HostSetupError {
    /// --bridge {bridge:?} is not a usable interface name: use 1 to 15 letters, digits, '-', '_' or '.'
    BadBridge { bridge: String },
    /// --subnet {subnet} is not an IPv4 subnet like 10.77.0.0/16 (prefix length 8 to 28)
    BadSubnet { subnet: String },
    /// --subnet {subnet} has host bits set: did you mean {network}?
    SubnetNotNetwork { subnet: String, network: String },
    /// host setup --apply changes system files and services: run it as root (or pass --root DIR to stage the files elsewhere)
    NotRoot,
    /// {context} {path}: {source}
    Io { context: &'static str, path: String, source: std::io::Error },
    /// cannot run `{command}`: {source}; {fix}
    Spawn { command: String, source: std::io::Error, fix: String },
    /// `{command}` failed ({status}): {stderr}
    Command { command: String, status: String, stderr: String },
}

/// Runs `agentlab host setup`.
pub fn run(args: &HostSetupArgs) -> Result<ExitCode, String> {
    let net = SandboxNet::new(&args.bridge, &args.subnet).map_err(|e| e.to_string())?;
    let live = args.root == std::path::Path::new("/");
    if args.apply && live && !nix::unistd::geteuid().is_root() {
        return Err(HostSetupError::NotRoot.to_string());
    }
    let steps = plan(&net);
    let mut out = std::io::stdout().lock();
    execute(&steps, &args.root, args.apply, &mut out).map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}
