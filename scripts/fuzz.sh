#!/usr/bin/env bash
# Coverage-guided fuzzing of every target in fuzz/ on the stable toolchain (cargo-fuzz with
# RUSTC_BOOTSTRAP=1, AddressSanitizer). Runs each target for SECONDS_PER_TARGET, one after the
# other, keeping its corpus in fuzz/corpus/<target> (seeded from fuzz/seeds/<target>), and
# prints the executions and time per target. Exits non-zero if a target crashed; the input
# that did it is in fuzz/artifacts/<target>/. See docs/fuzzing.md.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET=300] [TARGET...]
set -euo pipefail

secs=${1:-300}
shift || true
cd "$(dirname "$0")/.."

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

cd fuzz
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

start=$(date +%s)
cargo fuzz build
echo "== fuzz build: $(($(date +%s) - start)) s"

mkdir -p ../build/fuzz-logs
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  log=../build/fuzz-logs/$t.log
  echo "== $t: ${secs} s"
  set +e
  cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 >"$log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  secs_used=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  echo "   executions: ${runs:-?}, seconds: ${secs_used:-?}, corpus: $(ls "corpus/$t" | wc -l) inputs"
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    grep -E "^(==[0-9]+==ERROR|thread '.*' panicked|SUMMARY)|panicked at" "$log" | head -5 || true
    grep -o "Test unit written to [^ ]*" "$log" | sed 's/^/   /' || true
    echo "   full log: build/fuzz-logs/$t.log"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "== crashed: ${failed[*]}"
  exit 1
fi
echo "== no crashes in ${#targets[@]} targets"
