#!/usr/bin/env bash
# Runs every test program (build/tests/*) and shell test (tests/cli/*.sh,
# tests/*/test_*.sh), counts their PASS/FAIL/SKIP lines and ends with
# "N passed, N failed".  A program that exits non-zero without reporting a
# FAIL (a crash, a sanitizer report) counts as one failure.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-build}
cd "$ROOT"
export ROOT
passed=0; failed=0; skipped=0
declare -A seen
run_one() {
    local label=$1; shift
    local out rc
    out=$("$@" 2>&1); rc=$?
    local p f s
    p=$(grep -c '^PASS ' <<<"$out"); f=$(grep -c '^FAIL ' <<<"$out"); s=$(grep -c '^SKIP ' <<<"$out")
    grep -E '^(FAIL|SKIP) ' <<<"$out" | sed "s|^|[$label] |"
    if [ $rc -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "[$label] FAIL exited $rc without reporting a failure:"; tail -20 <<<"$out" | sed 's/^/    /'
        f=1
    fi
    printf '%-40s %4d passed %3d failed %3d skipped\n' "$label" "$p" "$f" "$s"
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
}
for t in "$BUILD"/tests/*; do
    [ -x "$t" ] && [ -f "$t" ] || continue
    run_one "$(basename "$t")" "$t"
done
for t in tests/cli/*.sh tests/*/test_*.sh; do
    [ -f "$t" ] || continue
    [ -n "${seen[$t]:-}" ] && continue   # tests/cli/test_x.sh matches both globs
    seen[$t]=1
    run_one "$t" bash "$t"
done
[ "$skipped" -gt 0 ] && echo "$skipped skipped (listed above with the reason)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
