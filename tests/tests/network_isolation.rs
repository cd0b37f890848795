//! The sandbox network policy, `host/nftables/agentlab.nft`, loaded by the real `nft`
//! into a router namespace between a sandbox namespace and a WAN namespace (see
//! `agentlab_tests::netns`). Every blocked probe has a control: the same probe, against
//! the same listener, succeeds when the ruleset is not loaded, so a pass means the
//! ruleset blocked it and not a routing mistake. No packet leaves the test's namespaces.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::PathBuf;
use std::time::Duration;

use agentlab_tests::netns::*;
use agentlab_tests::workspace_root;
use nix::errno::Errno;

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(3);

fn ruleset() -> PathBuf {
    workspace_root().join("host/nftables/agentlab.nft")
}

fn v4(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

/// Connects from the sandbox, sends a line, and returns (the source address the server
/// saw, the line it echoed back).
fn exchange(topo: &Topology, addr: SocketAddr) -> std::io::Result<(String, String)> {
    let stream = connect_from(&topo.sandbox, addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    let mut seen = String::new();
    reader.read_line(&mut seen)?;
    (&stream).write_all(b"ping\n")?;
    let mut echoed = String::new();
    reader.read_line(&mut echoed)?;
    Ok((seen.trim().to_owned(), echoed.trim().to_owned()))
}

/// What a probe ended with: "connected", or the errno's name.
fn outcome(result: std::io::Result<std::net::TcpStream>) -> String {
    match result {
        Ok(_) => "connected".into(),
        Err(e) if e.kind() == ErrorKind::TimedOut => "timed out".into(),
        Err(e) => match e.raw_os_error() {
            Some(code) => format!("{:?}", Errno::from_raw(code)),
            None => e.to_string(),
        },
    }
}

/// The probes of the blocked ranges: (what, address).
fn blocked_targets(topo: &Topology) -> Vec<(String, SocketAddr)> {
    let mut targets: Vec<(String, SocketAddr)> =
        BLOCKED_V4.iter().map(|(range, addr)| (format!("{range} ({addr})"), v4(addr, PORT))).collect();
    targets.push((format!("fc00::/7 ({BLOCKED_ULA})"), SocketAddr::new(BLOCKED_ULA.parse().unwrap(), PORT)));
    let link_local: Ipv6Addr = ROUTER_LINK_LOCAL.parse().unwrap();
    let scope = topo.sandbox.ifindex(SANDBOX_IF);
    targets.push((
        format!("fe80::/10 (the router's {ROUTER_LINK_LOCAL})"),
        SocketAddr::V6(SocketAddrV6::new(link_local, PORT, 0, scope)),
    ));
    targets
}

fn listen_on_targets(topo: &Topology) {
    for (_, addr) in BLOCKED_V4 {
        serve_peer_address(&topo.wan, v4(addr, PORT));
    }
    serve_peer_address(&topo.wan, SocketAddr::new(BLOCKED_ULA.parse().unwrap(), PORT));
    let scope = topo.router.ifindex(ROUTER_SANDBOX_IF);
    serve_peer_address(
        &topo.router,
        SocketAddr::V6(SocketAddrV6::new(ROUTER_LINK_LOCAL.parse().unwrap(), PORT, 0, scope)),
    );
}

#[test]
fn every_blocked_range_is_refused_from_the_sandbox_and_reachable_without_the_ruleset() {
    let topo = Topology::new();
    listen_on_targets(&topo);
    let targets = blocked_targets(&topo);

    // Control: with forwarding and no ruleset, every listener answers the sandbox.
    for (what, addr) in &targets {
        assert_eq!(outcome(connect_from(&topo.sandbox, *addr, TIMEOUT)), "connected", "control probe of {what}");
    }

    topo.load_ruleset(&ruleset());
    for (what, addr) in &targets {
        // Rejected as administratively prohibited: EHOSTUNREACH over IPv4, EACCES over
        // IPv6; never a timeout. (The kernel rate-limits ICMP errors per destination, so
        // after a burst a reject may answer the SYN's retransmission 1 s later.)
        let got = outcome(connect_from(&topo.sandbox, *addr, TIMEOUT));
        let expected = if addr.is_ipv4() { "EHOSTUNREACH" } else { "EACCES" };
        assert_eq!(got, expected, "probe of {what} with the ruleset loaded");
    }
}

#[test]
fn the_internet_is_reachable_through_nat_and_replies_come_back() {
    let topo = Topology::new();
    serve_peer_address(&topo.wan, v4(INTERNET_ADDR, PORT));
    serve_udp_echo(&topo.wan, v4(INTERNET_ADDR, 5353));

    // Control: routed, not NATed: the WAN sees the sandbox's own address.
    assert_eq!(exchange(&topo, v4(INTERNET_ADDR, PORT)).unwrap(), (SANDBOX_ADDR.to_owned(), "ping".to_owned()));

    topo.load_ruleset(&ruleset());
    // The WAN sees the router's uplink address, and the reply on the established
    // connection reaches the sandbox.
    assert_eq!(exchange(&topo, v4(INTERNET_ADDR, PORT)).unwrap(), (ROUTER_UPLINK_ADDR.to_owned(), "ping".to_owned()));
    // UDP: the reply to the sandbox's datagram is let back in as related traffic.
    let socket = topo.sandbox.enter(|| std::net::UdpSocket::bind("0.0.0.0:0")).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket.send_to(b"udp-ping", v4(INTERNET_ADDR, 5353)).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = socket.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"udp-ping"[..], v4(INTERNET_ADDR, 5353)));
}

