#!/usr/bin/env bash
# bench/moe_vs_dense.sh - issue 4's quality check: examples/tiny_moe.moe
# against its dense twin with the same active parameters
# (examples/tiny_moe_dense_twin.moe: one SwiGLU MLP of d_ff = top_k x 128),
# trained on ../shared/data/tinyshakespeare.txt with the same seed, data,
# optimizer and schedule; prints each validation loss (32 eval batches) and
# the mean over the seeds.  docs/moe.md records a run.
#   bash bench/moe_vs_dense.sh [STEPS...]      # default: 300 1000 3000
# Env: MOEC, RUN (default ./moec, ./run), SEEDS (default "1337 1 2 3 4"),
#      MODELS (default "examples/tiny_moe.moe bench/models/tiny_moe_8x.moe
#      examples/tiny_moe_dense_twin.moe"; each file must carry the
#      "steps = 300  seed = 1337" and "eval_every = 100" of the examples),
#      DATA (default ../shared/data/tinyshakespeare.txt).  About 15 s per
#      300-step run on an idle 2-core machine, 150 s per 3000-step run: the
#      defaults take about 45 minutes.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MOEC=${MOEC:-$ROOT/moec}
RUN=${RUN:-$ROOT/run}
DATA=${DATA:-$ROOT/../shared/data/tinyshakespeare.txt}
SEEDS=${SEEDS:-1337 1 2 3 4}
MODELS=${MODELS:-examples/tiny_moe.moe bench/models/tiny_moe_8x.moe examples/tiny_moe_dense_twin.moe}
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(300 1000 3000)
[ -f "$DATA" ] || { echo "moe_vs_dense: no data at $DATA (set DATA=)" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one run at a time, no spin contention
for steps in "${STEPS[@]}"; do
    for path in $MODELS; do
        m=$(basename "$path" .moe)
        sum=0
        line="$m steps $steps val loss:"
        for seed in $SEEDS; do
            f=$TMP/${m}_${steps}_$seed
            sed -e "s/steps = 300  seed = 1337/steps = $steps  seed = $seed/" \
                -e "s/eval_every = 100/eval_every = $steps  eval_batches = 32/" \
                "$ROOT/$path" > "$f.moe"
            grep -q "seed = $seed" "$f.moe" || { echo "moe_vs_dense: $path changed, edit failed" >&2; exit 1; }
            "$MOEC" --stdlib "$ROOT/stdlib" "$f.moe" -o "$f.bin" >/dev/null || exit 1
            v=$("$RUN" "$f.bin" --data "$DATA" --metrics "" --checkpoint "$f.ckpt" 2>&1 |
                awk -v s="$steps" '$1 == "eval" && $3 == s {print $7}')
            [ -n "$v" ] || { echo "moe_vs_dense: $m seed $seed gave no validation loss" >&2; exit 1; }
            line="$line $v"
            sum=$(echo "$sum + $v" | bc -l)
        done
        n=$(echo "$SEEDS" | wc -w)
        printf '%s | mean %.4f\n' "$line" "$(echo "$sum / $n" | bc -l)"
    done
done
