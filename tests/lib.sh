# tests/lib.sh - helpers for shell tests (sourced).  Each check prints
# "PASS name" or "FAIL name: why"; tests/run.sh counts the lines.
# ROOT is the repository, MOEC and RUN the binaries under test.
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
MOEC=${MOEC:-$ROOT/moec}
RUN=${RUN:-$ROOT/run}
SHARED_DATA=${SHARED_DATA:-$ROOT/../shared/data}
# the default corpus of the build under test (make test: build, test-asan: build-asan)
DEFAULT_DATA=$ROOT/${MOEC_BUILD:-build}/data/default.txt
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

# cmp_metrics NAME A B TOL KEYS...: two --metrics files (JSON lines) have the
# same steps and every KEY within relative TOL at each step (a key in only
# one file fails; one in neither is skipped, but some key must be compared)
cmp_metrics() {
    local name=$1 a=$2 b=$3 tol=$4; shift 4
    local out
    if out=$(/usr/bin/python3 - "$a" "$b" "$tol" "$@" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
tol, keys = float(sys.argv[3]), sys.argv[4:]
if len(a) != len(b) or not a:
    print("steps %d vs %d" % (len(a), len(b))); sys.exit(1)
worst, at, compared = 0.0, "", 0
for x, y in zip(a, b):
    for k in keys:
        if (k in x) != (k in y):
            print("step %d: %s in only one file" % (x["step"], k)); sys.exit(1)
        if k in x:
            compared += 1
            r = abs(x[k] - y[k]) / max(abs(x[k]), 1e-30)
            if r >= worst:
                worst, at = r, "step %d %s %.9g vs %.9g" % (x["step"], k, x[k], y[k])
if not compared:
    print("none of %s in either file" % " ".join(keys)); sys.exit(1)
print("worst relative difference %.3g over %d steps (%s)" % (worst, len(a), at))
sys.exit(0 if worst <= tol else 1)
PY
    ); then pass "$name"; echo "  $name: $out"; else fail "$name" "$out"; fi
}

# standin_libs DIR NCCL_LIB: builds the stand-in CUDA runtime and NCCL
# (tests/standin/cudart.c, nccl.c) into DIR under the names NCCL_LIB (the
# NCCL backend) needs, with the version node its libcudart symbols carry,
# and sets CUDART and NCCLSO to those names.  Non-zero (the compiler's
# messages in DIR/cc.log) on failure.
standin_libs() {
    local sd=$1 lib=$2 cuda=${CUDA_HOME:-/usr/local/cuda}
    CUDART=$(readelf -d "$lib" | sed -n 's/.*NEEDED.*\[\(libcudart[^]]*\)\].*/\1/p')
    NCCLSO=$(readelf -d "$lib" | sed -n 's/.*NEEDED.*\[\(libnccl[^]]*\)\].*/\1/p')
    mkdir -p "$sd"
    if [ -z "$CUDART" ] || [ -z "$NCCLSO" ]; then
        echo "$lib does not name libcudart and libnccl: $(readelf -d "$lib" | grep NEEDED)" > "$sd/cc.log"
        return 1
    fi
    echo "$CUDART { global: *; };" > "$sd/cudart.ver"
    local f=(-std=c11 -D_GNU_SOURCE -O1 -Wall -Wextra -Werror -fPIC -shared -I"$cuda/include")
    "${CC:-cc}" "${f[@]}" -o "$sd/$CUDART" -Wl,-soname,"$CUDART" -Wl,--version-script="$sd/cudart.ver" \
        "$ROOT/tests/standin/cudart.c" -lpthread 2> "$sd/cc.log" &&
    "${CC:-cc}" "${f[@]}" -o "$sd/$NCCLSO" -Wl,-soname,"$NCCLSO" "$ROOT/tests/standin/nccl.c" \
        -L"$sd" -l:"$CUDART" -Wl,-rpath,"$sd" -lpthread 2>> "$sd/cc.log"
}