#[test]
fn nothing_outside_can_open_a_connection_to_a_sandbox() {
    let topo = Topology::new();
    serve_peer_address(&topo.sandbox, v4(SANDBOX_ADDR, PORT));
    let from_wan = || outcome(connect_from(&topo.wan, v4(SANDBOX_ADDR, PORT), Duration::from_secs(1)));
    assert_eq!(from_wan(), "connected", "control: without the ruleset the WAN reaches the sandbox");
    topo.load_ruleset(&ruleset());
    // Dropped silently: the WAN side learns nothing.
    assert_eq!(from_wan(), "timed out");
}

#[test]
fn the_host_answers_the_sandbox_on_dns_only() {
    let topo = Topology::new();
    // Services of the router itself, on its sandbox-side and uplink addresses.
    serve_peer_address(&topo.router, v4(ROUTER_SANDBOX_ADDR, PORT));
    serve_peer_address(&topo.router, v4(ROUTER_UPLINK_ADDR, PORT));
    serve_peer_address(&topo.router, v4(ROUTER_SANDBOX_ADDR, 53));
    let probe = |addr| outcome(connect_from(&topo.sandbox, addr, TIMEOUT));
    for addr in [v4(ROUTER_SANDBOX_ADDR, PORT), v4(ROUTER_UPLINK_ADDR, PORT), v4(ROUTER_SANDBOX_ADDR, 53)] {
        assert_eq!(probe(addr), "connected", "control probe of the router's {addr}");
    }
    topo.load_ruleset(&ruleset());
    assert_eq!(probe(v4(ROUTER_SANDBOX_ADDR, PORT)), "EHOSTUNREACH");
    assert_eq!(probe(v4(ROUTER_UPLINK_ADDR, PORT)), "EHOSTUNREACH");
    assert_eq!(probe(v4(ROUTER_SANDBOX_ADDR, 53)), "connected", "DNS on the host stays open");
}

#[test]
fn loading_the_ruleset_again_replaces_it_instead_of_adding_to_it() {
    let topo = Topology::new();
    topo.load_ruleset(&ruleset());
    let first = topo.router.exec("nft", &["list", "ruleset"]);
    topo.load_ruleset(&ruleset());
    let second = topo.router.exec("nft", &["list", "ruleset"]);
    assert_eq!(first, second);
    assert_eq!(second.matches("table inet agentlab").count(), 1, "{second}");
    assert!(second.contains(&format!("iifname != \"{ROUTER_SANDBOX_IF}\" accept")), "{second}");
    assert!(second.contains("masquerade"), "{second}");
    // The address ranges the ruleset must block, as the kernel holds them.
    for range in
        ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "fc00::/7", "fe80::/10"]
    {
        assert!(second.contains(range), "{range} missing from\n{second}");
    }
}

