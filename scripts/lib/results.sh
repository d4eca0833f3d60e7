# shellcheck shell=bash
# Shared by the bench scripts: one line per measured figure, with its goal.
#
#   result LABEL VALUE OP GOAL
#
# prints "  LABEL  VALUE  goal OP GOAL  ok|MISSED" and, when BENCH_RESULTS names a file (as
# scripts/bench.sh sets it), appends "LABEL<TAB>VALUE<TAB>OP<TAB>GOAL<TAB>ok|MISSED" to it.
# OP is one of >=, <=, >, <; GOAL "-" means "reported, no goal".

result() {
    local label=$1 value=$2 op=$3 goal=$4 verdict
    if [ "$goal" = - ]; then
        verdict=-
    else
        verdict=$(python3 -c 'import sys
v, op, g = float(sys.argv[1]), sys.argv[2], float(sys.argv[3])
ok = {">=": v >= g, "<=": v <= g, ">": v > g, "<": v < g}[op]
print("ok" if ok else "MISSED")' "$value" "$op" "$goal")
    fi
    if [ "$goal" = - ]; then
        printf '  %-52s %14s   (reported, no goal)\n' "$label" "$value"
    else
        printf '  %-52s %14s   goal %-2s %-8s %s\n' "$label" "$value" "$op" "$goal" "$verdict"
    fi
    if [ -n "${BENCH_RESULTS:-}" ]; then
        printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$value" "$op" "$goal" "$verdict" >>"$BENCH_RESULTS"
    fi
}
