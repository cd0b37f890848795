//! `agentlab doctor`: the socket from here, everything else from agentlabd.

use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

use super::client::{Client, unexpected};
use crate::api::{ApiRequest, ApiResponse};
use crate::doctor::{Check, Status};

pub async fn run(socket: &Path, json: bool) -> Result<ExitCode, String> {
    let mut checks = vec![socket_check(socket)];
    if checks[0].status != Status::Fail {
        match Client::connect(socket).await {
            Ok(mut client) => match client.call(ApiRequest::Doctor).await? {
                ApiResponse::Checks(more) => checks.extend(more),
                other => return Err(unexpected(other)),
            },
            Err(e) => checks.push(Check::fail("agentlabd", e, "start agentlabd (systemctl start agentlabd)")),
        }
    }
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks).unwrap_or_default());
    } else {
        print!("{}", render(&checks));
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// The API socket exists, is a socket, is not open to everyone, and takes connections.
fn socket_check(socket: &Path) -> Check {
    const NAME: &str = "socket";
    let meta = match std::fs::metadata(socket) {
        Ok(meta) => meta,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("{}: {e}", socket.display()),
                "start agentlabd (systemctl start agentlabd), or point --socket / AGENTLABD_SOCKET at its socket",
            );
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    let detail = format!("{} (mode {mode:04o}, uid {}, gid {})", socket.display(), meta.uid(), meta.gid());
    if mode & 0o007 != 0 {
        return Check::fail(NAME, detail, "anyone on the host can drive agentlabd: chmod 0660 the socket");
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Check::ok(NAME, detail),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Check::fail(
            NAME,
            format!("{detail}: {e}"),
            "add yourself to the socket's group (usermod -aG agentlab $USER) and log in again",
        ),
        Err(e) => Check::fail(NAME, format!("{detail}: {e}"), "agentlabd is not serving it: restart agentlabd"),
    }
}

fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let status = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(out, "{status}  {:<20} {}", c.name, c.detail);
        if let Some(fix) = &c.fix {
            let _ = writeln!(out, "      {:<20} fix: {fix}", "");
        }
    }
    out
}