#[test]
fn a_sandbox_can_neither_spoof_its_source_nor_route_ipv6() {
    let topo = Topology::new();
    let received = udp_receiver(&topo.wan, v4(INTERNET_ADDR, 6000));
    serve_peer_address(&topo.wan, SocketAddr::new(INTERNET_V6.parse().unwrap(), PORT));
    let send_spoofed = || {
        let socket = topo.sandbox.enter(|| std::net::UdpSocket::bind(v4(SPOOFED_ADDR, 0))).unwrap();
        socket.send_to(b"spoofed", v4(INTERNET_ADDR, 6000)).unwrap();
    };
    let v6 = || outcome(connect_from(&topo.sandbox, SocketAddr::new(INTERNET_V6.parse().unwrap(), PORT), TIMEOUT));

    // Control: without the ruleset the spoofed datagram arrives with its forged source,
    // and IPv6 is routed.
    send_spoofed();
    let (payload, from) = received.recv_timeout(TIMEOUT).unwrap();
    assert_eq!((payload.as_slice(), from.ip().to_string()), (&b"spoofed"[..], SPOOFED_ADDR.to_owned()));
    assert_eq!(v6(), "connected");

    topo.load_ruleset(&ruleset());
    send_spoofed();
    assert!(received.recv_timeout(Duration::from_secs(2)).is_err(), "a spoofed datagram left the node");
    assert_eq!(v6(), "EACCES");
    // The sandbox's own address still goes out, translated.
    let socket = topo.sandbox.enter(|| std::net::UdpSocket::bind(v4(SANDBOX_ADDR, 0))).unwrap();
    socket.send_to(b"genuine", v4(INTERNET_ADDR, 6000)).unwrap();
    let (payload, from) = received.recv_timeout(TIMEOUT).unwrap();
    assert_eq!((payload.as_slice(), from.ip().to_string()), (&b"genuine"[..], ROUTER_UPLINK_ADDR.to_owned()));
}

/// Kills and reaps a background process when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_sandbox_gets_its_lease_from_the_nodes_dnsmasq_through_the_ruleset() {
    let topo = Topology::new();
    topo.load_ruleset(&ruleset());
    // The dnsmasq configuration exactly as `agentlab host setup` installs it, for the
    // router's sandbox-side interface.
    let dir = tempfile::tempdir().unwrap();
    let setup = std::process::Command::new(agentlab_tests::bin("agentlab"))
        .args(["host", "setup", "--apply", "--bridge", ROUTER_SANDBOX_IF, "--subnet", SANDBOX_NET4, "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(setup.status.success(), "{}", agentlab_tests::describe(&setup));
    let conf = dir.path().join("etc/agentlab/dnsmasq.conf");
    let dnsmasq = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.router.name, "dnsmasq", "--keep-in-foreground"])
        .arg(format!("--conf-file={}", conf.display()))
        .arg(format!("--pid-file={}", dir.path().join("dnsmasq.pid").display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _dnsmasq = KillOnDrop(dnsmasq);

    // busybox's DHCP client in the sandbox; its event script records what it was offered.
    let lease = dir.path().join("lease");
    let script = dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip subnet=$subnet router=$router dns=$dns lease=$lease\" >{}\nexit 0\n",
            lease.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = script.to_str().unwrap().to_owned();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.sandbox.name, "busybox", "udhcpc", "-i", SANDBOX_IF, "-f", "-q", "-n"])
        .args(["-t", "10", "-T", "1", "-s", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "no lease: {}", agentlab_tests::describe(&out));
    let got = std::fs::read_to_string(&lease).unwrap();
    let ip: std::net::Ipv4Addr = got.split_whitespace().next().unwrap().strip_prefix("ip=").unwrap().parse().unwrap();
    let (first, last) = (std::net::Ipv4Addr::new(10, 77, 0, 10), std::net::Ipv4Addr::new(10, 77, 255, 254));
    assert!((first..=last).contains(&ip), "{ip} is outside the pool {first}-{last}");
    assert_eq!(
        got.trim(),
        format!("ip={ip} subnet=255.255.0.0 router={ROUTER_SANDBOX_ADDR} dns={ROUTER_SANDBOX_ADDR} lease=3600")
    );
}
