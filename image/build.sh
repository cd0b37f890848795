#!/usr/bin/env bash
# Builds AgentLab's micro image from Debian packages:
#
#   vmlinuz              Debian bookworm's 6.1 kernel (linux-image-amd64's dependency)
#   vmlinux              the same kernel, uncompressed (ELF, for q35 PVH boot)
#   initrd.img           agent image: /init = guest agent, busybox, vsock modules
#   baseline-initrd.img  same, but /init = baseline-init and no busybox
#   kernel-release       e.g. 6.1.0-56-amd64
#   manifest.json        versions and sha256 of every output
#
# Work is cached under $OUT/cache (downloaded .debs, the extracted kernel and modules),
# so a rebuild only repacks the initramfs. Needs no root: mkcpio.py sets ownership and
# device nodes inside the archive.
#
# Usage: image/build.sh --agent PATH --baseline PATH [--out DIR]
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE_DIR="$REPO_ROOT/image"

# Loaded by /init in this order (each after its dependencies).
MODULES=(
    virtio_ring
    virtio
    virtio_pci_modern_dev
    virtio_pci_legacy_dev
    virtio_pci
    vsock
    vmw_vsock_virtio_transport_common
    vmw_vsock_virtio_transport
)
META_PACKAGE=linux-image-amd64
# Bookworm's own 6.1 series only: excludes backports (~bpo) and other suites' builds.
KERNEL_VERSION_RE='^6\.1\.[0-9]+-[0-9]+$'

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

usage() {
    echo "usage: $0 --agent PATH --baseline PATH [--out DIR]" >&2
    exit 2
}

AGENT= BASELINE= OUT=
while (($#)); do
    case "$1" in
        --agent) AGENT=${2:-}; shift 2 || usage ;;
        --baseline) BASELINE=${2:-}; shift 2 || usage ;;
        --out) OUT=${2:-}; shift 2 || usage ;;
        -h | --help) usage ;;
        *) echo "build.sh: unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n $AGENT && -n $BASELINE ]] || usage
[[ -f $AGENT ]] || die "agent binary not found: $AGENT"
[[ -f $BASELINE ]] || die "baseline-init binary not found: $BASELINE"
OUT=${OUT:-$REPO_ROOT/build/image}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CACHE="$OUT/cache"
mkdir -p "$CACHE/debs"

for tool in apt-cache apt-get dpkg-deb file sha256sum; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
# The system interpreter starts faster than a version-manager shim.
PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)} ||
    die "missing tool: python3"

APT_OPTS=(-o APT::Sandbox::User=root -qq)

# --- resolve the kernel package ------------------------------------------------------

# Prints "PACKAGE VERSION" of the kernel that bookworm's linux-image-amd64 depends on.
resolve_kernel() {
    local meta_ver dep kver
    meta_ver=$(apt-cache madison "$META_PACKAGE" 2>/dev/null |
        awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -E "$KERNEL_VERSION_RE" |
        sort -V | tail -n1) || true
    [[ -n $meta_ver ]] || return 1
    dep=$(apt-cache show "$META_PACKAGE=$meta_ver" 2>/dev/null | sed -n 's/^Depends: //p' |
        head -n1 | tr ',' '\n' | grep -oE 'linux-image-6\.1\.[0-9]+-[0-9]+-amd64' | head -n1) ||
        true
    [[ -n $dep ]] || return 1
    kver=$(apt-cache madison "$dep" 2>/dev/null |
        awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -E "$KERNEL_VERSION_RE" |
        sort -V | tail -n1) || true
    [[ -n $kver ]] || return 1
    echo "$dep $kver"
}

