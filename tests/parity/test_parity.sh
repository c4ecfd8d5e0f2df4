#!/usr/bin/env bash
# tests/parity/test_parity.sh - whole-model parity with PyTorch (docs/parity.md).
# For each model: compile, train 10 fp32 AdamW steps with `run --trace`, then
# tests/parity/torch_ref.py rebuilds the model by hand in PyTorch, loads the
# step-0 weights, replays the same batches and compares the step-1 loss,
# every parameter's step-1 gradient and the 10-step loss curve.
source "$(dirname "$0")/../lib.sh"
PY=${PYTHON:-/usr/bin/python3}
REF=$ROOT/tests/parity/torch_ref.py
STEPS=10
# tolerances (measured worst errors are in docs/parity.md)
TOLS=(--loss-tol 1e-6 --grad-tol 1e-4 --curve-tol 1e-5)

DATA=$SHARED_DATA/tinyshakespeare.txt
[ -f "$DATA" ] || DATA=$ROOT/build/data/default.txt
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
DENSE="--layers 2 --heads 4"
MOE="--layers 2 --heads 4 --experts 4 --top-k 2 --balance 0.01"
VARIANTS=(
    "dense|$DENSE"
    "dense_accum|$DENSE"
    "moe|$MOE"
    "moe_cap|$MOE --capacity 1.0 --zloss 0.001 --expect-drops"
)

# ---- compile and trace every variant (needs no torch) ----
for v in "${VARIANTS[@]}"; do
    name=${v%%|*}
    if ! out=$("$MOEC" "$TMP/$name.moe" -o "$TMP/$name.bin" 2>&1); then
        fail "parity.$name.compile" "$(echo "$out" | head -5)"; continue
    fi
    out=$("$RUN" "$TMP/$name.bin" -q --device cpu --steps $STEPS --data "$DATA" --metrics "" \
          --checkpoint "$TMP/$name.ckpt" --trace "$TMP/$name.trace" 2>&1)
    rc=$?
    if [ $rc -ne 0 ]; then
        fail "parity.$name.trace" "run exited $rc: $(echo "$out" | tail -5)"; continue
    fi
    # batches.bin: STEPS x grad_accum x (tokens + targets) x 8 x 64 int32 = 40960 bytes
    size=$(stat -c %s "$TMP/$name.trace/batches.bin" 2>/dev/null || echo 0)
    nl=$(wc -l < "$TMP/$name.trace/trace.jsonl" 2>/dev/null || echo 0)
    if [ "$size" -eq $((STEPS * 2 * 8 * 64 * 4)) ] && [ "$nl" -eq $((STEPS + 1)) ] &&
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
    out=$("$PY" "$REF" "$TMP/$name.trace" --label "parity.$name" $opts "${TOLS[@]}" 2>&1)
    rc=$?
    grep -E '^(PASS|FAIL|RESULT) ' <<<"$out"
    if [ $rc -ne 0 ] && ! grep -q '^FAIL ' <<<"$out"; then
        fail "parity.$name.torch" "torch_ref.py exited $rc: $(tail -5 <<<"$out")"
    fi
done
