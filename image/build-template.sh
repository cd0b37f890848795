#!/usr/bin/env bash
# Builds AgentLab's Debian 12 template disk from Debian packages, without loop mounts:
#
#   debootstrap (minbase + what the template needs) into a directory, security updates
#   in a chroot, the agent and its unit copied in, then `mkfs.ext4 -d` and `mkfs.vfat` +
#   mtools make the partitions as files, sfdisk writes a GPT around them, and qemu-img
#   turns the raw disk into a sparse qcow2.
#
# Outputs in --out (default build/template):
#   disk.qcow2        GPT: ESP (systemd-boot, kernel, initrd; boots under OVMF) + ext4 root
#   vmlinuz, initrd.img, vmlinux, kernel-release
#                     the template's own kernel and initrd, for agentlabd's qemu backend
#                     (it boots them directly, with the disk as root and snapshot=on)
#   manifest.json     package versions, sizes and sha256 of every output
#
# Cached: the debootstrapped tree is kept in OUT/cache/rootfs and redone only when the
# package list or mirror changes (or with --refresh); the disk is rebuilt only when the
# agent, the files in image/template/ or this script change.
#
# Needs root (debootstrap, chroot, file ownership), debootstrap, e2fsprogs, dosfstools,
# mtools, fdisk (sfdisk), qemu-utils: scripts/install-deps.sh --template installs them.
#
# Usage: image/build-template.sh --agent PATH [--out DIR] [--size 4G] [--max-qcow2-mb N]
#                                [--mirror URL] [--refresh]
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE_DIR="$REPO_ROOT/image"
TEMPLATE_FILES="$IMAGE_DIR/template"

SUITE=bookworm
# minbase plus what the template needs. python3-cffi-backend is named because cloud-init's
# python3-cryptography depends on a virtual package of it, which debootstrap's resolver
# does not follow.
# The kernel is Debian's cloud flavour: built for VMs (virtio, vsock, PVH, EFI stub,
# Landlock), a quarter of the generic kernel's 400 MB of modules.
KERNEL_META=linux-image-cloud-amd64
PACKAGES=(
    systemd systemd-sysv systemd-resolved udev dbus kmod
    "$KERNEL_META" initramfs-tools zstd systemd-boot-efi
    git ca-certificates iproute2
    cloud-init python3-cffi-backend
)
ROOT_LABEL=agentlab-root
ESP_LABEL=AGENTLABESP
ESP_MIB=64

log() { echo "build-template.sh: $*" >&2; }
die() { echo "build-template.sh: error: $*" >&2; exit 1; }
usage() {
    echo "usage: $0 --agent PATH [--out DIR] [--size 4G] [--max-qcow2-mb N] [--mirror URL] [--refresh]" >&2
    exit 2
}

AGENT= OUT= SIZE=4G MAX_QCOW2_MB=1024 MIRROR=http://deb.debian.org/debian REFRESH=no
while (($#)); do
    case "$1" in
        --agent) AGENT=${2:-}; shift 2 || usage ;;
        --out) OUT=${2:-}; shift 2 || usage ;;
        --size) SIZE=${2:-}; shift 2 || usage ;;
        --max-qcow2-mb) MAX_QCOW2_MB=${2:-}; shift 2 || usage ;;
        --mirror) MIRROR=${2:-}; shift 2 || usage ;;
        --refresh) REFRESH=yes; shift ;;
        -h | --help) usage ;;
        *) echo "build-template.sh: unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n $AGENT ]] || usage
[[ -f $AGENT ]] || die "agent binary not found: $AGENT (make agent builds it)"
[[ $(id -u) -eq 0 ]] || die "debootstrap and the template's file ownership need root: run as root (or with sudo)"
for tool in debootstrap chroot unshare mkfs.ext4 mkfs.vfat mcopy mmd sfdisk qemu-img python3 sha256sum; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (run scripts/install-deps.sh --template)"
done
OUT=${OUT:-$REPO_ROOT/build/template}
mkdir -p "$OUT/cache"
OUT=$(cd "$OUT" && pwd)
CACHE="$OUT/cache"
source "$IMAGE_DIR/lib.sh"

# --- is the disk up to date? ----------------------------------------------------------

