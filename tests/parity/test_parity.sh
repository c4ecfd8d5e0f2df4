#!/usr/bin/env bash
# tests/parity/test_parity.sh - whole-model parity with PyTorch (docs/parity.md).
# For each model: compile, train 10 fp32 AdamW steps with `run --trace`, then
# tests/parity/torch_ref.py rebuilds the model by hand in PyTorch, loads the
# step-0 weights, replays the same batches and compares the step-1 loss,
# every parameter's step-1 gradient and the 10-step loss curve; from run's
# --metrics JSONL, every step's per-expert load and dropped slots of every
# MoE layer (integer for integer) and its named aux losses.
source "$(dirname "$0")/../lib.sh"
PY=${PYTHON:-/usr/bin/python3}
REF=$ROOT/tests/parity/torch_ref.py
STEPS=10
# tolerances (measured worst errors are in docs/parity.md)
TOLS=(--loss-tol 1e-6 --grad-tol 1e-4 --curve-tol 1e-5)

DATA=$SHARED_DATA/tinyshakespeare.txt
[ -f "$DATA" ] || DATA=$DEFAULT_DATA
if [ ! -f "$DATA" ]; then
    skip parity "no data: neither ../shared/data/tinyshakespeare.txt nor build/data/default.txt (run make)"
    exit 0
fi

# The model variants: name, source, torch_ref.py options describing the model.
cp "$ROOT/examples/tiny_dense.moe" "$TMP/dense.moe"
cp "$ROOT/examples/tiny_moe.moe" "$TMP/moe.moe"
# micro-batches: batch 4 x grad_accum 2 (the loss seed 1/grad_accum, accumulation)
sed 's/batch = 8 /batch = 4  grad_accum = 2 /' "$ROOT/examples/tiny_dense.moe" > "$TMP/dense_accum.moe"
# capacity-dropping MoE with the router z-loss on
sed 's/balance = 0.01, name = "")/balance = 0.01, capacity = 1.0, zloss = 0.001, name = "")/' \
    "$ROOT/examples/tiny_moe.moe" > "$TMP/moe_cap.moe"
grep -q 'grad_accum = 2' "$TMP/dense_accum.moe" || fail parity.variants "tiny_dense.moe changed: the grad_accum edit did not apply"
grep -q 'capacity = 1.0' "$TMP/moe_cap.moe" || fail parity.variants "tiny_moe.moe changed: the capacity edit did not apply"
# stdlib/moe.moe routers, losses and expert shapes: MoE in every layer of a
# tiny_moe-sized model (8 x 64 tokens), one `moe(...)` call per variant
moe_model() {   # NAME TOP_K "KEYWORDS"
    cat > "$TMP/$1.moe" <<EOF
import "nn"
config { vocab = 256  d_model = 64  heads = 4  layers = 2  seq = 64  experts = 8  d_ff = 32 }
model $1(tokens: i32[B, seq], targets: i32[B, seq]) {
  x = embedding(tokens, vocab, d_model, name = "embed")
  for l in 0..layers {
    x = x + attention(rmsnorm(x, name = "attn_norm"), heads, name = "attn")
    x = x + moe(rmsnorm(x, name = "ffn_norm"), experts, $2, d_ff, $3)
  }
  logits = linear(rmsnorm(x, name = "final_norm"), vocab, name = "lm_head")
  return cross_entropy(logits, targets), logits
}
train {
  batch = 8  steps = 300  seed = 1337
  optimizer = adamw(lr = 3e-3, betas = (0.9, 0.95), weight_decay = 0.1)
  schedule = cosine(warmup = 20, min_lr = 3e-4)  clip_grad = 1.0
}
EOF
}
# DeepSeek-V3 style: sigmoid + aux-loss-free bias (moving every step), groups,
# scaled gates, per-sequence balance loss, a shared SwiGLU expert
moe_model moe_sigmoid 2 'router = "sigmoid", bias_rate = 0.001, groups = 4, topk_groups = 2, gate_scale = 2.5, balance = 0.0, seq_balance = 0.001, shared = 1'
# top-k then softmax, GELU experts, a gated shared expert, capacity drops, z-loss
moe_model moe_topk_softmax 2 'router = "topk_softmax", expert_act = "gelu", shared = 1, shared_gate = true, capacity = 1.25, balance = 0.01, zloss = 0.001'
# softmax router, group-limited (no renorm), k = 3, both balance losses
moe_model moe_grouped 3 'router = "softmax", groups = 2, topk_groups = 1, renorm = false, balance = 0.01, seq_balance = 0.01'
# the zoo models themselves (examples/*.moe, batch 4 x seq 32), unedited
for z in switch mixtral_like deepseek_like; do cp "$ROOT/examples/$z.moe" "$TMP/zoo_$z.moe"; done
ROUTE="--layers 2 --heads 4 --experts 8"
DENSE="--layers 2 --heads 4"
MOE="--layers 2 --heads 4 --experts 4 --top-k 2 --balance 0.01"
VARIANTS=(
    "dense|$DENSE"
    "dense_accum|$DENSE"
    "moe|$MOE"
    "moe_cap|$MOE --capacity 1.0 --zloss 0.001 --expect-drops"
    "moe_sigmoid|$ROUTE --top-k 2 --router sigmoid --bias-rate 0.001 --groups 4 --topk-groups 2 --gate-scale 2.5 --seq-balance 0.001 --shared 1"
    "moe_topk_softmax|$ROUTE --top-k 2 --router topk_softmax --expert-act gelu --shared 1 --shared-gate --capacity 1.25 --balance 0.01 --zloss 0.001 --expect-drops"
    "moe_grouped|$ROUTE --top-k 3 --router softmax --groups 2 --topk-groups 1 --renorm 0 --balance 0.01 --seq-balance 0.01"
    "zoo_switch|$ROUTE --top-k 1 --router softmax --capacity 1.25 --balance 0.01 --moe-layers 1 --expect-drops"
    "zoo_mixtral_like|$ROUTE --top-k 2 --router softmax --balance 0.01 --zloss 0.001"
    "zoo_deepseek_like|--layers 3 --heads 4 --experts 16 --top-k 4 --router sigmoid --bias-rate 0.001 --groups 4 --topk-groups 2 --seq-balance 0.001 --shared 1 --moe-layers 1,2"
)

