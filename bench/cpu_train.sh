#!/usr/bin/env bash
# bench/cpu_train.sh - training throughput on the CPU: examples/tiny_moe.moe
# (fp32) compiled by moec and run by ./run, against the same model written
# by hand in eager PyTorch (bench/torch_cpu_train.py) in two versions: an
# expert loop as Hugging Face's Mixtral does it, and a vectorised one
# (torch.bmm over padded expert blocks).  Same batch, sequence, sizes,
# AdamW settings, thread count and data; same machine, same run.
#
#   bash bench/cpu_train.sh [--steps 30] [--warmup 3] [--rounds 3] [--threads 2]
#
# Each round runs the three back to back (moec, torch loop, torch bmm).  Each
# one warms up for --warmup steps and then times --steps steps.  Interleaving
# the rounds spreads the machine's drift over all three.  A step, for both,
# is: draw a batch, forward, backward, clip, AdamW.  moec's times come from
# ./run's metrics JSONL ("ms"), PyTorch's from time.perf_counter around the
# same work.  The table gives tokens/s (batch x seq / step time) over every
# timed step of every round: median, min, max; then the ratio of the medians
# and the median of the per-round ratios.
#
# Environment: MOEC, RUN (default ./moec, ./run, built here with make);
# DATA (default ../shared/data/tinyshakespeare.txt, else the built-in corpus);
# PYTHON (default /usr/bin/python3).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STEPS=30 WARMUP=3 ROUNDS=3 THREADS=2
while [ $# -gt 0 ]; do
    case $1 in
        --steps) STEPS=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        *) echo "usage: bash bench/cpu_train.sh [--steps N] [--warmup N] [--rounds N] [--threads N]" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-/usr/bin/python3}
if [ -z "${MOEC:-}" ] || [ -z "${RUN:-}" ]; then
    make -j2 moec run build/libmoek_cpu.so build/data/default.txt >&2
    MOEC=$ROOT/moec RUN=$ROOT/run
fi
DATA=${DATA:-$ROOT/../shared/data/tinyshakespeare.txt}
[ -f "$DATA" ] || DATA=$ROOT/build/data/default.txt
[ -f "$DATA" ] || { echo "bench: no data file: set DATA=FILE" >&2; exit 1; }
"$PYTHON" -c 'import torch' 2>/dev/null || { echo "bench: $PYTHON has no torch: apt-get install python3-torch" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS

"$MOEC" examples/tiny_moe.moe -o "$TMP/plan.bin" >&2
total=$((WARMUP + STEPS))
for r in $(seq "$ROUNDS"); do
    echo "bench: round $r/$ROUNDS" >&2
    "$RUN" "$TMP/plan.bin" --data "$DATA" --steps "$total" --metrics "$TMP/moec.$r.jsonl" \
        --checkpoint "$TMP/ck.safetensors" -q >&2
    for impl in loop bmm; do
        "$PYTHON" bench/torch_cpu_train.py --data "$DATA" --moe $impl --warmup-steps "$WARMUP" \
            --steps "$STEPS" --threads "$THREADS" > "$TMP/torch-$impl.$r.json"
    done
done

"$PYTHON" - "$TMP" "$ROUNDS" "$WARMUP" "$STEPS" "$THREADS" "$DATA" <<'EOF'
import glob, json, statistics, sys
tmp, rounds, warm, steps, threads, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
TOK = 8 * 64                       # examples/tiny_moe.moe: batch 8, seq 64
runs = {"moec": [], "torch-loop": [], "torch-bmm": []}
loss = {}
for r in range(1, rounds + 1):
    rows = [json.loads(l) for l in open("%s/moec.%d.jsonl" % (tmp, r)) if l.strip()]
    timed = [x for x in rows if x["step"] > warm]
    assert len(timed) == steps, "moec: %d timed steps" % len(timed)
    runs["moec"].append([x["ms"] for x in timed])
    loss["moec"] = (timed[0]["loss"], timed[-1]["loss"])
    for impl in ("loop", "bmm"):
        d = json.load(open("%s/torch-%s.%d.json" % (tmp, impl, r)))
        runs["torch-" + impl].append(d["ms"])
        loss["torch-" + impl] = (d["loss"][0], d["loss"][-1])
def tps(ms_lists):
    return sorted(TOK * 1e3 / m for ms in ms_lists for m in ms)
med = {k: statistics.median(tps(v)) for k, v in runs.items()}
print("tiny_moe fp32, batch 8 x seq 64 = %d tokens/step, %s threads, %d rounds x %d timed steps"
      " (after %d warm-up)" % (TOK, threads, rounds, steps, warm))
print("data: %s" % data)
print()
print("| implementation | tokens/s median | min | max | ms/step median | loss first -> last timed | moec / this (median) | moec / this (per-round ratios: median) |")
print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
for k, v in runs.items():
    t = tps(v)
    per_round = [statistics.median(TOK * 1e3 / m for m in a) for a in v]
    moec_round = [statistics.median(TOK * 1e3 / m for m in a) for a in runs["moec"]]
    rr = statistics.median(m / p for m, p in zip(moec_round, per_round))
    print("| %s | %.0f | %.0f | %.0f | %.1f | %.3f -> %.3f | %.2fx | %.2fx |" % (
        k, med[k], t[0], t[-1], TOK * 1e3 / med[k], loss[k][0], loss[k][1],
        med["moec"] / med[k], rr))
EOF
