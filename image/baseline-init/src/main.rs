//! `baseline-init`: the barest static PID 1 that can dial the host over vsock.
//!
//! It exists only as a benchmark baseline for the real guest agent: it loads the
//! kernel modules needed for virtio-vsock, connects to the host, says `HELLO\n`,
//! waits for the host to close the connection and powers the machine off.
//! Nothing is mounted and no process is spawned.
//!
//! With `agentlab_raw_bytes=N` on the kernel command line (the kernel hands such
//! parameters to init as environment variables) it also writes N zero bytes after the
//! greeting: the raw-throughput baseline for the channel benchmarks.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The vsock port the host listens on.
///
/// Must equal `agentlab_protocol::AGENT_VSOCK_PORT`; it is duplicated here so that this
/// baseline depends on nothing but libc.
const AGENT_VSOCK_PORT: u32 = 52000;

/// The host's context identifier (`VMADDR_CID_HOST`).
const HOST_CID: u32 = 2;

/// File listing the modules to load, one file name (relative to [`MODULES_DIR`]) a line.
const MODULES_ORDER: &str = "/etc/agentlab/modules.order";

/// Directory holding the kernel modules.
const MODULES_DIR: &str = "/lib/modules";

/// Delay between two connection attempts.
const RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// How long to keep retrying the connection before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    if let Err(err) = run() {
        eprintln!("baseline-init: {err}");
    }
    power_off();
}

fn run() -> io::Result<()> {
    load_modules()?;
    let mut stream = connect_host()?;
    stream.write_all(b"HELLO\n")?;
    if let Some(total) = std::env::var("agentlab_raw_bytes").ok().and_then(|v| v.parse::<u64>().ok()) {
        let block = [0u8; 64 * 1024];
        let mut left = total;
        while left > 0 {
            let n = usize::try_from(left.min(block.len() as u64)).unwrap_or(block.len());
            stream.write_all(&block[..n]).map_err(|err| with_context(err, "writing the raw stream"))?;
            left -= n as u64;
        }
    }
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(with_context(err, "reading from host")),
        }
    }
}

/// Loads every module listed in [`MODULES_ORDER`], in order. A module that is already
/// loaded (`EEXIST`) is fine; any other failure is reported and loading goes on, so that
/// the connection attempt shows what is missing.
fn load_modules() -> io::Result<()> {
    let order = std::fs::read_to_string(MODULES_ORDER).map_err(|err| with_context(err, MODULES_ORDER))?;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("{MODULES_DIR}/{name}");
        if let Err(err) = load_module(&path) {
            eprintln!("baseline-init: loading {path}: {err}");
        }
    }
    Ok(())
}

fn load_module(path: &str) -> io::Result<()> {
    let file = File::open(path)?;
    let params = CString::default();
    // SAFETY: `file` is an open descriptor that outlives the call, `params` is a valid
    // NUL-terminated string, and finit_module reads nothing else from our memory.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0 as libc::c_int) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(err)
}

/// Connects to the host, retrying every [`RETRY_INTERVAL`] for up to [`CONNECT_TIMEOUT`]:
/// the virtio device may still be probing, or the host not yet listening.
fn connect_host() -> io::Result<File> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match try_connect() {
            Ok(stream) => return Ok(stream),
            Err(err) if Instant::now() >= deadline => {
                return Err(with_context(err, &format!("connecting to vsock {HOST_CID}:{AGENT_VSOCK_PORT}")));
            }
            Err(_) => sleep(RETRY_INTERVAL),
        }
    }
}

fn try_connect() -> io::Result<File> {
    // SAFETY: plain system call with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: sockaddr_vm is plain old data, for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = HOST_CID;
    addr.svm_port = AGENT_VSOCK_PORT;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a fully initialised sockaddr_vm and `len` is its exact size;
    // `fd` is a valid socket for the duration of the call.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast::<libc::sockaddr>(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(fd))
}

/// Flushes the file systems and powers the machine off. Never returns; if the
/// reboot call fails, PID 1 exits and the kernel panics, which ends the VM as well.
fn power_off() -> ! {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot() with a constant command; we are PID 1 and want the machine off.
    let rc = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    if rc < 0 {
        eprintln!("baseline-init: reboot: {}", io::Error::last_os_error());
    }
    std::process::exit(1);
}

fn with_context(err: io::Error, what: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}
