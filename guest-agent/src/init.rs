//! PID 1 duties in the micro image: mounts, modules, zombie reaping and power-off.
//!
//! PID 1 forks once, before any thread exists. The child runs the agent session with
//! an ordinary tokio runtime, which reaps its own children; PID 1 stays a plain loop
//! that reaps everything reparented to it, so it never steals the job's exit status.

use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, sync};

use crate::modules;
use crate::session::{self, RunArgs};

/// Kernel command line word that asks for a probe boot: report and power off at once.
const PROBE_FLAG: &str = "agentlab.probe";
/// Printed on the console by a probe boot; the host looks for it.
pub const PROBE_MARKER: &str = "AGENTLAB-PROBE-OK";

pub fn run_as_pid1() -> ! {
    mount_basics();
    match modules::load_listed(Path::new(modules::MODULE_ORDER), Path::new(modules::MODULE_DIR)) {
        Ok(_) => {}
        Err(e) => eprintln!("agentlab-agent: {e}"),
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == PROBE_FLAG) {
        println!("{PROBE_MARKER}");
        power_off();
    }
    // SAFETY: no other thread exists yet (the runtime is created in the child), so
    // the child may do anything after fork.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            crate::init_logging();
            let code = match session::run_blocking(RunArgs::default()) {
                Ok(()) => 0,
                Err(err) => {
                    tracing::error!("{err}");
                    1
                }
            };
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { child }) => {
            reap_until(child);
            power_off();
        }
        Err(e) => {
            eprintln!("agentlab-agent: fork failed: {e}");
            power_off();
        }
    }
}

fn mount_basics() {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 6] = [
        ("proc", "/proc", "proc", nosuid_nodev | MsFlags::MS_NOEXEC, None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev | MsFlags::MS_NOEXEC, None),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755")),
        ("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("gid=5,mode=620,ptmxmode=666")),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, Some("mode=0755")),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
            eprintln!("agentlab-agent: mounting {fstype} on {target}: {e}");
        }
    }
    let _ = nix::unistd::sethostname("agentlab");
}

/// Reaps every child until `agent` has exited.
fn reap_until(agent: Pid) {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)) if pid == agent => {
                return;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

fn power_off() -> ! {
    // Whatever the job left behind goes first, then the page cache reaches the disk.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while waitpid(None::<Pid>, Some(nix::sys::wait::WaitPidFlag::WNOHANG)).is_ok_and(|s| s != WaitStatus::StillAlive) {}
    sync();
    let _ = reboot(RebootMode::RB_POWER_OFF);
    // reboot() only returns on failure; PID 1 must never exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
