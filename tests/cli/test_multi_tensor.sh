#!/usr/bin/env bash
# The multi_tensor pass (docs/passes.md): at -O2 each group of params is
# updated by one AdamW/SGD launch over flat buffers.  Plans at -O1 (no pass)
# and -O2 train to the same losses and the same checkpoints, bit for bit;
# checkpoints keep params by name (no flat buffer in them) and load across
# levels; --explain shows the launches saved.
source "$(dirname "$0")/../lib.sh"
M() { "$MOEC" --stdlib "$ROOT/stdlib" "$@"; }
cd "$ROOT" || exit 1

# --explain: a multi_tensor row, and fewer launches than the optimizer row
M --explain examples/tiny_moe.moe >"$TMP/tm.txt" 2>&1
lo=$(awk '$1 == "optimizer" {print $3}' "$TMP/tm.txt"); lm=$(awk '$1 == "multi_tensor" {print $3}' "$TMP/tm.txt")
echo "# tiny_moe launches: after optimizer $lo, after multi_tensor $lm"
if [ -n "$lo" ] && [ -n "$lm" ] && [ "$lo" -eq $((lm + 42)) ]; then
    pass multi_tensor_explain_tiny_moe
else
    fail multi_tensor_explain_tiny_moe "launches $lo -> $lm, want 42 fewer: $(sed -n '/^passes/,$p' "$TMP/tm.txt")"
fi
M -O1 --explain examples/tiny_moe.moe >"$TMP/tm1.txt" 2>&1
if ! grep -q '^  multi_tensor ' "$TMP/tm1.txt"; then pass multi_tensor_off_at_O1
else fail multi_tensor_off_at_O1 "$(grep multi_tensor "$TMP/tm1.txt")"; fi

# the IR: one update and one grad fill per (kernel, weight decay) group
M --dump=ir examples/tiny_moe.moe >"$TMP/tm.ir" 2>&1
nu=$(grep -c '"adamw [0-9]* tensors (multi-tensor)" moek_adamw(' "$TMP/tm.ir")
nf=$(grep -c '"zero grad [0-9]* tensors (multi-tensor)" moek_fill(' "$TMP/tm.ir")
nl=$(grep -c 'optimizer "adamw ' "$TMP/tm.ir")
if [ "$nu" = 2 ] && [ "$nf" = 2 ] && [ "$nl" = 2 ] &&
   grep -q 'adamw 18 tensors (multi-tensor)" moek_adamw(v[0-9]*, v[0-9]*, v[0-9]*, v[0-9]*, n=262656, v[0-9]*, v[0-9]*, weight_decay=0.1)' "$TMP/tm.ir"; then
    pass multi_tensor_ir_groups
else
    fail multi_tensor_ir_groups "$nu updates, $nf fills, $nl adamw nodes: $(grep -m3 'multi-tensor' "$TMP/tm.ir")"
fi

# pools: the flat buffers take exactly the bytes the params took
pools() { "$RUN" --inspect "$1" | grep -E '^  [0-9]+ (param|grad|optstate) ' ; }
M -O1 -o "$TMP/tm1.bin" examples/tiny_moe.moe >/dev/null 2>&1
M -O2 -o "$TMP/tm2.bin" examples/tiny_moe.moe >/dev/null 2>&1
if [ -x "$RUN" ]; then
    p1=$("$RUN" --inspect "$TMP/tm1.bin" | sed -n '/^pools/,/^tensors/p' | grep -E 'param|grad|optstate')
    p2=$("$RUN" --inspect "$TMP/tm2.bin" | sed -n '/^pools/,/^tensors/p' | grep -E 'param|grad|optstate')
    if [ -n "$p1" ] && [ "$p1" = "$p2" ]; then pass multi_tensor_same_pools
    else fail multi_tensor_same_pools "-O1: $p1 / -O2: $p2"; fi
fi

