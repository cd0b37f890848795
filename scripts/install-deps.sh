#!/usr/bin/env bash
# Installs what building and running AgentLab locally needs, idempotently:
# Debian packages for the microVM, the musl target for the static agent, and
# vhost-device-vsock (the hybrid-vsock device behind QEMU's vhost-user-vsock-pci).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: not root and no sudo: install qemu-system-x86 busybox-static cpio as root" >&2
  fi
fi

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkgs+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
command -v cpio >/dev/null 2>&1 || need_pkgs+=(cpio)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
command -v file >/dev/null 2>&1 || need_pkgs+=(file)
# The network-isolation tests: namespaces, veth pairs and the real nftables ruleset.
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v nft >/dev/null 2>&1 || need_pkgs+=(nftables)
# The host-setup test checks the dnsmasq configuration it installs with `dnsmasq --test`.
command -v dnsmasq >/dev/null 2>&1 || need_pkgs+=(dnsmasq-base)
# packer/ is validated with Debian's packer (it has the Proxmox builders built in).
command -v packer >/dev/null 2>&1 || need_pkgs+=(packer)
command -v ssh-keygen >/dev/null 2>&1 || need_pkgs+=(openssh-client)
# image/build-template.sh: the Debian 12 template disk, built without loop mounts.
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
command -v mkfs.vfat >/dev/null 2>&1 || need_pkgs+=(dosfstools)
command -v mcopy >/dev/null 2>&1 || need_pkgs+=(mtools)
command -v sfdisk >/dev/null 2>&1 || need_pkgs+=(fdisk)
command -v qemu-img >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
# Debian's cloud kernel is lz4-compressed: the template's vmlinux is extracted with it.
command -v lz4 >/dev/null 2>&1 || need_pkgs+=(lz4)
# The template test boots its disk through UEFI, as Proxmox does with bios: ovmf.
[ -f /usr/share/ovmf/OVMF.fd ] || need_pkgs+=(ovmf)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# image/build.sh downloads the kernel package with apt-get download: it needs package lists.
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi

if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  echo "install-deps: rustup target add x86_64-unknown-linux-musl"
  rustup target add x86_64-unknown-linux-musl
fi

if ! command -v vhost-device-vsock >/dev/null 2>&1; then
  echo "install-deps: cargo install vhost-device-vsock --locked (a few minutes, once)"
  cargo install vhost-device-vsock --locked --quiet
fi
echo "install-deps: ok"
