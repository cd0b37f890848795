#!/usr/bin/env bash
# Runs every test and ends with one total line ("tests: N passed, N failed"), since
# cargo prints a summary per test binary and the last one may be an empty doc-test run.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee build/test.log
status=${PIPESTATUS[0]}
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' build/test.log
exit "$status"
