#!/usr/bin/env bash
# What --breakdown costs: mirrored 4 KiB random writes at QD32 over two null:// legs and over
# two mem:// legs, without and with --breakdown, in interleaved rounds (so drift on a shared
# machine hits every variant alike). With BASE=path/to/nvmirror-bench (a build of an earlier
# commit) the same runs of that binary are added, to show that "off" did not slow the engine.
#
# Each run reports IOPS (I/Os in the window / window) and I/Os per CPU second (I/Os in the
# window / the process's user+system time, ramp included): the second stays meaningful when
# other work on the machine takes the CPU away from the job thread. Prints every run, then the
# median of each variant over the rounds.
#
#   scripts/bench-breakdown.sh [SECONDS] [ROUNDS]     (default 5 s, 3 rounds; 1 s ramp each)
set -euo pipefail

secs=${1:-5}
rounds=${2:-3}
for n in "$secs" "$rounds"; do
    case $n in '' | *[!0-9]*) echo "usage: $0 [SECONDS] [ROUNDS]" >&2; exit 2 ;; esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 2; }
(cd "$root" && cargo build --release -q -p nvmirror-bench)
new=${CARGO_TARGET_DIR:-$root/build}/release/nvmirror-bench

python3 - "$new" "${BASE:-}" "$secs" "$rounds" <<'EOF'
import json, resource, statistics, subprocess, sys

new, base, secs, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# Builds from before --time_based ran the whole runtime without it.
variants = ([("base", base, [])] if base else []) + [
    ("off", new, ["--time_based"]), ("on", new, ["--time_based", "--breakdown"])]
legs = ["null://1TiB", "mem://1GiB"]
runs = {}

def run(binary, leg, extra):
    args = [binary, "--leg", leg, "--leg", leg, "--rw", "randwrite", "--bs", "4k",
            "--iodepth", "32", "--runtime", f"{secs}s", "--ramp_time", "1s", "--size", "256MiB",
            "--output-format", "json"] + extra
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    w = json.loads(out)["jobs"][0]["write"]
    return w["iops"], w["total_ios"] / cpu

for r in range(1, rounds + 1):
    print(f"# round {r}")
    for leg in legs:
        for name, binary, extra in variants:
            iops, per_cpu = run(binary, leg, extra)
            runs.setdefault((leg, name), []).append((iops, per_cpu))
            print(f"{leg:12} {name:4} {iops / 1e6:7.3f} M IOPS  {per_cpu / 1e6:7.3f} M I/Os per CPU s",
                  flush=True)

print(f"# medians over {rounds} rounds (mirrored, 4k randwrite, QD32, {secs} s)")
for leg in legs:
    off = runs[(leg, "off")]
    off_iops = statistics.median(x[0] for x in off)
    off_cpu = statistics.median(x[1] for x in off)
    for name, _, _ in variants:
        v = runs[(leg, name)]
        iops = statistics.median(x[0] for x in v)
        cpu = statistics.median(x[1] for x in v)
        print(f"{leg:12} {name:4} {iops / 1e6:7.3f} M IOPS ({iops / off_iops:6.1%} of off)  "
              f"{cpu / 1e6:7.3f} M I/Os per CPU s ({cpu / off_cpu:6.1%} of off)")
EOF
