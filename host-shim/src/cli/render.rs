//! Human-readable and JSON output.

use std::fmt::Write as _;

use serde::Serialize;

use crate::api::{JobView, SandboxView};
use crate::profile::Profile;

pub fn print<T: Serialize + ?Sized>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    } else {
        print!("{}", text());
    }
}

pub use crate::store::rfc3339_ms as time;

fn duration(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

pub fn job_detail(job: &JobView) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: &str| field_line(&mut out, name, value);
    field("job", &job.id);
    field("state", job.state.as_str());
    if let Some(queue) = &job.queue {
        field("queued", queue);
    }
    field("sandbox", &job.sandbox_id);
    field("command", &job.command);
    if let Some(profile) = &job.profile {
        field("profile", profile);
    }
    if let Some(repo) = &job.repo {
        field("repo", repo);
    }
    field("timeout", &duration(job.timeout_ms));
    if let Some(code) = job.exit_code {
        field("exit code", &code.to_string());
    }
    if let Some(signal) = job.signal {
        field("signal", &signal.to_string());
    }
    if let Some(ms) = job.duration_ms {
        field("duration", &duration(ms));
    }
    if let (Some(kernel), Some(agent)) = (&job.guest_kernel, &job.agent_version) {
        field("guest", &format!("kernel {kernel}, agent {agent}"));
    }
    field("output", &format!("{} bytes", job.output_bytes));
    if let Some(e) = &job.enforcement {
        let yes = |b: bool| if b { "yes" } else { "no" };
        field(
            "enforced",
            &format!(
                "user {} (uid {}), landlock ABI {} (fs {}, net {}, scope {}), seccomp {}, no_new_privs {}",
                e.user,
                e.uid,
                e.landlock_abi,
                yes(e.landlock_fs),
                yes(e.landlock_net),
                yes(e.landlock_scope),
                yes(e.seccomp),
                yes(e.no_new_privs)
            ),
        );
        for note in &e.notes {
            field("  note", note);
        }
    }
    field("created", &time(job.created_at_ms));
    if let Some(error) = &job.error {
        field("error", error);
    }
    events_block(&mut out, &job.events);
    out
}

pub fn job_table(jobs: &[JobView]) -> String {
    let mut out = format!("{:<17} {:<10} {:>4}  {:<24}  {}\n", "JOB", "STATE", "EXIT", "CREATED", "COMMAND");
    for j in jobs {
        let exit = j.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        // One line per job, whatever the command's own layout.
        let flat = j.command.split_whitespace().collect::<Vec<_>>().join(" ");
        let cmd: String = flat.chars().take(60).collect();
        let _ =
            writeln!(out, "{:<17} {:<10} {:>4}  {:<24}  {cmd}", j.id, j.state.as_str(), exit, time(j.created_at_ms));
    }
    out
}

pub fn sandbox_table(list: &[SandboxView]) -> String {
    let mut out =
        format!("{:<16} {:<12} {:<8} {:<5} {:<17} {}\n", "SANDBOX", "STATE", "BACKEND", "ACCEL", "JOB", "UPDATED");
    for s in list {
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:<8} {:<5} {:<17} {}",
            s.id,
            s.state.as_str(),
            s.backend,
            s.accel.as_deref().unwrap_or("-"),
            s.job_id.as_deref().unwrap_or("-"),
            time(s.updated_at_ms)
        );
    }
    out
}

pub fn sandbox_detail(s: &SandboxView) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: &str| field_line(&mut out, name, value);
    field("sandbox", &s.id);
    field("state", s.state.as_str());
    field("backend", &s.backend);
    if let Some(job) = &s.job_id {
        field("job", job);
    }
    if let Some(accel) = &s.accel {
        field("accel", accel);
    }
    field("keepalive", if s.keepalive { "yes" } else { "no" });
    field(
        "lease",
        &s.lease_expires_at_ms.map_or_else(|| "until its job ends".to_owned(), |ms| format!("ends {}", time(ms))),
    );
    if let Some(error) = &s.error {
        field("error", error);
    }
    events_block(&mut out, &s.events);
    out
}

/// One `name:  value` line of a detail view.
fn field_line(out: &mut String, name: &str, value: &str) {
    let _ = writeln!(out, "{:<11} {value}", format!("{name}:"));
}

/// The events that end a detail view.
fn events_block(out: &mut String, events: &[crate::api::EventView]) {
    let _ = writeln!(out, "events:");
    for e in events {
        let _ = writeln!(out, "  {}", super::logs::event_line(e));
    }
}

pub fn profile_table(profiles: &[Profile]) -> String {
    let mut out = format!(
        "{:<20} {:>5} {:>7} {:<9} {:<11} {}\n",
        "PROFILE", "CORES", "MEM_MB", "NETWORK", "LANDLOCK", "DESCRIPTION"
    );
    for p in profiles {
        let _ = writeln!(
            out,
            "{:<20} {:>5} {:>7} {:<9} {:<11} {}",
            p.name,
            p.resources.cores,
            p.resources.memory_mb,
            enum_name(&p.network.mode),
            enum_name(&p.sandbox.landlock),
            p.description
        );
    }
    out
}

/// An enum's name as it is written in YAML.
fn enum_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}
