#!/usr/bin/env bash
# Chaos soak of `nvmirror serve` (docs/operations.md, "Chaos soak"): file legs, a verifying
# writer over NVMe/TCP and one over NBD, random leg faults, detach/attach, leg_add/leg_remove,
# resync pause/resume/cancel, verify with repair, host disconnects and kill -9 + restart for
# MINUTES; then no acknowledged write lost, legs byte-identical, RSS growth bounded, no panic.
#
#   scripts/soak.sh [MINUTES=30] [extra nvmirror-soak flags, e.g. --seed N]
set -euo pipefail

minutes=${1:-30}
shift || true
cd "$(dirname "$0")/.."

cargo build --release -q -p nvmirror-target --bin nvmirror -p nvmirror-bench --bin nvmirror-soak
# The soak restarts serve from the binary next to nvmirror-soak: run private copies, so a build
# during the soak cannot swap the binary under it.
bin=build/soak-bin
mkdir -p "$bin"
cp build/release/nvmirror build/release/nvmirror-soak "$bin/"
exec "$bin/nvmirror-soak" --minutes "$minutes" --dir build/soak "$@"