# The initramfs settings go in before the updates, which rebuild the initramfs.
INITRAMFS_FILES=("$TEMPLATE_FILES/initramfs-agentlab.conf" "$TEMPLATE_FILES/initramfs-modules")
ROOTFS_KEY=$( (
    printf '%s\n' "v4" "$SUITE" "$MIRROR" "${PACKAGES[@]}"
    cat "${INITRAMFS_FILES[@]}"
) | sha256sum | cut -c1-16)
BUILD_KEY=$( (
    echo "$ROOTFS_KEY $SIZE"
    sha256sum "$AGENT" "$0" "$IMAGE_DIR/lib.sh" "$TEMPLATE_FILES"/* | cut -d' ' -f1
) | sha256sum | cut -c1-16)
OUTPUTS=(disk.qcow2 vmlinuz vmlinux initrd.img kernel-release manifest.json)
up_to_date() {
    [[ $REFRESH == no && $(cat "$OUT/build.key" 2>/dev/null) == "$BUILD_KEY" ]] || return 1
    local f
    for f in "${OUTPUTS[@]}"; do [[ -s $OUT/$f ]] || return 1; done
}
if up_to_date; then
    log "up to date ($OUT, key $BUILD_KEY)"
    exit 0
fi

# --- debootstrap (cached) ----------------------------------------------------------------

# Runs a command chrooted in $1, with /proc, /sys, /dev and /run mounted in a private
# mount namespace: they vanish with the command, whatever happens. The template's
# /etc/resolv.conf points into /run (systemd-resolved), so the host's is put there.
in_chroot() {
    local root=$1
    shift
    unshare --mount --propagation private -- /bin/sh -ec '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount -t sysfs sysfs "$root/sys"
        mount --rbind /dev "$root/dev"
        mount -t tmpfs -o mode=0755 tmpfs "$root/run"
        mkdir -p "$root/run/systemd/resolve"
        cat /etc/resolv.conf >"$root/run/systemd/resolve/stub-resolv.conf"
        cp "$root/run/systemd/resolve/stub-resolv.conf" "$root/run/systemd/resolve/resolv.conf"
        exec chroot "$root" "$@"' in_chroot "$root" "$@"
}

ROOTFS="$CACHE/rootfs"
if [[ $REFRESH == yes || $(cat "$ROOTFS/.agentlab-key" 2>/dev/null) != "$ROOTFS_KEY" ]]; then
    rm -rf "$ROOTFS" "$ROOTFS.tmp"
    log "debootstrap $SUITE (minbase + ${#PACKAGES[@]} packages) from $MIRROR"
    started=$SECONDS
    include=$(IFS=,; echo "${PACKAGES[*]}")
    if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$ROOTFS.tmp" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        [[ -f $ROOTFS.tmp/debootstrap/debootstrap.log ]] && tail -n 20 "$ROOTFS.tmp/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (full log: $CACHE/debootstrap.log); check that $MIRROR is reachable"
    fi
    # Security and point-release updates, like any installed Debian system gets.
    cat >"$ROOTFS.tmp/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
    install -m 0644 "$TEMPLATE_FILES/initramfs-agentlab.conf" "$ROOTFS.tmp/etc/initramfs-tools/conf.d/agentlab.conf"
    install -m 0644 "$TEMPLATE_FILES/initramfs-modules" "$ROOTFS.tmp/etc/initramfs-tools/modules"
    printf '#!/bin/sh\nexit 101\n' >"$ROOTFS.tmp/usr/sbin/policy-rc.d"
    chmod 0755 "$ROOTFS.tmp/usr/sbin/policy-rc.d"
    log "apt-get dist-upgrade (security updates) in the chroot"
    if ! in_chroot "$ROOTFS.tmp" /bin/sh -ec 'export DEBIAN_FRONTEND=noninteractive
        apt-get -qq --error-on=any update
        apt-get -qq -y -o Dpkg::Options::=--force-confold dist-upgrade
        # Only the kernel the meta package now depends on stays (debootstrap marked the
        # first one manually installed, so autoremove would keep it).
        keep=$(dpkg-query -W -f "\${Depends}" "$1" | grep -o "linux-image-[0-9][^ ,]*" | head -n1)
        dpkg-query -W -f "\${Package}\n" "linux-image-[0-9]*" | grep -vx "$keep" |
            xargs -r apt-get -qq -y purge
        apt-get -qq -y autoremove --purge
        update-initramfs -u -k all
        apt-get clean' sh "$KERNEL_META" >>"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        die "updating the template failed (full log: $CACHE/debootstrap.log)"
    fi
    rm -f "$ROOTFS.tmp/usr/sbin/policy-rc.d"
    rm -rf "$ROOTFS.tmp"/var/lib/apt/lists/* "$ROOTFS.tmp"/var/cache/apt/*.bin "$ROOTFS.tmp/debootstrap"
    echo "$ROOTFS_KEY" >"$ROOTFS.tmp/.agentlab-key"
    mv "$ROOTFS.tmp" "$ROOTFS"
    log "debootstrap + updates: $((SECONDS - started)) s"
fi

# --- customise a copy --------------------------------------------------------------------

STAGE="$OUT/.staging"
rm -rf "$STAGE"
mkdir -p "$STAGE"
TREE="$STAGE/root"
cp -a "$ROOTFS" "$TREE"
rm -f "$TREE/.agentlab-key"

install -m 0755 "$AGENT" "$TREE/usr/bin/agentlab-agent"
install -m 0644 "$TEMPLATE_FILES/agentlab-agent.service" "$TREE/etc/systemd/system/agentlab-agent.service"
install -m 0644 "$TEMPLATE_FILES/modules-load-agentlab.conf" "$TREE/etc/modules-load.d/agentlab.conf"
install -m 0644 "$TEMPLATE_FILES/80-agentlab-dhcp.network" "$TREE/etc/systemd/network/80-agentlab-dhcp.network"
install -m 0644 "$TEMPLATE_FILES/fstab" "$TREE/etc/fstab"
mkdir -p "$TREE/boot/efi"
# The template's own systemctl and useradd (chroot needs no mounts for these).
chroot "$TREE" systemctl --quiet enable agentlab-agent.service systemd-networkd.service systemd-resolved.service

# The unprivileged user jobs run as (uid 1000, as in the micro image) and its workspace.
# No password, no sudo.
if ! chroot "$TREE" getent passwd agent >/dev/null; then
    chroot "$TREE" useradd --uid 1000 --user-group --create-home --shell /bin/bash agent
fi
install -d -m 0755 -o 1000 -g 1000 "$TREE/workspace"
echo agentlab >"$TREE/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tagentlab\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$TREE/etc/hosts"
# Every clone gets its own machine-id at first boot (an empty file means "not yet set").
: >"$TREE/etc/machine-id"
rm -f "$TREE/var/lib/dbus/machine-id" "$TREE"/etc/ssh/ssh_host_*
# cloud-init is there for operators who use it (Proxmox's cloud-init drive); AgentLab
# needs nothing from it. Without a datasource, its generator keeps it disabled.
rm -rf "$TREE"/var/lib/cloud/* "$TREE"/var/log/* "$TREE"/tmp/* "$TREE"/var/tmp/*

KRELEASE=$(basename "$(ls -d "$TREE"/lib/modules/* | sort -V | tail -n1)")
[[ -f $TREE/boot/vmlinuz-$KRELEASE && -f $TREE/boot/initrd.img-$KRELEASE ]] ||
    die "the template has no kernel or initrd for $KRELEASE under /boot"
EFI_STUB="$TREE/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
[[ -f $EFI_STUB ]] || die "systemd-boot-efi is not installed in the template ($EFI_STUB)"

# --- partitions as files, then the disk ------------------------------------------------------

size_bytes=$(numfmt --from=iec "$SIZE") || die "--size $SIZE is not a size like 4G"
(( size_bytes >= 2 * 1024 * 1024 * 1024 )) || die "--size $SIZE is too small: the template needs at least 2G"
MIB=$((1024 * 1024))
ROOT_START_MIB=$((1 + ESP_MIB))
# The backup GPT takes the last MiB.
ROOT_MIB=$((size_bytes / MIB - ROOT_START_MIB - 1))

log "ext4 root filesystem ($ROOT_MIB MiB) from the tree"
truncate -s "${ROOT_MIB}M" "$STAGE/root.img"
mkfs.ext4 -q -L "$ROOT_LABEL" -d "$TREE" -m 1 "$STAGE/root.img"
# Checked once here: the template's fstab skips the boot-time fsck (see image/template/fstab).
e2fsck -fn "$STAGE/root.img" >"$STAGE/e2fsck.log" 2>&1 || { cat "$STAGE/e2fsck.log" >&2; die "e2fsck found errors in the new root filesystem"; }

log "EFI system partition (${ESP_MIB} MiB): systemd-boot, kernel, initrd"
truncate -s "${ESP_MIB}M" "$STAGE/esp.img"
mkfs.vfat -F 32 -n "$ESP_LABEL" "$STAGE/esp.img" >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$STAGE/esp.img" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
mcopy -i "$STAGE/esp.img" "$EFI_STUB" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$STAGE/esp.img" "$TREE/boot/vmlinuz-$KRELEASE" ::/vmlinuz
mcopy -i "$STAGE/esp.img" "$TREE/boot/initrd.img-$KRELEASE" ::/initrd.img
mcopy -i "$STAGE/esp.img" "$TEMPLATE_FILES/loader.conf" ::/loader/loader.conf
mcopy -i "$STAGE/esp.img" "$TEMPLATE_FILES/loader-entry.conf" ::/loader/entries/agentlab.conf

log "GPT disk ($SIZE) -> qcow2"
truncate -s "$size_bytes" "$STAGE/disk.raw"
# sfdisk counts in 512-byte sectors: 2048 sectors = 1 MiB.
sfdisk --quiet "$STAGE/disk.raw" <<EOF
label: gpt
start=2048, size=$((ESP_MIB * 2048)), type=U, name="esp"
start=$((ROOT_START_MIB * 2048)), size=$((ROOT_MIB * 2048)), type=L, name="root"
EOF
dd if="$STAGE/esp.img" of="$STAGE/disk.raw" bs=1M seek=1 conv=notrunc status=none
dd if="$STAGE/root.img" of="$STAGE/disk.raw" bs=1M seek="$ROOT_START_MIB" conv=notrunc,sparse status=none
qemu-img convert -f raw -O qcow2 "$STAGE/disk.raw" "$STAGE/disk.qcow2"

qcow2_mb=$(( $(stat -c %s "$STAGE/disk.qcow2") / MIB ))
(( qcow2_mb <= MAX_QCOW2_MB )) ||
    die "disk.qcow2 is $qcow2_mb MiB, over the $MAX_QCOW2_MB MiB cap: trim the package list or raise --max-qcow2-mb"

# --- outputs ------------------------------------------------------------------------------------

cp "$TREE/boot/vmlinuz-$KRELEASE" "$STAGE/vmlinuz"
cp "$TREE/boot/initrd.img-$KRELEASE" "$STAGE/initrd.img"
extract_vmlinux "$STAGE/vmlinuz" "$STAGE/vmlinux" || die "could not find an ELF kernel inside vmlinuz-$KRELEASE"
echo "$KRELEASE" >"$STAGE/kernel-release"
chroot "$TREE" dpkg-query -W -f '${Package} ${Version}\n' >"$STAGE/packages"
for f in disk.qcow2 vmlinuz vmlinux initrd.img kernel-release; do mv "$STAGE/$f" "$OUT/$f"; done

OUT="$OUT" KRELEASE="$KRELEASE" SIZE="$SIZE" PACKAGES_FILE="$STAGE/packages" ROOT_MIB="$ROOT_MIB" \
    python3 - <<'EOF'
import hashlib, json, os
e = os.environ
out = e["OUT"]
files = {}
for name in ["disk.qcow2", "vmlinuz", "vmlinux", "initrd.img", "kernel-release"]:
    h = hashlib.sha256()
    with open(os.path.join(out, name), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    files[name] = {"sha256": h.hexdigest(), "size": os.path.getsize(os.path.join(out, name))}
with open(e["PACKAGES_FILE"]) as f:
    packages = dict(line.split(" ", 1) for line in f.read().splitlines() if " " in line)
manifest = {
    "kernel_release": e["KRELEASE"],
    "disk_virtual_size": e["SIZE"],
    "root_partition_mib": int(e["ROOT_MIB"]),
    "packages": packages,
    "files": files,
}
tmp = os.path.join(out, "manifest.json.tmp")
with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
os.replace(tmp, os.path.join(out, "manifest.json"))
EOF
rm -rf "$STAGE"
echo "$BUILD_KEY" >"$OUT/build.key"
used_mb=$(du -sm --exclude=.agentlab-key "$ROOTFS" | cut -f1)
echo "template: Debian 12, kernel $KRELEASE, $used_mb MiB of files, disk.qcow2 $qcow2_mb MiB" \
    "(virtual $SIZE) -> $OUT"
