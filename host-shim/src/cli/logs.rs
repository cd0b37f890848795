//! `agentlab logs` and `agentlab events`, and the output-following that
//! `job submit --follow` shares. Ctrl-C stops following, never the job: the position
//! reached is saved, and `agentlab logs JOB --follow` resumes there.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use agentlab_protocol::OutputStream;

use super::client::{Client, unexpected};
use super::render;
use crate::api::{ApiRequest, ApiResponse, EventView, exit_code_for};

/// Exit code after Ctrl-C, as shells use for SIGINT.
const EXIT_INTERRUPTED: u8 = 130;

#[derive(clap::Args)]
pub struct LogsArgs {
    id: String,
    /// Keep streaming until the job ends; resumes where an interrupted follow stopped.
    #[arg(long, short)]
    follow: bool,
    /// Only the last N lines (then live output with --follow).
    #[arg(long, value_name = "N")]
    tail: Option<u64>,
    /// With --follow: start from the beginning, not where the last follow stopped.
    #[arg(long)]
    from_start: bool,
    /// No progress (spinner or phase lines) on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Only this job's events.
    #[arg(long)]
    job: Option<String>,
    /// Keep streaming new events (for a job: until it and its sandbox are done).
    #[arg(long, short)]
    follow: bool,
}

/// Where an interrupted follow of `job` saved its position.
fn saved_position(job: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    let safe: String = job.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    Some(base.join("agentlab/follow").join(safe))
}

pub async fn logs(client: &mut Client, args: LogsArgs, json: bool) -> Result<ExitCode, String> {
    let saved = saved_position(&args.id);
    let resume = match (&saved, args.follow && !args.from_start && args.tail.is_none()) {
        (Some(path), true) => std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok()),
        _ => None,
    };
    if let Some(offset) = resume {
        eprintln!(
            "agentlab: resuming job {} where the last follow stopped (byte {offset}; --from-start for all)",
            args.id
        );
    }
    let request = ApiRequest::Logs {
        id: args.id.clone(),
        offset: resume.unwrap_or(0),
        tail_lines: args.tail,
        follow: args.follow,
    };
    follow_output(client, &args.id, request, json, Progress::choose(args.quiet, json)).await
}

/// How a followed job's phases (booting, running…) are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A spinner on stderr, until the job's output starts (stderr is a terminal).
    Spinner,
    /// One `agentlab: PHASE` line on stderr per phase (stderr is not a terminal).
    Lines,
    Off,
}

impl Progress {
    pub fn choose(quiet: bool, json: bool) -> Progress {
        use std::io::IsTerminal;
        match (quiet || json, std::io::stderr().is_terminal()) {
            (true, _) => Progress::Off,
            (false, true) => Progress::Spinner,
            (false, false) => Progress::Lines,
        }
    }
}

/// The spinner (or lines) naming what the job is doing.
struct PhaseDisplay {
    mode: Progress,
    spinner: Option<indicatif::ProgressBar>,
    output_started: bool,
}

impl PhaseDisplay {
    fn phase(&mut self, name: &str) {
        match self.mode {
            Progress::Spinner if !self.output_started => {
                let spinner = self.spinner.get_or_insert_with(|| {
                    let bar = indicatif::ProgressBar::new_spinner();
                    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
                        bar.set_style(style);
                    }
                    bar.enable_steady_tick(std::time::Duration::from_millis(100));
                    bar
                });
                spinner.set_message(name.to_owned());
            }
            Progress::Lines => eprintln!("agentlab: {name}"),
            _ => {}
        }
    }

    /// The job's output goes on the terminal from here: the spinner goes.
    fn output(&mut self) {
        self.output_started = true;
        self.clear();
    }

    fn clear(&mut self) {
        if let Some(spinner) = self.spinner.take() {
            spinner.finish_and_clear();
        }
    }
}

/// Streams a job's output to stdout/stderr until the job's view arrives; exits with
/// the job's code. On Ctrl-C saves the position and says how to resume.
pub async fn follow_output(
    client: &mut Client,
    job_id: &str,
    request: ApiRequest,
    json: bool,
    progress: Progress,
) -> Result<ExitCode, String> {
    let mut display = PhaseDisplay { mode: progress, spinner: None, output_started: false };
    let following = matches!(request, ApiRequest::Logs { follow: true, .. });
    client.send(request).await?;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut position = None;
    loop {
        let response = tokio::select! {
            response = client.recv() => response?,
            _ = tokio::signal::ctrl_c(), if following => {
                display.clear();
                if let (Some(offset), Some(path)) = (position, saved_position(job_id)) {
                    let _ = std::fs::create_dir_all(path.parent().unwrap_or(&path));
                    let _ = std::fs::write(&path, format!("{offset}\n"));
                }
                eprintln!("\nagentlab: stopped following; job {job_id} keeps running. Resume with: agentlab logs {job_id} --follow");
                return Ok(ExitCode::from(EXIT_INTERRUPTED));
            }
        };
        match response {
            ApiResponse::Phase { name } => display.phase(&name),
            ApiResponse::Output { stream, data, offset } => {
                display.output();
                let written = if json {
                    let line = serde_json::json!({
                        "type": "output",
                        "stream": if stream == OutputStream::Stdout { "stdout" } else { "stderr" },
                        "data": String::from_utf8_lossy(&data),
                        "offset": offset,
                    });
                    writeln!(stdout, "{line}").and_then(|()| stdout.flush())
                } else if stream == OutputStream::Stdout {
                    stdout.write_all(&data).and_then(|()| stdout.flush())
                } else {
                    stderr.write_all(&data).and_then(|()| stderr.flush())
                };
                written.map_err(|e| format!("writing the job's output: {e}"))?;
                position = Some(offset);
            }
            ApiResponse::Job(job) => {
                display.clear();
                if following && let Some(path) = saved_position(job_id) {
                    let _ = std::fs::remove_file(path);
                }
                if !following {
                    return Ok(ExitCode::SUCCESS);
                }
                let code = exit_code_for(&job);
                if json {
                    println!("{}", serde_json::json!({ "type": "job", "job": &*job }));
                } else if let Some(error) = &job.error {
                    eprintln!("agentlab: job {} {}: {error}", job.id, job.state);
                }
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
            other => return Err(unexpected(other)),
        }
    }
}

pub async fn events(client: &mut Client, args: EventsArgs, json: bool) -> Result<ExitCode, String> {
    client.send(ApiRequest::Events { job: args.job, after: 0, follow: args.follow }).await?;
    let mut stdout = std::io::stdout();
    loop {
        match client.recv().await? {
            ApiResponse::Event(event) => {
                let line = if json { serde_json::to_string(&event).unwrap_or_default() } else { event_line(&event) };
                writeln!(stdout, "{line}").and_then(|()| stdout.flush()).map_err(|e| format!("writing events: {e}"))?;
            }
            ApiResponse::Done => return Ok(ExitCode::SUCCESS),
            other => return Err(unexpected(other)),
        }
    }
}

/// One event on one line (the first line of its message).
pub fn event_line(e: &EventView) -> String {
    let change = match (&e.from_state, &e.to_state) {
        (Some(from), Some(to)) => format!("{from} -> {to}"),
        (None, Some(to)) => format!("-> {to}"),
        _ => String::new(),
    };
    let subject = e.job_id.as_deref().or(e.sandbox_id.as_deref()).unwrap_or("-");
    let msg = e.message.as_deref().map(|m| m.lines().next().unwrap_or_default()).unwrap_or_default();
    format!("{}  {subject:<17} {:<20} {change:<26} {msg}", render::time(e.at_ms), e.kind)
}
