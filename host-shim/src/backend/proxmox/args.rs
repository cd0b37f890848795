//! Setting `args` (the vsock device). Proxmox lets only `root@pam` set `args`; the
//! check compares the authenticated user to `root@pam`, and a token's user is
//! `root@pam!tokenid`, so every token gets `500 only root can set 'args' config`.
//! The shim therefore sets it either through the node's own `qm set` (it runs on the
//! node as root) or through a root@pam ticket, as configured.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Mutex;

use super::client::{Auth, Method, PveClient};
use super::config::ArgsVia;
use super::error::PveError;

/// A ticket is valid for 2 hours; renew well before.
const TICKET_RENEW_AFTER: Duration = Duration::from_secs(3600);

/// The `args` value that gives the guest its vsock device and CID.
pub fn vsock_args(cid: u32) -> String {
    format!("-device vhost-vsock-pci,guest-cid={cid}")
}

struct Ticket {
    ticket: String,
    csrf: String,
    at: Instant,
}

pub struct ArgsSetter {
    via: ArgsVia,
    qm_command: Vec<String>,
    root_password: Option<String>,
    ticket: Mutex<Option<Ticket>>,
}

impl ArgsSetter {
    pub fn new(via: ArgsVia, qm_command: Vec<String>, root_password: Option<String>) -> ArgsSetter {
        ArgsSetter { via, qm_command, root_password, ticket: Mutex::new(None) }
    }

    pub fn via(&self) -> &ArgsVia {
        &self.via
    }

    /// Sets `params` (which include `args`) on the VM in one config update, as root.
    pub async fn set_config_as_root(
        &self,
        client: &PveClient,
        op: &str,
        node: &str,
        vmid: u32,
        params: &[(&str, String)],
    ) -> Result<(), PveError> {
        match self.via {
            ArgsVia::Ticket => {
                let path = format!("/nodes/{node}/qemu/{vmid}/config");
                let (ticket, csrf) = self.ticket(client, vmid).await?;
                let auth = Auth::Ticket { ticket: &ticket, csrf: &csrf };
                match client.call_as(op, Method::Put, &path, params, &auth).await {
                    // The ticket expired or was revoked early (a restarted cluster, a
                    // changed password): log in again, once.
                    Err(e) if e.api().is_some_and(|a| a.status == 401) => {
                        *self.ticket.lock().await = None;
                        let (ticket, csrf) = self.ticket(client, vmid).await?;
                        let auth = Auth::Ticket { ticket: &ticket, csrf: &csrf };
                        client.call_as(op, Method::Put, &path, params, &auth).await.map(|_| ())
                    }
                    other => other.map(|_| ()),
                }
            }
            ArgsVia::Qm => self.qm_set(op, vmid, params).await,
        }
    }

    async fn ticket(&self, client: &PveClient, vmid: u32) -> Result<(String, String), PveError> {
        let mut cached = self.ticket.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| t.at.elapsed() < TICKET_RENEW_AFTER) {
            return Ok((t.ticket.clone(), t.csrf.clone()));
        }
        let op = &format!("logging in as root@pam to set VM {vmid}'s args");
        let password = self
            .root_password
            .clone()
            .ok_or_else(|| PveError::Config("args_via: ticket needs root_password_file".into()))?;
        let answer = client
            .call(op, Method::Post, "/access/ticket", &[("username", "root@pam".to_owned()), ("password", password)])
            .await?;
        let field = |name: &str| {
            answer
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| PveError::Decode { op: op.to_owned(), detail: format!("the answer has no {name}") })
        };
        let ticket = Ticket { ticket: field("ticket")?, csrf: field("CSRFPreventionToken")?, at: Instant::now() };
        let pair = (ticket.ticket.clone(), ticket.csrf.clone());
        *cached = Some(ticket);
        Ok(pair)
    }

    /// `qm set VMID --KEY VALUE …` on this node.
    async fn qm_set(&self, op: &str, vmid: u32, params: &[(&str, String)]) -> Result<(), PveError> {
        let argv = qm_argv(&self.qm_command, vmid, params);
        let output =
            tokio::process::Command::new(&argv[0]).args(&argv[1..]).output().await.map_err(|e| PveError::Other {
                op: op.to_owned(),
                detail: format!(
                    "cannot run {}: {e} (agentlabd must run on the Proxmox node, as root, for args_via: qm)",
                    argv[0]
                ),
            })?;
        if output.status.success() {
            return Ok(());
        }
        Err(PveError::Other {
            op: op.to_owned(),
            detail: format!(
                "`{}` failed ({}): {}",
                argv.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

/// The command line `qm set` gets.
pub fn qm_argv(qm: &[String], vmid: u32, params: &[(&str, String)]) -> Vec<String> {
    let mut argv = qm.to_vec();
    argv.push("set".into());
    argv.push(vmid.to_string());
    for (key, value) in params {
        argv.push(format!("--{key}"));
        argv.push(value.clone());
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vsock_device_and_the_qm_command_line() {
        assert_eq!(vsock_args(1234), "-device vhost-vsock-pci,guest-cid=1234");
        let argv = qm_argv(&["qm".into()], 1234, &[("args", vsock_args(1234))]);
        assert_eq!(argv, ["qm", "set", "1234", "--args", "-device vhost-vsock-pci,guest-cid=1234"]);
    }
}
