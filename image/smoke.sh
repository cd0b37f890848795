#!/usr/bin/env bash
# Smoke test of the boot chain: boots baseline-initrd.img under QEMU (TCG) with a
# vhost-user vsock device served by vhost-device-vsock, and checks that the guest dials
# the host (vsock CID 2, port 52000) and says "HELLO\n", then powers off.
#
# Host side uses Unix sockets only (hybrid vsock): a guest connection to host port P
# arrives as a connection on "$DIR/vsock.sock_P", where we listen before QEMU starts.
#
# Measures QEMU start -> HELLO received for vmlinux (PVH boot) and vmlinuz, RUNS boots
# each, then probes what -accel kvm does on this machine (bounded by a timeout).
#
# Usage: image/smoke.sh [--image DIR] [--runs N] [--kvm-timeout SECS] [--no-kvm]
#                       [--append "EXTRA KERNEL ARGS"]
# Needs: qemu-system-x86_64, vhost-device-vsock (PATH or ~/.cargo/bin), python3.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE="$REPO_ROOT/build/image"
RUNS=3
KVM_TIMEOUT=15
KVM=1
EXTRA_APPEND=

usage() {
    echo "usage: $0 [--image DIR] [--runs N] [--kvm-timeout SECS] [--no-kvm] [--append ARGS]" >&2
    exit 2
}
while (($#)); do
    case "$1" in
        --image) IMAGE=${2:-}; shift 2 || usage ;;
        --runs) RUNS=${2:-}; shift 2 || usage ;;
        --kvm-timeout) KVM_TIMEOUT=${2:-}; shift 2 || usage ;;
        --no-kvm) KVM=0; shift ;;
        --append) EXTRA_APPEND=${2:-}; shift 2 || usage ;;
        -h | --help) usage ;;
        *) echo "smoke.sh: unknown argument: $1" >&2; usage ;;
    esac
done

die() { echo "smoke.sh: error: $*" >&2; exit 1; }
for f in vmlinux vmlinuz baseline-initrd.img; do
    [[ -s $IMAGE/$f ]] || die "$IMAGE/$f missing: run image/build.sh first"
