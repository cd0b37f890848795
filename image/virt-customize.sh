#!/usr/bin/env bash
# Embeds AgentLab's guest agent and its systemd unit into an existing Debian/Ubuntu
# cloud image with virt-customize (libguestfs-tools), in place. The same files as the
# debootstrap template (image/template/), the same unit, the same `agent` user.
#
# Usage: image/virt-customize.sh --agent PATH --image DISK [--dry-run]
#   --dry-run prints the virt-customize command instead of running it.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T="$REPO_ROOT/image/template"

die() { echo "virt-customize.sh: error: $*" >&2; exit 1; }
usage() { echo "usage: $0 --agent PATH --image DISK [--dry-run]" >&2; exit 2; }

AGENT= IMAGE= DRY_RUN=no
while (($#)); do
    case "$1" in
        --agent) AGENT=${2:-}; shift 2 || usage ;;
        --image) IMAGE=${2:-}; shift 2 || usage ;;
        --dry-run) DRY_RUN=yes; shift ;;
        *) usage ;;
    esac
done
[[ -n $AGENT && -n $IMAGE ]] || usage
[[ -f $AGENT ]] || die "agent binary not found: $AGENT (make agent builds it)"
[[ -f $IMAGE || $DRY_RUN == yes ]] || die "image not found: $IMAGE"

cmd=(
    virt-customize -a "$IMAGE"
    --upload "$AGENT:/usr/bin/agentlab-agent"
    --chmod "0755:/usr/bin/agentlab-agent"
    --upload "$T/agentlab-agent.service:/etc/systemd/system/agentlab-agent.service"
    --upload "$T/modules-load-agentlab.conf:/etc/modules-load.d/agentlab.conf"
    --upload "$T/80-agentlab-dhcp.network:/etc/systemd/network/80-agentlab-dhcp.network"
    --run-command "getent passwd agent >/dev/null || useradd --user-group --create-home --shell /bin/bash agent"
    --run-command "install -d -m 0755 -o agent -g agent /workspace"
    --run-command "systemctl enable agentlab-agent.service"
    # Each clone gets its own machine-id at first boot.
    --truncate /etc/machine-id
)
if [[ $DRY_RUN == yes ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
command -v virt-customize >/dev/null || die "virt-customize not found: apt-get install libguestfs-tools"
"${cmd[@]}"
