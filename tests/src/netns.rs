//! Network namespaces for the network-isolation tests: a sandbox behind a router that
//! loads `host/nftables/agentlab.nft`, and a WAN namespace standing in for both the
//! operator's LAN and the internet. Everything is created inside namespaces the test
//! owns (veth pairs are created in the router's namespace with their peers moved
//! straight into the other one), so no packet ever reaches the host's own stack.
//!
//! Names are unique per process and topology, so tests run in parallel; everything is
//! deleted on drop.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

/// The sandbox's side of its link to the router.
pub const SANDBOX_IF: &str = "s-rt";
/// The router's side of its link to the sandbox: the ruleset's `$sandbox_if`.
pub const ROUTER_SANDBOX_IF: &str = "r-sb";
pub const SANDBOX_NET4: &str = "10.77.0.0/16";
pub const SANDBOX_ADDR: &str = "10.77.0.2";
pub const ROUTER_SANDBOX_ADDR: &str = "10.77.0.1";
/// The router's uplink address: what the WAN sees as the source of NATed traffic.
pub const ROUTER_UPLINK_ADDR: &str = "192.0.2.1";
pub const WAN_ADDR: &str = "192.0.2.2";
/// An "internet" address in the WAN namespace (TEST-NET-3), outside every blocked range.
pub const INTERNET_ADDR: &str = "203.0.113.10";
/// One address in each blocked IPv4 range, all held by the WAN namespace, so that without
/// the ruleset each one is reachable from the sandbox through the router.
pub const BLOCKED_V4: [(&str, &str); 5] = [
    ("10.0.0.0/8", "10.99.0.10"),
    ("172.16.0.0/12", "172.16.5.10"),
    ("192.168.0.0/16", "192.168.5.10"),
    ("169.254.0.0/16", "169.254.5.10"),
    ("100.64.0.0/10", "100.64.5.10"),
];
/// A unique local address held by the WAN namespace.
pub const BLOCKED_ULA: &str = "fd00:5::10";
/// A global-scope IPv6 address (documentation range) held by the WAN namespace.
pub const INTERNET_V6: &str = "2001:db8::10";
/// An address outside the sandbox subnet that the sandbox holds too, to send spoofed
/// packets from (TEST-NET-2).
pub const SPOOFED_ADDR: &str = "198.51.100.7";
/// The router's link-local address on the sandbox link.
pub const ROUTER_LINK_LOCAL: &str = "fe80::1";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs `program args` and panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {program} (install iproute2 and nftables: scripts/install-deps.sh): {e}")
    });
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Netns {
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `program args` inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets keep the namespace
    /// they were created in, so a socket made here can be used from any thread.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = Path::new("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            f()
        })
        .join()
        .unwrap()
    }

    pub fn ifindex(&self, ifname: &str) -> u32 {
        let line = self.ip(&["-o", "link", "show", "dev", ifname]);
        line.split(':').next().unwrap().trim().parse().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// sandbox ns ── router ns (the ruleset, forwarding, NAT) ── WAN ns.
pub struct Topology {
    pub sandbox: Netns,
    pub router: Netns,
    pub wan: Netns,
}

impl Topology {
    /// Builds and addresses the three namespaces; forwarding is on, no ruleset is loaded.
    pub fn new() -> Topology {
        let id = format!("agentlab-t{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let sandbox = Netns::create(format!("{id}-sandbox"));
        let router = Netns::create(format!("{id}-router"));
        let wan = Netns::create(format!("{id}-wan"));
        router.ip(&[
            "link",
            "add",
            ROUTER_SANDBOX_IF,
            "type",
            "veth",
            "peer",
            "name",
            SANDBOX_IF,
            "netns",
            &sandbox.name,
        ]);
        router.ip(&["link", "add", "r-wan", "type", "veth", "peer", "name", "w-rt", "netns", &wan.name]);
        for (ns, ifname) in [(&sandbox, SANDBOX_IF), (&router, ROUTER_SANDBOX_IF), (&router, "r-wan"), (&wan, "w-rt")] {
            ns.ip(&["link", "set", ifname, "up"]);
        }
        // IPv4: the sandbox subnet, the uplink, and every target address on the WAN side.
        sandbox.ip(&["addr", "add", &format!("{SANDBOX_ADDR}/16"), "dev", SANDBOX_IF]);
        sandbox.ip(&["route", "add", "default", "via", ROUTER_SANDBOX_ADDR]);
        router.ip(&["addr", "add", &format!("{ROUTER_SANDBOX_ADDR}/16"), "dev", ROUTER_SANDBOX_IF]);
        router.ip(&["addr", "add", &format!("{ROUTER_UPLINK_ADDR}/24"), "dev", "r-wan"]);
        router.ip(&["route", "add", "default", "via", WAN_ADDR]);
        wan.ip(&["addr", "add", &format!("{WAN_ADDR}/24"), "dev", "w-rt"]);
        for addr in BLOCKED_V4.iter().map(|(_, a)| *a).chain([INTERNET_ADDR]) {
            wan.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        }
        // Without NAT (the control runs) the WAN must route replies back to the sandbox.
        wan.ip(&["route", "add", SANDBOX_NET4, "via", ROUTER_UPLINK_ADDR]);
        // IPv6: ULA on both links, a ULA target on the WAN side, the router's link-local.
        sandbox.ip(&["addr", "add", "fd77::2/64", "dev", SANDBOX_IF, "nodad"]);
        sandbox.ip(&["-6", "route", "add", "default", "via", "fd77::1"]);
        router.ip(&["addr", "add", "fd77::1/64", "dev", ROUTER_SANDBOX_IF, "nodad"]);
        router.ip(&["addr", "add", &format!("{ROUTER_LINK_LOCAL}/64"), "dev", ROUTER_SANDBOX_IF, "nodad"]);
        router.ip(&["addr", "add", "fd99::1/64", "dev", "r-wan", "nodad"]);
        router.ip(&["-6", "route", "add", "default", "via", "fd99::2"]);
        wan.ip(&["addr", "add", "fd99::2/64", "dev", "w-rt", "nodad"]);
        wan.ip(&["addr", "add", &format!("{BLOCKED_ULA}/128"), "dev", "lo"]);
        wan.ip(&["addr", "add", &format!("{INTERNET_V6}/128"), "dev", "lo"]);
        sandbox.ip(&["addr", "add", &format!("{SPOOFED_ADDR}/32"), "dev", SANDBOX_IF]);
        wan.ip(&["-6", "route", "add", "fd77::/64", "via", "fd99::1"]);
        router.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
        Topology { sandbox, router, wan }
    }

    /// Loads the ruleset file into the router, as `agentlab host setup` does on a node.
    pub fn load_ruleset(&self, file: &Path) {
        load_ruleset(&self.router, file, ROUTER_SANDBOX_IF);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// Loads the ruleset file into `ns` for the sandbox interface `sandbox_if`.
pub fn load_ruleset(ns: &Netns, file: &Path, sandbox_if: &str) {
    let file = file.to_str().unwrap();
    let define_if = format!("sandbox_if=\"{sandbox_if}\"");
    let define_net = format!("sandbox_net4={SANDBOX_NET4}");
    ns.exec("nft", &["-D", &define_if, "-D", &define_net, "-f", file]);
}

/// A TCP listener that answers every connection with the peer address it saw, then
/// echoes one line back. Runs until the process ends (its namespace goes with it).
pub fn serve_peer_address(ns: &Netns, addr: SocketAddr) {
    let listener =
        ns.enter(move || TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name));
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        for stream in listener.incoming().flatten() {
            let peer = stream.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
            let mut writer = &stream;
            let _ = writeln!(writer, "{peer}");
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_ok() {
                let _ = writer.write_all(line.as_bytes());
            }
        }
    });
}

/// A UDP socket that sends every datagram back to where it came from.
pub fn serve_udp_echo(ns: &Netns, addr: SocketAddr) {
    let socket = ns.enter(move || UdpSocket::bind(addr)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
}

/// A UDP socket that reports every datagram it receives (payload, source) on a channel.
pub fn udp_receiver(ns: &Netns, addr: SocketAddr) -> std::sync::mpsc::Receiver<(Vec<u8>, SocketAddr)> {
    let socket = ns.enter(move || UdpSocket::bind(addr)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if tx.send((buf[..n].to_vec(), from)).is_err() {
                break;
            }
        }
    });
    rx
}

/// Connects from inside `ns`.
pub fn connect_from(ns: &Netns, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    ns.enter(move || TcpStream::connect_timeout(&addr, timeout))
}