# Downloads PACKAGE=VERSION into the cache unless it is there; prints the .deb path.
fetch_deb() {
    local pkg=$1 ver=$2 deb tmp
    deb="$CACHE/debs/${pkg}_${ver//:/%3a}_amd64.deb"
    if [[ ! -s $deb ]]; then
        log "downloading $pkg=$ver"
        tmp=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
        if ! (cd "$tmp" && apt-get "${APT_OPTS[@]}" download "$pkg=$ver" >&2); then
            rm -rf "$tmp"
            die "apt-get download $pkg=$ver failed; the package lists are probably stale or" \
                "missing: run 'apt-get update' (as root) and retry"
        fi
        mv "$tmp"/*.deb "$deb"
        rm -rf "$tmp"
    fi
    echo "$deb"
}

# apt-cache is slow here (no pkgcache.bin: ~0.7 s a call), so the resolution is cached
# and redone only when the apt lists change.
LISTS_KEY=$(stat -c '%n %Y %s' /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -c1-16)
RESOLVED_FILE="$CACHE/resolved"
KPKG= KVER= BB_VER=
if [[ -s $RESOLVED_FILE && $(head -n1 "$RESOLVED_FILE") == "$LISTS_KEY" ]]; then
    read -r KPKG KVER BB_VER < <(sed -n 2p "$RESOLVED_FILE")
else
    if RESOLVED=$(resolve_kernel); then
        read -r KPKG KVER <<<"$RESOLVED"
        BB_VER=$(apt-cache policy busybox-static 2>/dev/null | awk '/Candidate:/ {print $2}') ||
            true
    fi
    if [[ -n $KPKG && -n $BB_VER && $BB_VER != "(none)" ]]; then
        printf '%s\n%s %s %s\n' "$LISTS_KEY" "$KPKG" "$KVER" "$BB_VER" >"$RESOLVED_FILE"
    elif [[ -s $RESOLVED_FILE ]]; then
        read -r KPKG KVER BB_VER < <(sed -n 2p "$RESOLVED_FILE")
        log "warning: cannot resolve packages from the apt lists; using the cached" \
            "$KPKG $KVER, busybox-static $BB_VER"
    else
        die "cannot resolve bookworm's $META_PACKAGE (6.1) or busybox-static from the apt" \
            "lists: run 'apt-get update' (as root) and retry"
    fi
fi
KRELEASE=${KPKG#linux-image-}

# --- kernel: extract vmlinuz, vmlinux and the modules ----------------------------------

# extract_vmlinux IN OUT (shared with build-template.sh).
# shellcheck source=image/lib.sh
source "$IMAGE_DIR/lib.sh"

KDIR="$CACHE/kernel/${KPKG}_$KVER"
if [[ ! -e $KDIR/.done ]]; then
    KDEB=$(fetch_deb "$KPKG" "$KVER")
    log "extracting $(basename "$KDEB")"
    rm -rf "$KDIR" "$KDIR.x"
    mkdir -p "$KDIR/modules" "$KDIR.x"
    dpkg-deb -x "$KDEB" "$KDIR.x"
    moddir="$KDIR.x/lib/modules/$KRELEASE"
    [[ -d $moddir ]] || die "$KPKG has no lib/modules/$KRELEASE"
    cp "$KDIR.x/boot/vmlinuz-$KRELEASE" "$KDIR/vmlinuz"
    cp "$KDIR.x/boot/config-$KRELEASE" "$KDIR/config"
    cp "$moddir/modules.builtin" "$KDIR/modules.builtin"
    : >"$KDIR/modules.order"
    : >"$KDIR/modules.builtin-wanted"
    compressed=no
    for m in "${MODULES[@]}"; do
        src=$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.*" | head -n1)
        if [[ -z $src ]]; then
            if grep -qE "/$m\.ko$" "$moddir/modules.builtin"; then
                log "note: $m is built into the kernel, not loaded as a module"
                echo "$m" >>"$KDIR/modules.builtin-wanted"
                continue
            fi
            die "module $m is neither in $KPKG nor built into its kernel"
        fi
        case "$src" in
            *.ko) cp "$src" "$KDIR/modules/$m.ko" ;;
            *.ko.xz) xz -dc "$src" >"$KDIR/modules/$m.ko"; compressed=xz ;;
            *.ko.zst) zstd -dcq "$src" >"$KDIR/modules/$m.ko"; compressed=zstd ;;
            *.ko.gz) gzip -dc "$src" >"$KDIR/modules/$m.ko"; compressed=gzip ;;
            *) die "unsupported module compression: $src" ;;
        esac
        echo "$m.ko" >>"$KDIR/modules.order"
    done
    echo "$compressed" >"$KDIR/modules.compressed"
    extract_vmlinux "$KDIR/vmlinuz" "$KDIR/vmlinux" ||
        die "could not find a compressed ELF kernel inside vmlinuz-$KRELEASE"
    rm -rf "$KDIR.x"
    touch "$KDIR/.done"
fi
[[ -s $KDIR/sha256sums ]] || (cd "$KDIR" && sha256sum vmlinuz vmlinux >sha256sums)

# --- busybox-static ---------------------------------------------------------------------

BBDIR="$CACHE/busybox/$BB_VER"
if [[ ! -e $BBDIR/.done ]]; then
    BBDEB=$(fetch_deb busybox-static "$BB_VER")
    rm -rf "$BBDIR" "$BBDIR.x"
    mkdir -p "$BBDIR" "$BBDIR.x"
    dpkg-deb -x "$BBDEB" "$BBDIR.x"
    cp "$BBDIR.x/bin/busybox" "$BBDIR/busybox"
    "$BBDIR/busybox" --list | sort >"$BBDIR/applets"
    rm -rf "$BBDIR.x"
    touch "$BBDIR/.done"
fi

# --- initramfs ---------------------------------------------------------------------------

# Stages the common tree in $1: modules, /etc, empty directories.
stage_common() {
    local root=$1
    rm -rf "$root"
    mkdir -p "$root"/{proc,sys,dev,tmp,run,root,workspace,etc/agentlab,lib/modules,bin,usr/bin}
    cp "$KDIR"/modules/*.ko "$root/lib/modules/"
    cp "$KDIR/modules.order" "$root/etc/agentlab/modules.order"
    cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
agent:x:1000:1000:agent:/workspace:/bin/sh
EOF
    cat >"$root/etc/group" <<'EOF'
root:x:0:
agent:x:1000:
EOF
}

CPIO_ARGS=(
    --mode root=0700 --mode tmp=1777 --mode workspace=0755
    --dev dev/console:c:5:1:0600 --dev dev/null:c:1:3:0666
)

STAGE="$OUT/.staging"
# Agent image.
stage_common "$STAGE/agent"
install -m 0755 "$AGENT" "$STAGE/agent/init"
ln -s /init "$STAGE/agent/usr/bin/agentlab-agent"
install -m 0755 "$BBDIR/busybox" "$STAGE/agent/bin/busybox"
# One /bin/<applet> -> busybox link per applet (the list is "PATH TARGET" lines).
awk '$1 != "busybox" { print "bin/" $1 " busybox" }' "$BBDIR/applets" >"$STAGE/applet-links"
"$PYTHON" "$IMAGE_DIR/mkcpio.py" "$STAGE/agent" "$OUT/initrd.img" "${CPIO_ARGS[@]}" \
    --symlinks "$STAGE/applet-links"

# Baseline image.
stage_common "$STAGE/baseline"
install -m 0755 "$BASELINE" "$STAGE/baseline/init"
"$PYTHON" "$IMAGE_DIR/mkcpio.py" "$STAGE/baseline" "$OUT/baseline-initrd.img" "${CPIO_ARGS[@]}"
rm -rf "$STAGE"

# --- kernel outputs, manifest ----------------------------------------------------------------

# Copies with the cache's mtime, so an unchanged kernel is recognised without reading it.
copy_if_changed() {
    [[ -e $2 && $(stat -c '%s %Y' "$1") == $(stat -c '%s %Y' "$2") ]] || cp -p "$1" "$2"
}
copy_if_changed "$KDIR/vmlinuz" "$OUT/vmlinuz"
copy_if_changed "$KDIR/vmlinux" "$OUT/vmlinux"
[[ $(cat "$OUT/kernel-release" 2>/dev/null) == "$KRELEASE" ]] || echo "$KRELEASE" >"$OUT/kernel-release"

KRELEASE="$KRELEASE" KPKG="$KPKG" KVER="$KVER" BB_VER="$BB_VER" OUT="$OUT" \
    KSUMS="$KDIR/sha256sums" MODULES_ORDER="$KDIR/modules.order" BUILTIN="$KDIR/modules.builtin-wanted" \
    COMPRESSED="$(cat "$KDIR/modules.compressed")" "$PYTHON" - <<'EOF'
import hashlib, json, os
e = os.environ
out = e["OUT"]
def lines(path):
    with open(path) as f:
        return [l.strip() for l in f if l.strip()]
files = {}
# The kernel files' sums were computed once, when they were extracted.
for line in lines(e["KSUMS"]):
    digest, name = line.split()
    files[name] = {"sha256": digest, "size": os.path.getsize(os.path.join(out, name))}
for name in ["initrd.img", "baseline-initrd.img", "kernel-release"]:
    with open(os.path.join(out, name), "rb") as f:
        data = f.read()
    files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
manifest = {
    "kernel_release": e["KRELEASE"],
    "kernel_package": e["KPKG"],
    "kernel_package_version": e["KVER"],
    "busybox_static_version": e["BB_VER"],
    "modules": lines(e["MODULES_ORDER"]),
    "modules_builtin": lines(e["BUILTIN"]),
    "modules_compressed_in_package": e["COMPRESSED"],
    "files": files,
}
tmp = os.path.join(out, "manifest.json.tmp")
with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
os.replace(tmp, os.path.join(out, "manifest.json"))
EOF

size() { du -h --apparent-size "$OUT/$1" | cut -f1; }
echo "image: kernel $KRELEASE ($KPKG $KVER): vmlinuz $(size vmlinuz), vmlinux $(size vmlinux)," \
    "initrd.img $(size initrd.img), baseline-initrd.img $(size baseline-initrd.img) -> $OUT"