# 5 steps on the CPU kernels: -O1 and -O2 give the same losses and the same
# checkpoint (weights, moments, masters) byte for byte
DATA=$DEFAULT_DATA
[ -f "$ROOT/${MOEC_BUILD:-build}/data/default.txt" ] && DATA=$ROOT/${MOEC_BUILD:-build}/data/default.txt
if [ ! -x "$RUN" ] || [ ! -f "$DATA" ]; then
    skip multi_tensor_same_training "no $RUN or no $DATA"
    exit 0
fi
sed 's/precision = bf16/precision = fp16/' examples/tiny_moe_bf16.moe >"$TMP/tiny_moe_fp16.moe"
sed 's/optimizer = adamw(.*)/optimizer = sgd(lr = 0.3, momentum = 0.9, weight_decay = 0.01)/' \
    examples/tiny_dense.moe >"$TMP/tiny_dense_sgd.moe"
sed 's/optimizer = adamw(.*)/optimizer = sgd(lr = 0.1, momentum = 0.9)/' \
    examples/tiny_moe_bf16.moe >"$TMP/tiny_moe_bf16_sgd.moe"
for ex in tiny_dense tiny_moe mixtral_like deepseek_like tiny_moe_bf16 tiny_moe_fp16 tiny_dense_sgd \
          tiny_moe_bf16_sgd; do
    src=examples/$ex.moe
    [ -f "$src" ] || src=$TMP/$ex.moe
    for o in O1 O2; do
        M -$o -o "$TMP/$ex-$o.bin" "$src" >"$TMP/$ex-$o.log" 2>&1
        (cd "$TMP" && OMP_NUM_THREADS=1 "$RUN" --device cpu --data "$DATA" --steps 5 -q \
            --metrics "$TMP/$ex-$o.jsonl" --checkpoint "$TMP/$ex-$o.st" "$TMP/$ex-$o.bin" \
            >>"$TMP/$ex-$o.log" 2>&1)
    done
    l1=$(grep -o '"loss":[^,]*' "$TMP/$ex-O1.jsonl" 2>/dev/null | tr '\n' ' ')
    l2=$(grep -o '"loss":[^,]*' "$TMP/$ex-O2.jsonl" 2>/dev/null | tr '\n' ' ')
    ng=$(grep -c 'multi-tensor' <("$RUN" --inspect "$TMP/$ex-O2.bin" 2>&1))
    if [ "$(grep -c loss "$TMP/$ex-O1.jsonl" 2>/dev/null)" = 5 ] && [ "$l1" = "$l2" ] && [ "$ng" -ge 2 ] &&
       cmp -s "$TMP/$ex-O1.st" "$TMP/$ex-O2.st" && ! grep -q '__mt' "$TMP/$ex-O2.st"; then
        pass "multi_tensor_same_training_$ex"
    else
        fail "multi_tensor_same_training_$ex" "$ng multi-tensor ops; -O1 $l1 / -O2 $l2: $(tail -2 "$TMP/$ex-O2.log")"
    fi
done

# a checkpoint of the -O2 plan resumes in the -O1 plan and the other way
# round: the file names params, not flat buffers
for pair in "O2 O1" "O1 O2"; do
    set -- $pair
    (cd "$TMP" && OMP_NUM_THREADS=1 "$RUN" --device cpu --data "$DATA" --steps 3 -q \
        --checkpoint "$TMP/x-$1.st" "$TMP/tiny_moe_bf16-$1.bin" >/dev/null 2>&1 &&
     OMP_NUM_THREADS=1 "$RUN" --device cpu --data "$DATA" --steps 5 -q --resume "$TMP/x-$1.st" \
        --metrics "$TMP/x-$2.jsonl" --checkpoint "$TMP/x-$2.st" "$TMP/tiny_moe_bf16-$2.bin" >/dev/null 2>&1)
    if cmp -s "$TMP/x-$2.st" "$TMP/tiny_moe_bf16-O1.st"; then pass "multi_tensor_resume_${1}_into_$2"
    else fail "multi_tensor_resume_${1}_into_$2" "resumed checkpoint differs from 5 straight steps"; fi
done
