//! `agentlab-agent selftest`: run as the job, it attempts each hostile action the inner
//! sandbox should refuse and prints exactly what happened. A refusal by the sandbox is
//! `blocked (EPERM)` or `blocked (EACCES)`; anything else is the kernel or the network
//! answering after the sandbox let the call through.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, getuid};
use serde::Serialize;

use crate::sandbox::AGENT_PID_ENV;
use crate::sandbox::passwd::{self, PASSWD};

#[derive(clap::Args, Clone, Debug)]
pub struct SelftestArgs {
    /// Print JSON: an object of check name → {outcome, errno, detail}.
    #[arg(long)]
    pub json: bool,
    /// A directory outside the job's writable roots that Unix permissions let anyone write.
    #[arg(long, default_value = "/tmp")]
    pub outside: PathBuf,
    /// The secrets directory the job should not be able to read.
    #[arg(long, default_value = agentlab_protocol::GUEST_SECRETS_DIR)]
    pub secrets_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
struct Check {
    #[serde(skip)]
    name: &'static str,
    outcome: String,
    /// The errno name, if the attempt failed.
    errno: Option<String>,
    detail: String,
}

impl Check {
    fn new(name: &'static str, outcome: impl Into<String>, errno: Option<Errno>, detail: impl Into<String>) -> Self {
        Check { name, outcome: outcome.into(), errno: errno.map(|e| format!("{e:?}")), detail: detail.into() }
    }

    /// Allowed, blocked by the sandbox (EPERM/EACCES), absent (ENOENT) or another error.
    fn from_result(name: &'static str, result: Result<(), Errno>, detail: impl Into<String>) -> Self {
        match result {
            Ok(()) => Check::new(name, "allowed", None, detail),
            Err(e @ (Errno::EPERM | Errno::EACCES)) => Check::new(name, format!("blocked ({e:?})"), Some(e), detail),
            Err(e @ Errno::ENOENT) => Check::new(name, "not-present", Some(e), detail),
            Err(e) => Check::new(name, format!("error ({e:?})"), Some(e), detail),
        }
    }
}

pub fn run(args: &SelftestArgs) -> ExitCode {
    let checks = vec![
        whoami(),
        write_into("write-workdir", Path::new(".")),
        match std::env::var_os("TMPDIR") {
            Some(dir) => write_into("write-tmpdir", Path::new(&dir)),
            None => Check::new("write-tmpdir", "not-present", None, "TMPDIR is not set"),
        },
        write_into("write-outside-roots", &args.outside),
        read_secrets(&args.secrets_dir),
        vsock_socket(),
        ptrace_attach(),
        signal_agent(),
        tcp_connect(),
    ];
    if args.json {
        let map: serde_json::Map<String, serde_json::Value> = checks
            .iter()
            .map(|c| (c.name.to_owned(), serde_json::to_value(c).unwrap_or(serde_json::Value::Null)))
            .collect();
        println!("{}", serde_json::to_string_pretty(&map).unwrap_or_default());
    } else {
        for c in &checks {
            if c.detail.is_empty() {
                println!("{}: {}", c.name, c.outcome);
            } else {
                println!("{}: {}  # {}", c.name, c.outcome, c.detail);
            }
        }
    }
    ExitCode::SUCCESS
}

fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::UnknownErrno)
}

fn whoami() -> Check {
    let uid = getuid().as_raw();
    let name = passwd::name_of(Path::new(PASSWD), uid).unwrap_or_else(|| "?".to_owned());
    Check::new("whoami", format!("uid={uid}({name})"), None, "")
}

/// Creates (and removes) a file in `dir`.
fn write_into(name: &'static str, dir: &Path) -> Check {
    let path = dir.join(format!(".agentlab-selftest-{}", std::process::id()));
    let result = std::fs::OpenOptions::new().write(true).create_new(true).open(&path);
    if result.is_ok() {
        let _ = std::fs::remove_file(&path);
    }
    Check::from_result(name, result.map(drop).map_err(|e| errno_of(&e)), path.display().to_string())
}

fn read_secrets(dir: &Path) -> Check {
    let result = std::fs::read_dir(dir).map(drop).map_err(|e| errno_of(&e));
    Check::from_result("read-secrets-dir", result, dir.display().to_string())
}

/// Only creates the socket: whether the sandbox lets the job have one is the question.
fn vsock_socket() -> Check {
    let result = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map(drop);
    let detail = match result {
        Ok(()) => "socket(AF_VSOCK) succeeded (not connecting)",
        _ => "socket(AF_VSOCK)",
    };
    Check::from_result("vsock-connect-host", result, detail)
}

/// Attaches to a child of our own: Unix permissions would allow that, so only the
/// sandbox can refuse it.
fn ptrace_attach() -> Check {
    // SAFETY: selftest runs single-threaded (no runtime, no threads), and the child
    // only sleeps and exits.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            nix::unistd::sleep(10);
            std::process::exit(0);
        }
        Ok(ForkResult::Parent { child }) => {
            let result = nix::sys::ptrace::attach(child);
            let _ = kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            Check::from_result("ptrace-attach", result, format!("PTRACE_ATTACH to own child {child}"))
        }
        Err(e) => Check::new("ptrace-attach", format!("error ({e:?})"), Some(e), "fork failed"),
    }
}

/// Signal 0 to the agent: the permission check of a real signal, without the signal.
fn signal_agent() -> Check {
    let Some(pid) = agent_pid() else {
        return Check::new("signal-agent", "not-found", None, "no agent pid");
    };
    Check::from_result("signal-agent", kill(Pid::from_raw(pid), None), format!("kill({pid}, 0)"))
}

/// The agent's pid from the job's environment, else the nearest ancestor running as
/// another user.
fn agent_pid() -> Option<i32> {
    if let Some(pid) = std::env::var(AGENT_PID_ENV).ok().and_then(|v| v.parse().ok()) {
        return Some(pid);
    }
    let me = getuid().as_raw();
    let mut pid = nix::unistd::getppid().as_raw();
    while pid > 1 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |key: &str| -> Option<u32> {
            status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
        };
        if field("Uid:")? != me {
            return Some(pid);
        }
        pid = i32::try_from(field("PPid:")?).ok()?;
    }
    None
}

fn tcp_connect() -> Check {
    let port = local_listener().unwrap_or(9);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => Check::new("tcp-connect", "allowed", None, format!("connected to {addr}")),
        Err(e) if e.raw_os_error().is_none() && e.kind() == ErrorKind::TimedOut => Check::new(
            "tcp-connect",
            "allowed (timeout)",
            None,
            format!("{addr}: no answer; the sandbox let it through"),
        ),
        Err(e) => match errno_of(&e) {
            errno @ (Errno::EPERM | Errno::EACCES) => {
                Check::new("tcp-connect", format!("blocked ({errno:?})"), Some(errno), format!("{addr}"))
            }
            errno => Check::new(
                "tcp-connect",
                format!("allowed ({errno:?})"),
                Some(errno),
                format!("{addr}: refused by the network, not by the sandbox"),
            ),
        },
    }
}

/// A TCP port something listens on at 127.0.0.1 or 0.0.0.0, from `/proc/net/tcp`.
fn local_listener() -> Option<u16> {
    const LISTEN: &str = "0A";
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state) = (fields.get(1)?, fields.get(3)?);
        let (ip, port) = local.split_once(':')?;
        (*state == LISTEN && (ip == "0100007F" || ip == "00000000")).then(|| u16::from_str_radix(port, 16).ok())?
    })
}