done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found"
VHOST=$(command -v vhost-device-vsock || true)
[[ -n $VHOST ]] || VHOST="$HOME/.cargo/bin/vhost-device-vsock"
[[ -x $VHOST ]] || die "vhost-device-vsock not found (cargo install vhost-device-vsock)"
PYTHON=$(command -v /usr/bin/python3 || command -v python3) || die "python3 not found"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/agentlab-smoke.XXXXXX")
# The orchestrator records every process it starts in $WORK/pids; whatever is still
# running when we leave (even on ^C) is killed by its pid, then the sockets go.
PY_PID=
cleanup() {
    local pid
    if [[ -n $PY_PID ]] && kill -0 "$PY_PID" 2>/dev/null; then
        kill -KILL "$PY_PID" 2>/dev/null || true
    fi
    if [[ -f $WORK/pids ]]; then
        while read -r pid; do
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        done <"$WORK/pids"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$WORK/smoke.py" <<'PYEOF'
import os, socket, statistics, subprocess, sys, threading, time

IMAGE, WORK, VHOST = os.environ["IMAGE"], os.environ["WORK"], os.environ["VHOST"]
RUNS, KVM_TIMEOUT = int(os.environ["RUNS"]), float(os.environ["KVM_TIMEOUT"])
PORT = 52000  # agentlab_protocol::AGENT_VSOCK_PORT
GUEST_CID = 3
# Kernel command line: quiet serial console; any panic reboots at once (panic=-1, via
# triple fault: reboot=t), which -no-reboot turns into a QEMU exit; skip the crypto
# self-tests (~0.3 s under TCG), probe one UART and no PS/2 mouse/PnP.
APPEND = ("console=ttyS0 quiet panic=-1 reboot=t cryptomgr.notests 8250.nr_uarts=1 "
          "i8042.noaux i8042.nopnp " + os.environ.get("EXTRA_APPEND", "")).strip()
MEM = "256M"
seq = 0


def log(msg):
    print(f"smoke: {msg}", flush=True)


def track(proc):
    with open(f"{WORK}/pids", "a") as f:
        f.write(f"{proc.pid}\n")
    return proc


def stop(proc, grace=2.0):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def qemu_cmd(d, kernel, accel, monitor=False):
    cmd = ["qemu-system-x86_64", "-accel", accel, "-M", "q35", "-m", MEM, "-smp", "1",
           "-object", f"memory-backend-memfd,id=mem,size={MEM},share=on",
           "-numa", "node,memdev=mem",
           "-chardev", f"socket,id=vsock0,path={d}/vhost.sock",
           "-device", "vhost-user-vsock-pci,chardev=vsock0",
           "-kernel", f"{IMAGE}/{kernel}", "-initrd", f"{IMAGE}/baseline-initrd.img",
           "-append", APPEND,
           "-nographic", "-nodefaults", "-serial", f"file:{d}/serial.log", "-no-reboot"]
    if monitor:
        cmd += ["-monitor", f"unix:{d}/monitor.sock,server=on,wait=off"]
    return cmd


def hmp(d, command):
    """One human-monitor command over the monitor's Unix socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(f"{d}/monitor.sock")
        out = b""
        s.sendall(command.encode() + b"\n")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and out.count(b"(qemu)") < 2:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out.decode(errors="replace").replace("\r", "")
    finally:
        s.close()


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def boot(kernel, accel, hello_timeout, monitor=False):
    """Boots once; returns a dict describing what happened."""
    global seq
    seq += 1
    d = f"{WORK}/boot{seq}"
    os.mkdir(d)
    res = {"kernel": kernel, "accel": accel}
    # 1. Listen where vhost-device-vsock forwards guest connections to host port PORT.
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{d}/vsock.sock_{PORT}")
    lst.listen(1)
    vhost = qemu = None
    try:
        # 2. The vhost-user backend; QEMU needs its socket to exist when it starts.
        vhost = track(subprocess.Popen(
            [VHOST, "--vm", f"guest-cid={GUEST_CID},socket={d}/vhost.sock,"
                            f"uds-path={d}/vsock.sock"],
            stdin=subprocess.DEVNULL, stdout=open(f"{d}/vhost.log", "w"),
            stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 5
        while not os.path.exists(f"{d}/vhost.sock"):
            if vhost.poll() is not None or time.monotonic() > deadline:
                res["error"] = "vhost-device-vsock did not create its socket: " + \
                    open(f"{d}/vhost.log").read()[-500:]
                return res
            time.sleep(0.002)
        # 3. QEMU; the clock starts now.
        t0 = time.monotonic()
        qemu = track(subprocess.Popen(qemu_cmd(d, kernel, accel, monitor),
                                      stdin=subprocess.DEVNULL,
                                      stdout=open(f"{d}/qemu.log", "w"),
                                      stderr=subprocess.STDOUT))
        res["marks"] = marks = {}
        done = threading.Event()

        def watch_serial():
            keys = {"SeaBIOS": "firmware banner", "Linux version": "kernel console"}
            while not done.is_set():
                try:
                    text = open(f"{d}/serial.log", errors="replace").read()
                except OSError:
                    text = ""
                for key, name in keys.items():
                    if key in text and name not in marks:
                        marks[name] = time.monotonic() - t0
                done.wait(0.005)

        watcher = threading.Thread(target=watch_serial, daemon=True)
        watcher.start()
        # 4. Wait for the guest's connection (or QEMU's death, or the timeout).
        lst.settimeout(0.05)
        conn = None
        while conn is None:
            try:
                conn, _ = lst.accept()
            except socket.timeout:
                if qemu.poll() is not None:
                    res["error"] = f"QEMU exited (rc={qemu.returncode}) after " \
                        f"{(time.monotonic() - t0) * 1000:.0f} ms without a connection"
                    break
                if time.monotonic() - t0 > hello_timeout:
                    res["error"] = f"no connection within {hello_timeout:g} s"
                    break
        if conn is not None:
            conn.settimeout(max(1.0, hello_timeout - (time.monotonic() - t0)))
            data = b""
            try:
                while len(data) < 6:
                    chunk = conn.recv(6 - len(data))
                    if not chunk:
                        break
                    data += chunk
            except socket.timeout:
                pass
            t1 = time.monotonic()
            res["hello"] = data
            res["hello_ms"] = (t1 - t0) * 1000
            # 5. Closing makes the guest power off, which must end QEMU.
            conn.close()
            try:
                res["rc"] = qemu.wait(10)
                res["exit_ms"] = (time.monotonic() - t1) * 1000
            except subprocess.TimeoutExpired:
                res["error"] = "QEMU still running 10 s after the host closed"
            if data != b"HELLO\n":
                res["error"] = f"expected b'HELLO\\n', got {data!r}"
        elif qemu.poll() is None:
            res["cpu_s"] = cpu_seconds(qemu.pid)
            res["elapsed_s"] = time.monotonic() - t0
            if monitor:
                try:
                    regs = hmp(d, "info registers")
                    res["regs"] = " ".join(w for w in regs.split()
                                           if w.startswith(("RIP=", "CR0=", "HLT=")))
                except OSError as e:
                    res["regs"] = f"(monitor: {e})"
        done.set()
        watcher.join()
        res["qemu_log"] = open(f"{d}/qemu.log", errors="replace").read().strip()
        res["serial_tail"] = open(f"{d}/serial.log", errors="replace").read()[-400:]
        return res
    finally:
        for p in (qemu, vhost):
            if p is not None:
                stop(p)
        lst.close()


def kvm_loop_ms(iterations=10000):
    """Runs a tiny real-mode guest (a register-only loop, then HLT) straight on /dev/kvm
    and returns the wall time of KVM_RUN in ms. Hardware virtualisation runs it in well
    under 0.1 ms; an emulating or trapping KVM takes orders of magnitude longer."""
    import ctypes, mmap, struct
    libc = ctypes.CDLL(None, use_errno=True)

    def ioctl(fd, req, arg=0):
        r = libc.ioctl(fd, ctypes.c_ulong(req), arg)
        if r < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return r

    KVM_CREATE_VM, KVM_GET_VCPU_MMAP_SIZE, KVM_CREATE_VCPU, KVM_RUN = 0xAE01, 0xAE04, 0xAE41, 0xAE80
    KVM_SET_USER_MEMORY_REGION, KVM_GET_SREGS, KVM_SET_SREGS, KVM_SET_REGS = \
        0x4020AE46, 0x8138AE83, 0x4138AE84, 0x4090AE82
    KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
    # mov ecx, N; 1: dec ecx; jnz 1b; hlt
    code = b"\x66\xb9" + struct.pack("<I", iterations) + b"\x66\x49\x75\xfc\xf4"
    fds = []
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        fds.append(kvm)
        vm = ioctl(kvm, KVM_CREATE_VM)
        fds.append(vm)
        mem = mmap.mmap(-1, 0x10000)
        mem[0x1000:0x1000 + len(code)] = code
        buf = ctypes.c_char.from_buffer(mem)
        region = ctypes.create_string_buffer(
            struct.pack("IIQQQ", 0, 0, 0, 0x10000, ctypes.addressof(buf)), 32)
        ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        vcpu = ioctl(vm, KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        run = mmap.mmap(vcpu, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE))
        sregs = ctypes.create_string_buffer(312)
        ioctl(vcpu, KVM_GET_SREGS, sregs)
        struct.pack_into("Q", sregs, 0, 0)  # cs.base
        struct.pack_into("H", sregs, 12, 0)  # cs.selector
        ioctl(vcpu, KVM_SET_SREGS, sregs)
        regs = ctypes.create_string_buffer(144)
        struct.pack_into("QQ", regs, 128, 0x1000, 2)  # rip, rflags
        ioctl(vcpu, KVM_SET_REGS, regs)
        t = time.perf_counter()
        reason = KVM_EXIT_IO
        while reason == KVM_EXIT_IO:
            ioctl(vcpu, KVM_RUN)
            reason = struct.unpack_from("I", run, 8)[0]
        elapsed = (time.perf_counter() - t) * 1000
        del buf
        run.close()
        if reason != KVM_EXIT_HLT:
            raise OSError(f"unexpected KVM exit reason {reason}")
        return elapsed
    finally:
        for fd in reversed(fds):
            os.close(fd)


def where(regs):
    """Reads a vCPU's whereabouts from HMP 'info registers' words."""
    vals = dict(w.split("=", 1) for w in regs.split() if "=" in w)
    try:
        cr0, rip = int(vals["CR0"], 16), int(vals["RIP"], 16)
    except (KeyError, ValueError):
        return "unknown"
    if not cr0 & 1:
        return "real mode (firmware)"
    if rip >= 0xFFFFFFFF80000000:
        return "in the kernel, not yet at its console"
    return "protected mode, outside the kernel image (boot code)"


def describe(r):
    if "hello_ms" in r and "error" not in r:
        return f"HELLO after {r['hello_ms']:.0f} ms; QEMU exited rc={r['rc']} " \
               f"{r['exit_ms']:.0f} ms after the host closed"
    return r.get("error", "failed")


failed = False
log(f"kernel cmdline: {APPEND}")
summary = {}
for kernel, what in (("vmlinux", "vmlinux (PVH)"), ("vmlinuz", "vmlinuz (bzImage)")):
    times = []
    for i in range(RUNS):
        r = boot(kernel, "tcg", 60)
        log(f"{what} tcg run {i + 1}: {describe(r)}")
        if "error" in r:
            failed = True
            log(f"  qemu: {r['qemu_log'][-500:]}")
            log(f"  serial tail: {r['serial_tail']!r}")
        else:
            times.append(r["hello_ms"])
    if times:
        summary[what] = times
for what, times in summary.items():
    log(f"{what}: QEMU start -> HELLO: " + ", ".join(f"{t:.0f}" for t in times) +
        f" ms (median {statistics.median(times):.0f} ms)")

if os.environ["KVM"] == "1":
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log("kvm: /dev/kvm not usable; skipped")
    else:
        r = boot("vmlinux", "kvm", KVM_TIMEOUT, monitor=True)
        if "hello_ms" in r and "error" not in r:
            log(f"kvm: works: {describe(r)}")
        else:
            log(f"kvm: {describe(r)}")
            stages = ", ".join(f"{k} at {v * 1000:.0f} ms"
                               for k, v in sorted(r.get("marks", {}).items(),
                                                  key=lambda kv: kv[1])) or "no serial output"
            log(f"kvm: serial: {stages}")
            if "cpu_s" in r:
                log(f"kvm: QEMU alive, {r['cpu_s']:.1f} s CPU in {r['elapsed_s']:.1f} s; "
                    f"vCPU {where(r.get('regs', ''))}: {r.get('regs', '?')}")
            if r.get("qemu_log"):
                log(f"kvm: qemu said: {r['qemu_log'][-300:]}")
            log("kvm: killed QEMU")
        try:
            ms = kvm_loop_ms()
            verdict = "hardware speed" if ms < 1 else "far too slow: KVM emulates; use TCG"
            log(f"kvm: fast probe: 10k-iteration guest loop on /dev/kvm took {ms:.2f} ms "
                f"({verdict}; hardware takes < 0.1 ms)")
        except OSError as e:
            log(f"kvm: fast probe failed: {e}")
sys.exit(1 if failed else 0)
PYEOF

# In the background, so that a TERM to this script runs the cleanup trap at once.
IMAGE="$IMAGE" WORK="$WORK" VHOST="$VHOST" RUNS="$RUNS" KVM_TIMEOUT="$KVM_TIMEOUT" KVM="$KVM" \
    EXTRA_APPEND="$EXTRA_APPEND" "$PYTHON" "$WORK/smoke.py" &
PY_PID=$!
wait "$PY_PID"
