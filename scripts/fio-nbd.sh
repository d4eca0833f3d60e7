#!/usr/bin/env bash
# fio over NBD: `nvmirror serve` (a volume mirrored over two mem:// legs) against
# `nbdkit memory` (one copy, no mirror).
#
#   scripts/fio-nbd.sh [SECONDS]     (default 10)
#
# 1. starts `nvmirror serve --leg mem://1GiB --leg mem://1GiB` with NBD on a free port;
# 2. runs a fio crc32c verify job with ioengine=nbd (must pass);
# 3. fills the export once (sequential 1 MiB writes), then runs a 4 KiB random-write job at
#    queue depth 32 for SECONDS and prints its IOPS;
# 4. does the same against `nbdkit memory 1G` and prints its IOPS and ratio=ours/nbdkit.
#
# Environment: NBD_SERVE_ARGS adds arguments to `nvmirror serve` (e.g. "--cores 3" on a bigger
# machine, or "--config FILE" with idle = "spin"). serve's default idle policy naps when the
# reactor finds no work: on a small shared machine a busy-polling reactor takes a whole core
# from fio, which is the bottleneck here.
set -euo pipefail
SECS=${1:-10}
cd "$(dirname "$0")/.."

if ! command -v fio >/dev/null || ! command -v nbdkit >/dev/null; then
  echo "== installing fio and nbdkit"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio nbdkit >/dev/null
fi
if ! fio --enghelp=nbd >/dev/null 2>&1; then
  echo "this fio has no nbd engine" >&2
  exit 1
fi

echo "== building nvmirror"
cargo build --release -q -p nvmirror-target --bin nvmirror
BIN="${CARGO_TARGET_DIR:-build}/release/nvmirror"

PIDS=()
TMP=$(mktemp -d)
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 40000))
    if port_is_free "$p"; then echo "$p"; return; fi
  done
  echo "no free port found" >&2
  return 1
}
wait_listening() {
  for _ in $(seq 200); do
    port_is_free "$1" || return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# The IOPS of the write side of a fio JSON result.
write_iops() {
  python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
}

# CPU time (clock ticks) a process has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Writes the whole export once, sequentially, so the randwrite job measures a preconditioned
# device: both servers keep data in lazily allocated memory, and first-touch page faults cost
# 3-20 us per 4 KiB page in a VM (the host backs guest memory on demand). Unfilled, that
# cost, not the server, sets the result, and ours pays it twice (two legs).
fill() { # URI
  fio --name=fill --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=8 --size=1023M \
    --output-format=json --output="$TMP/fill.json" >/dev/null
}

randwrite() { # URI SERVER_PID LABEL -> prints LABEL_iops=N and the server's CPU per I/O
  local t0 t1 iops
  fill "$1"
  t0=$(cpu_ticks "$2")
  fio --name=randwrite --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=32 \
    --size=1G --time_based --runtime="$SECS" --output-format=json --output="$TMP/rw.json" \
    >/dev/null
  t1=$(cpu_ticks "$2")
  iops=$(write_iops <"$TMP/rw.json")
  echo "${3}_iops=$iops"
  python3 -c 'import os, sys
cpu_s = (int(sys.argv[2]) - int(sys.argv[1])) / os.sysconf("SC_CLK_TCK")
print("%s_server_cpu=%.0f%% (%.1f us of server CPU per I/O)" % (sys.argv[5], 100 * cpu_s / int(sys.argv[4]), 1e6 * cpu_s / (int(sys.argv[3]) * int(sys.argv[4]))))' \
    "$t0" "$t1" "$iops" "$SECS" "$3"
  LAST_IOPS=$iops
}

SERVE_ARGS=${NBD_SERVE_ARGS-}
OURS_PORT=$(free_port)
# `nvmirror serve`: a mirrored volume of two mem legs, exported over NBD on OURS_PORT.
# shellcheck disable=SC2086
"$BIN" serve --data-dir "$TMP/data" --leg mem://1GiB --leg mem://1GiB --nbd-listen "127.0.0.1:$OURS_PORT" \
  --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 $SERVE_ARGS >"$TMP/ours.log" 2>&1 &
PIDS+=($!)
wait_listening "$OURS_PORT"
OURS="nbd://127.0.0.1:$OURS_PORT/vol0"

echo "== fio crc32c verify against $OURS"
fio --name=verify --ioengine=nbd --uri="$OURS" --rw=randwrite --bs=4k --iodepth=32 \
  --size=256M --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=json \
  --output="$TMP/verify.json" >/dev/null
python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
assert j["error"] == 0, "fio error %d" % j["error"]
assert j["read"]["io_bytes"] == j["write"]["io_bytes"] > 0, "not everything was verified"
print("verify: ok, %d MiB written and read back" % (j["write"]["io_bytes"] >> 20))
' "$TMP/verify.json"

echo "== 4 KiB randwrite QD32 for ${SECS}s: nvmirror serve, mirrored over two mem://1GiB legs $SERVE_ARGS"
randwrite "$OURS" "${PIDS[0]}" nvmirror
OURS_IOPS=$LAST_IOPS
kill "${PIDS[0]}"

NBDKIT_PORT=$(free_port)
nbdkit --foreground --port "$NBDKIT_PORT" --ipaddr 127.0.0.1 memory 1G >"$TMP/nbdkit.log" 2>&1 &
PIDS+=($!)
wait_listening "$NBDKIT_PORT"
echo "== 4 KiB randwrite QD32 for ${SECS}s: nbdkit memory 1G"
randwrite "nbd://127.0.0.1:$NBDKIT_PORT" "${PIDS[1]}" nbdkit
NBDKIT_IOPS=$LAST_IOPS

RATIO=$(python3 -c 'import sys; print("%.2f" % (int(sys.argv[1]) / int(sys.argv[2])))' "$OURS_IOPS" "$NBDKIT_IOPS")
echo "ratio=$RATIO (ours/nbdkit, goal >= 1.0)"
# shellcheck source=scripts/lib/results.sh
. scripts/lib/results.sh
result "NBD: fio 4K randwrite QD32, serve mirrored / nbdkit" "$RATIO" ">=" 1
