//! `agentlab secrets`: values go from stdin (or a file) to agentlabd, which encrypts
//! them; nothing ever prints a value back. A value never appears on the command line,
//! where `ps` and shell history would show it.

use std::fmt::Write as _;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use agentlab_protocol::{GIT_TOKEN_ENV, MAX_SECRET_VALUE, SecretBytes, SecretEntry, SecretKind};
use zeroize::Zeroizing;

use super::client::{Client, unexpected};
use super::render;
use crate::api::{ApiRequest, ApiResponse, BundleView};

#[derive(clap::Subcommand)]
pub enum SecretsCommand {
    /// Add or replace a secret. Env values and git tokens are read from stdin.
    Set {
        #[command(flatten)]
        target: EntryArgs,
        /// A file secret: NAME=PATH reads PATH here and stores it as NAME.
        #[arg(long, value_name = "NAME=PATH", conflicts_with_all = ["env", "git_token"])]
        file: Option<String>,
    },
    /// List bundles and what they hold (names and sizes, never values).
    List,
    /// Show one bundle's entries (names and sizes, never values).
    Show { bundle: String },
    /// Remove one secret, or the whole bundle if none is named.
    Rm {
        #[command(flatten)]
        target: EntryArgs,
        /// Remove this file secret.
        #[arg(long, value_name = "NAME", conflicts_with_all = ["env", "git_token"])]
        file: Option<String>,
        /// Remove the whole bundle.
        #[arg(long, conflicts_with_all = ["env", "git_token", "file"])]
        all: bool,
    },
}

#[derive(clap::Args)]
pub struct EntryArgs {
    /// The bundle (profiles name theirs in `secrets_bundle`).
    #[arg(long, default_value = "default")]
    bundle: String,
    /// An environment variable of the job.
    #[arg(long, value_name = "NAME", conflicts_with = "git_token")]
    env: Option<String>,
    /// The git token (the job sees it as GIT_TOKEN).
    #[arg(long)]
    git_token: bool,
}

pub async fn run(client: &mut Client, command: SecretsCommand, json: bool) -> Result<ExitCode, String> {
    let request = match command {
        SecretsCommand::Set { target, file } => {
            let entry = match (target.env, target.git_token, file) {
                (Some(name), false, None) => stdin_entry(SecretKind::Env, name)?,
                (None, true, None) => stdin_entry(SecretKind::GitToken, GIT_TOKEN_ENV.to_owned())?,
                (None, false, Some(spec)) => file_entry(&spec)?,
                _ => return Err("say what to set: --env NAME, --git-token or --file NAME=PATH".into()),
            };
            if entry.value.len() < agentlab_redact::MIN_SECRET_LEN {
                eprintln!(
                    "agentlab: warning: {} is {} bytes; values under {} bytes are too short to redact from job output safely",
                    entry.name,
                    entry.value.len(),
                    agentlab_redact::MIN_SECRET_LEN
                );
            }
            ApiRequest::SecretSet { bundle: target.bundle, entry }
        }
        SecretsCommand::Rm { target, file, all } => {
            let entry = match (target.env, target.git_token, file, all) {
                (Some(name), false, None, false) => Some((SecretKind::Env, name)),
                (None, true, None, false) => Some((SecretKind::GitToken, GIT_TOKEN_ENV.to_owned())),
                (None, false, Some(name), false) => Some((SecretKind::File, name)),
                (None, false, None, true) => None,
                _ => {
                    return Err(
                        "say what to remove: --env NAME, --git-token, --file NAME, or --all for the bundle".into()
                    );
                }
            };
            ApiRequest::SecretRemove { bundle: target.bundle, entry }
        }
        SecretsCommand::List => ApiRequest::SecretList,
        SecretsCommand::Show { bundle } => ApiRequest::SecretShow { bundle },
    };
    match client.call(request).await? {
        ApiResponse::Bundle(view) => render::print(json, &view, || bundle_detail(&view)),
        ApiResponse::Bundles(list) => render::print(json, &list, || bundle_table(&list)),
        ApiResponse::Done => render::print(json, &serde_json::json!({ "removed": true }), || "removed\n".to_owned()),
        other => return Err(unexpected(other)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a value from stdin: hidden when typed at a terminal; one trailing newline
/// (as `echo` adds) is dropped.
fn stdin_entry(kind: SecretKind, name: String) -> Result<SecretEntry, String> {
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let _echo_off = if interactive {
        eprint!("value for {name} (not shown; end with Enter): ");
        EchoOff::new()
    } else {
        None
    };
    let mut value = Zeroizing::new(Vec::with_capacity(MAX_SECRET_VALUE + 2));
    let mut handle = stdin.lock();
    if interactive {
        let mut line = Zeroizing::new(String::with_capacity(1024));
        std::io::BufRead::read_line(&mut handle, &mut line).map_err(|e| format!("reading the value: {e}"))?;
        eprintln!();
        value.extend_from_slice(line.as_bytes());
    } else {
        (&mut handle)
            .take(MAX_SECRET_VALUE as u64 + 2)
            .read_to_end(&mut value)
            .map_err(|e| format!("reading the value from stdin: {e}"))?;
    }
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err(format!(
            "no value for {name} on stdin: pipe it in, e.g. `printf %s \"$VALUE\" | agentlab secrets set --env {name}`"
        ));
    }
    Ok(SecretEntry { kind, name, value: SecretBytes::copy_from(&value) })
}

fn file_entry(spec: &str) -> Result<SecretEntry, String> {
    let Some((name, path)) = spec.split_once('=') else {
        return Err(format!(
            "--file {spec:?}: write it as NAME=PATH, e.g. --file settings.json=$HOME/.claude/settings.json"
        ));
    };
    let path = PathBuf::from(path);
    let file = std::fs::File::open(&path).map_err(|e| format!("--file {name}: cannot read {}: {e}", path.display()))?;
    let mut value = Zeroizing::new(Vec::with_capacity(MAX_SECRET_VALUE + 1));
    file.take(MAX_SECRET_VALUE as u64 + 1)
        .read_to_end(&mut value)
        .map_err(|e| format!("--file {name}: cannot read {}: {e}", path.display()))?;
    Ok(SecretEntry { kind: SecretKind::File, name: name.to_owned(), value: SecretBytes::copy_from(&value) })
}

/// Turns terminal echo off until dropped.
struct EchoOff {
    saved: nix::sys::termios::Termios,
}

impl EchoOff {
    fn new() -> Option<EchoOff> {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet).ok()?;
        Some(EchoOff { saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

fn bundle_detail(view: &BundleView) -> String {
    let mut out = format!("bundle:   {}\nmodified: {}\n", view.name, render::time(view.modified_at_ms));
    let _ = writeln!(out, "{:<10} {:<32} {:>8}  VALUE", "KIND", "NAME", "BYTES");
    for e in &view.entries {
        let _ = writeln!(out, "{:<10} {:<32} {:>8}  [redacted]", e.kind.as_str(), e.name, e.bytes);
    }
    out
}

fn bundle_table(list: &[BundleView]) -> String {
    let mut out = format!("{:<20} {:>7}  {:<24}  {}\n", "BUNDLE", "SECRETS", "MODIFIED", "NAMES");
    for b in list {
        let names: Vec<String> = b.entries.iter().map(|e| format!("{} {}", e.kind.as_str(), e.name)).collect();
        let _ = writeln!(
            out,
            "{:<20} {:>7}  {:<24}  {}",
            b.name,
            b.entries.len(),
            render::time(b.modified_at_ms),
            names.join(", ")
        );
    }
    out
}
