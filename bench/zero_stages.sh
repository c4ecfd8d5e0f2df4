#!/usr/bin/env bash
# bench/zero_stages.sh - issue 5's ZeRO benchmark: bench/models/zero4.moe
# (2.3 M parameters, Mixtral-style MoE) on 4 CPU ranks over MPI at each ZeRO
# stage (and, with EXPERT=P, expert parallelism on top), reporting per rank:
# the model-state bytes moec --explain predicts, the pools ./run allocates
# (params, grads, optimizer state, activations: exactly the plan's), the
# resident memory the kernel measured (`run --memory-report`: the peak minus
# what was resident before the plan - code, MPI, libc - on the worst rank)
# against the prediction (pools + workspace + the largest collective's host
# buffers, all from moec --explain), and training throughput
# (median over the timed steps of the metrics JSONL).
#
#   bash bench/zero_stages.sh [--steps 20] [--ranks 4] [--stages "0 1 2 3"] [--width 128]
#
# --width sets d_model and d_ff (the default model has 1.9 M parameters; at
# --width 256, 7.3 M).  What run holds besides the plan - library code and
# OpenBLAS buffers, the touched pages of the mmapped data, ZeRO's host
# staging buffers - is a few MiB, so the prediction's error shrinks as the
# model grows.
#
# Env: MOEC, RUN (default ./moec, ./run), STDLIB, EXPERT (default 1), DATA (default
# ../shared/data/tinyshakespeare.txt, else the built-in corpus).  With more
# ranks than cores the ranks are oversubscribed: tokens/s then measures the
# machine, not the stage; the memory columns do not depend on it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STEPS=20 RANKS=4 STAGES="0 1 2 3" WIDTH=128
while [ $# -gt 0 ]; do
    case $1 in
        --steps) STEPS=$2; shift 2 ;;
        --ranks) RANKS=$2; shift 2 ;;
        --stages) STAGES=$2; shift 2 ;;
        --width) WIDTH=$2; shift 2 ;;
        *) echo "usage: bash bench/zero_stages.sh [--steps N] [--ranks N] [--stages \"0 1 2 3\"] [--width N]" >&2; exit 2 ;;
    esac
done
MOEC=${MOEC:-$ROOT/moec}
RUN=${RUN:-$ROOT/run}
STDLIB=${STDLIB:-$ROOT/stdlib}
EXPERT=${EXPERT:-1}
DATA=${DATA:-$ROOT/../shared/data/tinyshakespeare.txt}
[ -f "$DATA" ] || DATA=$ROOT/build/data/default.txt
command -v mpirun >/dev/null || { echo "zero_stages: mpirun not found (apt install openmpi-bin)" >&2; exit 1; }
MPIRUN=(mpirun --oversubscribe -np "$RANKS")
[ "$(id -u)" -eq 0 ] && MPIRUN=(mpirun --allow-run-as-root --oversubscribe -np "$RANKS")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=1

printf '# %s, %s ranks, expert = %s, width %s, %s steps, %s (%s cores)\n' "$(date -u +%F)" "$RANKS" \
    "$EXPERT" "$WIDTH" "$STEPS" "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" "$(nproc --all)"
echo "| ZeRO | explain: model state / rank | explain: act | run: param+grad+optstate | run: act | predicted (pools + workspace + comm) | measured resident for the plan (worst rank) | error | tok/s (median) | ms/step |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for z in $STAGES; do
    f=$TMP/z$z
    sed "s/parallel { .* }/parallel { ranks = $RANKS  expert = $EXPERT  zero = $z }/; s/steps = 20/steps = $STEPS/; s/d_model = 128/d_model = $WIDTH/; s/d_ff = 128/d_ff = $WIDTH/" \
        "$ROOT/bench/models/zero4.moe" > "$f.moe"
    if ! "$MOEC" --stdlib "$STDLIB" "$f.moe" -o "$f.bin" > "$f.compile" 2>&1; then
        printf '| %s | (does not compile: %s) ||||||||\n' "$z" "$(grep -m1 error: "$f.compile" | sed 's/.*error: //')"
        continue
    fi
    "$MOEC" --stdlib "$STDLIB" --explain "$f.moe" > "$f.explain" 2>&1 || true
    "${MPIRUN[@]}" "$RUN" "$f.bin" --data "$DATA" --metrics "$f.jsonl" --memory-report \
        --checkpoint "" > "$f.log" 2>&1 || { echo "zero_stages: stage $z failed:" >&2; tail -5 "$f.log" >&2; exit 1; }
    /usr/bin/python3 - "$f" "$z" "$RANKS" <<'PY'
import json, re, statistics, sys
f, z, ranks = sys.argv[1], sys.argv[2], int(sys.argv[3])
log, ex = open(f + ".log").read(), open(f + ".explain").read()
pools = dict((k, int(v)) for k, v in re.findall(r" (\w+) (\d+),", re.search(r"run: allocated(.*)", log).group(1)))
total = int(re.search(r"total (\d+) bytes", log).group(1))
after = [float(x) for x in re.findall(r"MiB before the plan \+ ([\d.]+) MiB after", log)]
steps = [json.loads(l) for l in open(f + ".jsonl")][2:]   # the first two warm up
ms = statistics.median(s["ms"] for s in steps)
tok = statistics.median(s["tok_per_s"] for s in steps)
def mib(b): return "%.2f MiB" % (b / 2**20)
m = re.search(r"^\s+\d \*\s+\d+\s+\d+\s+\d+\s+(\d+)", ex, re.M)   # the stage row marked *
a = re.search(r"^\s+act\s+(\d+)", ex, re.M)
w = re.search(r"^\s+workspace\s+(\d+).* on cpu ", ex, re.M)   # run allocates the CPU figure
cm = re.search(r"^\s+comm\s+(\d+)", ex, re.M)
state = pools.get("param", 0) + pools.get("grad", 0) + pools.get("optstate", 0)
pred = total + (int(w.group(1)) if w else 0) + (int(cm.group(1)) if cm else 0)
meas = max(after) * 2**20 if len(after) == ranks else float("nan")
print("| %s | %s | %s | %s | %s | %s | %s | %+.1f%% | %.0f | %.1f |" % (
    z, mib(int(m.group(1))) if m else "?", mib(int(a.group(1))) if a else "?", mib(state),
    mib(pools.get("act", 0)), mib(pred), mib(meas), 100 * (meas - pred) / pred, tok, ms))
PY
done
