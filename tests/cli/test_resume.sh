#!/usr/bin/env bash
# Exact resume on a real model: tiny_moe trained 20 steps straight equals 10
# steps, stop, --resume, 10 more - every logged loss and the final checkpoint
# bit for bit.
source "$(dirname "$0")/../lib.sh"
cd "$TMP" || exit 1
DATA=$SHARED_DATA/tinyshakespeare.txt
[ -f "$DATA" ] || DATA=$DEFAULT_DATA
sed 's/steps = 300/steps = 20/; s/eval_every = 100/eval_every = 10/; s/log_every = 10/log_every = 1/' \
    "$ROOT/examples/tiny_moe.moe" > m.moe
if ! "$MOEC" -I "$ROOT/examples" m.moe -o plan.bin >log 2>&1; then fail resume.compile "$(tail -3 log)"; exit 0; fi
r() { OMP_NUM_THREADS=2 "$RUN" plan.bin --device cpu --data "$DATA" -q "$@" >>log 2>&1; }
r --metrics a.jsonl --checkpoint a.safetensors
r --metrics b.jsonl --checkpoint b.safetensors --steps 10
r --metrics b.jsonl --checkpoint b.safetensors --resume b.safetensors
loss() { sed 's/.*"step":\([0-9]*\),"loss":\([0-9.eE+-]*\).*/\1 \2/' "$1"; }
if [ "$(wc -l < a.jsonl)" -eq 20 ] && [ "$(loss a.jsonl)" = "$(loss b.jsonl)" ]; then
    pass resume.tiny_moe_losses_10_plus_10_equal_20
else
    fail resume.tiny_moe_losses_10_plus_10_equal_20 "$(diff <(loss a.jsonl) <(loss b.jsonl) | head -4)"
fi
if cmp -s a.safetensors b.safetensors; then
    pass resume.tiny_moe_checkpoint_identical
else
    fail resume.tiny_moe_checkpoint_identical "a.safetensors and b.safetensors differ"
fi
