# tests/lib.sh - helpers for shell tests (sourced).  Each check prints
# "PASS name" or "FAIL name: why"; tests/run.sh counts the lines.
# ROOT is the repository, MOEC and RUN the binaries under test.
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
MOEC=${MOEC:-$ROOT/moec}
RUN=${RUN:-$ROOT/run}
SHARED_DATA=${SHARED_DATA:-$ROOT/../shared/data}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; }
skip() { echo "SKIP $1: $2"; }

# expect_fail NAME PATTERN CMD...: CMD must exit non-zero (not by a signal)
# and print PATTERN (grep -E) on stderr or stdout.
expect_fail() {
    local name=$1 pattern=$2; shift 2
    local out rc
    out=$("$@" 2>&1); rc=$?
    if [ $rc -eq 0 ]; then fail "$name" "exited 0, expected an error"; return; fi
    if [ $rc -ge 128 ]; then fail "$name" "killed by signal $((rc-128)): $out"; return; fi
    if echo "$out" | grep -Eq -- "$pattern"; then pass "$name"; else fail "$name" "output did not match /$pattern/: $out"; fi
}

# expect_ok NAME CMD...: CMD must exit 0
expect_ok() {
    local name=$1; shift
    local out
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "exit $?: $(echo "$out" | tail -5)"; fi
}

# expect_same NAME EXPECTED_FILE ACTUAL_FILE: byte-for-byte golden comparison
expect_same() {
    if cmp -s "$2" "$3"; then pass "$1"; else fail "$1" "differs from $2: $(diff "$2" "$3" | head -20)"; fi
}
