#!/usr/bin/env bash
# Starts a throwaway agentlabd, runs one job in a local microVM, prints its output
# and stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
STATE=$(mktemp -d /tmp/agentlab-demo.XXXXXX)
cleanup() {
  [ -n "${DAEMON_PID:-}" ] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
  rm -rf "$STATE"
}
trap cleanup EXIT

"$BIN/agentlabd" --state-dir "$STATE" --image-dir build/image --profiles-dir profiles 2>"$STATE/agentlabd.log" &
DAEMON_PID=$!
export AGENTLABD_SOCKET="$STATE/agentlabd.sock"
for _ in $(seq 100); do [ -S "$AGENTLABD_SOCKET" ] && break; sleep 0.1; done
[ -S "$AGENTLABD_SOCKET" ] || { cat "$STATE/agentlabd.log"; exit 1; }

echo "host kernel:  $(uname -r)"
echo "--- agentlab job submit --follow --cmd '...' (in a microVM) ---"
set +e
"$BIN/agentlab" job submit --follow --timeout 2m --cmd '
  echo "guest kernel: $(uname -r)"
  echo "hostname:     $(hostname)"
  echo "cpus:         $(nproc), memory: $(grep MemTotal /proc/meminfo)"
  agentlab-agent status'
code=$?
set -e
echo "--- job exited with $code; its record: ---"
"$BIN/agentlab" job list
"$BIN/agentlab" sandbox list
exit $code
