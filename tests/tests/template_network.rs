//! The whole node-side network with a real sandbox VM: the Debian template boots with a
//! virtio NIC on a tap device inside a router namespace that runs the repository's
//! nftables ruleset and dnsmasq with the configuration `agentlab host setup` installs.
//! The template's systemd-networkd takes a DHCP lease; a job (through the real agent
//! and host session, over vsock) reaches an "internet" address in a WAN namespace
//! through NAT and is refused a private one. Nothing leaves the test's namespaces: the
//! router's only route out leads into the WAN namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use agentlab_protocol::transport::hybrid;
use agentlab_protocol::{AGENT_VSOCK_PORT, JobOutcome, JobSpec, SandboxSpec};
use agentlab_tests::netns::{
    INTERNET_ADDR, Netns, ROUTER_SANDBOX_ADDR, ROUTER_UPLINK_ADDR, WAN_ADDR, load_ruleset, serve_peer_address,
};
use agentlab_tests::{SessionRecord, VsockDevice, accept_dial_in, bin, console_tail, describe, workspace_root};

const TAP: &str = "tap-sb";
const BLOCKED: &str = "10.99.0.10";

fn template_dir() -> PathBuf {
    let dir = workspace_root().join("build/template");
    assert!(dir.join("disk.qcow2").is_file(), "the template is not built: run `make template`");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_vm_gets_a_lease_reaches_the_internet_through_nat_and_not_the_lan() {
    let template = template_dir();
    let id = format!("agentlab-t{}-vmnet", std::process::id());
    let router = Netns::create(format!("{id}-router"));
    let wan = Netns::create(format!("{id}-wan"));
    router.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
    router.ip(&["addr", "add", &format!("{ROUTER_SANDBOX_ADDR}/16"), "dev", TAP]);
    router.ip(&["link", "set", TAP, "up"]);
    router.ip(&["link", "add", "r-wan", "type", "veth", "peer", "name", "w-rt", "netns", &wan.name]);
    router.ip(&["link", "set", "r-wan", "up"]);
    wan.ip(&["link", "set", "w-rt", "up"]);
    router.ip(&["addr", "add", &format!("{ROUTER_UPLINK_ADDR}/24"), "dev", "r-wan"]);
    router.ip(&["route", "add", "default", "via", WAN_ADDR]);
    wan.ip(&["addr", "add", &format!("{WAN_ADDR}/24"), "dev", "w-rt"]);
    for addr in [INTERNET_ADDR, BLOCKED] {
        wan.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        serve_peer_address(&wan, SocketAddr::new(addr.parse().unwrap(), 8080));
    }
    router.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    load_ruleset(&router, &workspace_root().join("host/nftables/agentlab.nft"), TAP);

    let dir = tempfile::Builder::new().prefix("agentlab-vmnet-").tempdir().unwrap();
    let setup = std::process::Command::new(bin("agentlab"))
        .args(["host", "setup", "--apply", "--bridge", TAP, "--subnet", "10.77.0.0/16", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(setup.status.success(), "{}", describe(&setup));
    // Bound for the test's length: kill_on_drop ends it however the test ends.
    let _dnsmasq = tokio::process::Command::new("ip")
        .args(["netns", "exec", &router.name, "dnsmasq", "--keep-in-foreground"])
        .arg(format!("--conf-file={}", dir.path().join("etc/agentlab/dnsmasq.conf").display()))
        .arg(format!("--pid-file={}", dir.path().join("dnsmasq.pid").display()))
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The VM, as agentlabd's qemu backend boots a template, plus a NIC on the tap.
    let console = dir.path().join("console.log");
    let vsock = VsockDevice::start(dir.path()).await;
    let listener = hybrid::listen(&vsock.uds, AGENT_VSOCK_PORT).unwrap();
    let _qemu = tokio::process::Command::new("ip")
        .args(["netns", "exec", &router.name, "qemu-system-x86_64"])
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024M", "-smp", "2"])
        .args(["-object", "memory-backend-memfd,id=mem,size=1024M,share=on", "-numa", "node,memdev=mem"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(template.join("vmlinux"))
        .arg("-initrd")
        .arg(template.join("initrd.img"))
        .args(["-append", "root=LABEL=agentlab-root ro rootwait console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2,snapshot=on", template.join("disk.qcow2").display()))
        .args(["-netdev", &format!("tap,id=n0,ifname={TAP},script=no,downscript=no")])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .arg("-chardev")
        .arg(format!("socket,id=vsock0,path={}", vsock.vhost_sock.display()))
        .args(["-device", "vhost-user-vsock-pci,chardev=vsock0", "-serial"])
        .arg(format!("file:{}", console.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stream = accept_dial_in(&listener, &console, Duration::from_secs(240)).await;

    // The job waits for its lease, then tries the internet and a private address.
    let script = format!(
        "for i in $(seq 300); do ip -4 -o addr show scope global | grep -q 'inet 10\\.77\\.' && break; sleep 0.1; done\n\
         ip -4 -o addr show scope global | awk '{{print \"lease=\" $4}}'\n\
         ip -4 route show default | awk '{{print \"gateway=\" $3}}'\n\
         exec 3<>/dev/tcp/{INTERNET_ADDR}/8080 && read -r seen <&3 && echo \"internet-saw=$seen\"\n\
         (exec 4<>/dev/tcp/{BLOCKED}/8080) 2>&1 | sed -n 's/^.*: connect: /private=/p'\n"
    );
    let spec = JobSpec {
        job_id: "job-vmnet".into(),
        program: "/bin/bash".into(),
        args: vec!["-c".into(), script],
        env: Vec::new(),
        workdir: "/workspace".into(),
        timeout_ms: 120_000,
        kill_grace_ms: 2_000,
        workdir_upload_bytes: None,
        sandbox: SandboxSpec { network_off: false, ..SandboxSpec::default() },
    };
    let mut session = agentlab_host::channel::HostSession::new(stream);
    let mut seen = SessionRecord::default();
    let result = session.run("sb-vmnet", spec, agentlab_protocol::SecretBundle::default(), None, &mut seen).await;
    session.shutdown().await;
    let result = result.unwrap_or_else(|e| panic!("{e}; console:\n{}", console_tail(&console)));
    let stdout = String::from_utf8_lossy(&seen.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&seen.stderr).into_owned();
    assert_eq!(result.outcome, JobOutcome::Exited { code: 0 }, "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}\n{stderr}");
    let lease = lines[0].strip_prefix("lease=").unwrap();
    let (ip, prefix) = lease.split_once('/').unwrap();
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let pool = std::net::Ipv4Addr::new(10, 77, 0, 10)..=std::net::Ipv4Addr::new(10, 77, 255, 254);
    assert!(pool.contains(&ip) && prefix == "16", "{lease}");
    assert_eq!(
        &lines[1..],
        [
            format!("gateway={ROUTER_SANDBOX_ADDR}"),
            format!("internet-saw={ROUTER_UPLINK_ADDR}"),
            "private=No route to host".to_owned()
        ]
    );
}
