#!/usr/bin/env bash
# `make bench`: prints every figure of docs/SPECIFICATION.md with its baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
exec target/release/bench \
  --image-dir build/image --profiles-dir profiles \
  --agent target/x86_64-unknown-linux-musl/release/agentlab-agent \
  --baseline target/x86_64-unknown-linux-musl/release/baseline-init \
  --template-dir build/template