# ---- compile and trace every variant (needs no torch) ----
for v in "${VARIANTS[@]}"; do
    name=${v%%|*}
    if ! out=$("$MOEC" "$TMP/$name.moe" -o "$TMP/$name.bin" 2>&1); then
        fail "parity.$name.compile" "$(echo "$out" | head -5)"; continue
    fi
    out=$("$RUN" "$TMP/$name.bin" -q --device cpu --steps $STEPS --data "$DATA" --metrics "$TMP/$name.jsonl" \
          --checkpoint "$TMP/$name.ckpt" --trace "$TMP/$name.trace" 2>&1)
    rc=$?
    if [ $rc -ne 0 ]; then
        fail "parity.$name.trace" "run exited $rc: $(echo "$out" | tail -5)"; continue
    fi
    # batches.bin: STEPS x grad_accum x (tokens + targets) x batch x seq int32
    # (40960 bytes for 8 x 64, batch 4 x grad_accum 2 included)
    size=$(stat -c %s "$TMP/$name.trace/batches.bin" 2>/dev/null || echo 0)
    nl=$(wc -l < "$TMP/$name.trace/trace.jsonl" 2>/dev/null || echo 0)
    bs=$(head -1 "$TMP/$name.trace/trace.jsonl" | grep -o '"batch":[0-9]*,"seq":[0-9]*,"grad_accum":[0-9]*' |
         tr -dc '0-9,' | awk -F, '{print $1 * $2 * $3}')
    case $name in zoo_*) want=$((4 * 32)) ;; *) want=$((8 * 64)) ;; esac
    if [ "${bs:-0}" -eq "$want" ] && [ "$size" -eq $((STEPS * 2 * want * 4)) ] && [ "$nl" -eq $((STEPS + 1)) ] &&
       [ -s "$TMP/$name.trace/init.safetensors" ] && [ -s "$TMP/$name.trace/grads.safetensors" ]; then
        pass "parity.$name.trace"
    else
        fail "parity.$name.trace" "batches.bin $size bytes, trace.jsonl $nl lines, files: $(ls "$TMP/$name.trace" | tr '\n' ' ')"
    fi
done

# ---- the option's errors ----
if [ -f "$TMP/dense.bin" ]; then
    expect_fail parity.trace_bad_dir "cannot create trace directory $TMP/none/sub" \
        "$RUN" "$TMP/dense.bin" -q --device cpu --steps 1 --data "$DATA" --metrics "" \
        --checkpoint "$TMP/err.ckpt" --trace "$TMP/none/sub"
    : > "$TMP/afile"
    expect_fail parity.trace_not_dir "cannot write trace file $TMP/afile/trace.jsonl" \
        "$RUN" "$TMP/dense.bin" -q --device cpu --steps 1 --data "$DATA" --metrics "" \
        --checkpoint "$TMP/err.ckpt" --trace "$TMP/afile"
fi

# ---- PyTorch ----
if ! why=$("$PY" -c 'import torch' 2>&1); then
    skip parity.torch "PyTorch is not importable by $PY ($(echo "$why" | tail -1)); install Debian's python3-torch"
    exit 0
fi
for v in "${VARIANTS[@]}"; do
    name=${v%%|*}; opts=${v#*|}
    [ -s "$TMP/$name.trace/grads.safetensors" ] || continue
    # shellcheck disable=SC2086
    out=$("$PY" "$REF" "$TMP/$name.trace" --label "parity.$name" $opts "${TOLS[@]}" \
          --metrics "$TMP/$name.jsonl" 2>&1)
    rc=$?
    grep -E '^(PASS|FAIL|RESULT) ' <<<"$out"
    if [ $rc -ne 0 ] && ! grep -q '^FAIL ' <<<"$out"; then
        fail "parity.$name.torch" "torch_ref.py exited $rc: $(tail -5 <<<"$out")"
    fi
done
