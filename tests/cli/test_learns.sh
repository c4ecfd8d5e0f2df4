#!/usr/bin/env bash
# The README's claim: examples/tiny_moe.moe, trained for its 300 steps on
# tinyshakespeare (byte-level), ends with a validation loss below 2.3.
source "$(dirname "$0")/../lib.sh"
DATA=$SHARED_DATA/tinyshakespeare.txt
if [ ! -f "$DATA" ]; then
    skip learns.tiny_moe "no $DATA (the shared test corpus)"; exit 0
fi
cd "$TMP" || exit 1
if ! "$MOEC" "$ROOT/examples/tiny_moe.moe" -o plan.bin >log 2>&1; then
    fail learns.compile "$(tail -3 log)"; exit 0
fi
if ! OMP_NUM_THREADS=2 "$RUN" plan.bin --device cpu --data "$DATA" -q >log 2>&1; then
    fail learns.train "$(tail -3 log)"; exit 0
fi
val=$(grep '"val_loss"' metrics.jsonl | tail -1 | sed 's/.*"val_loss":\([0-9.eE+-]*\).*/\1/')
step=$(grep '"val_loss"' metrics.jsonl | tail -1 | sed 's/.*"step":\([0-9]*\).*/\1/')
if [ "$step" = 300 ] && awk -v v="$val" 'BEGIN { exit !(v < 2.3) }'; then
    pass learns.tiny_moe_val_below_2.3
else
    fail learns.tiny_moe_val_below_2.3 "validation loss $val at step $step (want < 2.3 at step 300)"
fi
