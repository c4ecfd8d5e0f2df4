#!/usr/bin/env bash
# GPU training throughput of ./run: ms/step and tokens/s, eager (--no-graph)
# vs CUDA graph replay, for examples/tiny_moe.moe and a bigger MoE (d_model
# 512, 8 layers, 8 experts top-2, d_ff 1024, seq 256, batch 16, fp32).
# Not a test.  Usage: bench/gpu_train.sh [STEPS]  (RUN, MOEC, MOEC_KERNELS
# from the environment; defaults ./run, ./moec).  The median of the per-step
# "ms" after the first 5 steps is reported (the first steps include warm-up
# and capture).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=${RUN:-$ROOT/run}
MOEC=${MOEC:-$ROOT/moec}
STEPS=${1:-40}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
cat "$ROOT"/docs/*.md "$ROOT"/README.md > "$T/data.txt"
cat > "$T/big_moe.moe" <<'MOE'
import "nn"
config {
  vocab = 256  d_model = 512  heads = 8  layers = 8  seq = 256
  experts = 8  top_k = 2  d_ff = 1024
}
model big_moe(tokens: i32[B, seq], targets: i32[B, seq]) {
  x = embedding(tokens, vocab, d_model, name = "embed")
  for l in 0..layers {
    x = decoder_layer(x, heads, d_ff, experts = experts, top_k = top_k,
                      balance = 0.01, name = "")
  }
  logits = linear(rmsnorm(x, name = "final_norm"), vocab, name = "lm_head")
  return cross_entropy(logits, targets), logits
}
train {
  batch = 16  steps = 1000  seed = 1
  optimizer = adamw(lr = 1e-3, betas = (0.9, 0.95), weight_decay = 0.1)
  schedule = cosine(warmup = 10, min_lr = 1e-4)
  clip_grad = 1.0  eval_every = 0  log_every = 10
  precision = fp32
}
parallel { ranks = 1  expert = 1  zero = 0 }
MOE
median_ms() {   # median "ms" of steps > 5
    sed -nE 's/^\{"step":([0-9]+),.*"ms":([0-9.]+).*/\1 \2/p' "$1" |
        awk '$1 > 5 {print $2}' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'
}
printf '%-10s %-6s %10s %12s %10s\n' model mode ms/step tokens/s loss@end
for m in tiny_moe big_moe; do
    src="$ROOT/examples/$m.moe"; [ "$m" = big_moe ] && src="$T/big_moe.moe"
    "$MOEC" --stdlib "${MOEC_STDLIB:-$ROOT/stdlib}" "$src" -o "$T/$m.bin" > /dev/null
    bt=$("$RUN" --inspect "$T/$m.bin" | sed -nE 's/^train: batch ([0-9]+), seq ([0-9]+), grad_accum ([0-9]+).*/\1 \2 \3/p' |
         awk '{print $1 * $2 * $3}')   # tokens per step
    for mode in eager graph; do
        flag=""; [ $mode = eager ] && flag=--no-graph
        "$RUN" "$T/$m.bin" --device cuda $flag --data "$T/data.txt" --steps "$STEPS" -q \
            --metrics "$T/$m.$mode.jsonl" --checkpoint "$T/ck.st" > /dev/null
        ms=$(median_ms "$T/$m.$mode.jsonl")
        loss=$(tail -1 "$T/$m.$mode.jsonl" | sed -E 's/.*"loss":([^,]+),.*/\1/')
        printf '%-10s %-6s %10.2f %12.0f %10.4f\n' $m $mode "$ms" "$(awk -v b="$bt" -v ms="$ms" 'BEGIN{print b / ms * 1000}')" "$loss"
    done
done
