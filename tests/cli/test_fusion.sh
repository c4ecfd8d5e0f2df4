#!/usr/bin/env bash
# The fuse pass (compiler/pass_fuse.c) and the rules declared next to the
# fused ops (stdlib/core.moe `fuses { }`): the fused ops appear after the
# pass, -O2 launches fewer kernels than -O0, training is unchanged, bf16
# plans use the bf16 instance, and every rule error shows its message.
source "$(dirname "$0")/../lib.sh"
M() { "$MOEC" --stdlib "$ROOT/stdlib" "$@"; }
cd "$ROOT" || exit 1

# --dump=ir --after=fuse: residual add + RMSNorm fused where the sum has
# another reader (3 in tiny_dense: not the first norm, which reads the
# embedding, nor the final one, whose sum nothing else reads)
M --dump=ir --after=fuse examples/tiny_dense.moe >"$TMP/fuse.ir" 2>&1
M -O0 --dump=ir --after=autodiff examples/tiny_dense.moe >"$TMP/o0.ir" 2>&1
M --dump=ir --after=autodiff examples/tiny_dense.moe >"$TMP/o2.ir" 2>&1
nf=$(grep -c ' forward .*moek_add_rmsnorm_fwd(' "$TMP/fuse.ir")
nb=$(grep -c ' backward .*moek_add_rmsnorm_bwd(' "$TMP/o2.ir")
n0=$(grep -c 'moek_add_rmsnorm' "$TMP/o0.ir")
if [ "$nf" = 3 ] && [ "$nb" = 3 ] && [ "$n0" = 0 ] &&
   grep -q 'layers.0.ffn_norm.rms_norm (fused add_rms_norm)" moek_add_rmsnorm_fwd(v3, v18, v20, v19, v21, v22, N=512, D=64, eps=1e-05)' "$TMP/fuse.ir"; then
    pass fusion_dump_after_fuse
else
    fail fusion_dump_after_fuse "fused fwd $nf bwd $nb, at -O0 $n0: $(grep add_rms "$TMP/fuse.ir" | head -3)"
fi

# Goldens of --dump=ir --after=fuse (UPDATE=1 rewrites them): tiny_dense
# shows SwiGLU fused with its two projections, tiny_moe the router softmax
# fused with top-k, both beside the residual add + RMSNorm fusions;
# tiny_gelu each GPT-2 MLP as matmul_bias_gelu then matmul_bias
for ex in tiny_dense tiny_moe tiny_gelu; do
    "$MOEC" --stdlib stdlib --dump=ir --after=fuse examples/$ex.moe >"$TMP/after_fuse_$ex.ir" 2>&1   # relative paths
    [ "${UPDATE:-0}" = 1 ] && cp "$TMP/after_fuse_$ex.ir" "tests/golden/ir/after_fuse_$ex.ir"
    expect_same "fusion_golden_after_fuse_$ex" "tests/golden/ir/after_fuse_$ex.ir" "$TMP/after_fuse_$ex.ir"
done

# fused ops per example: "add_rms_norm swiglu_proj softmax_topk" counts, and
# at -O2 each fused op's backward kernel is in the plan and the ops it
# replaced are gone from the forward (no swiglu/topk kernel left where all fused)
fused_counts() {
    printf '%s %s %s' "$(grep -c 'moek_add_rmsnorm_fwd' "$1")" "$(grep -c 'moek_swiglu_proj_fwd' "$1")" \
        "$(grep -c 'moek_softmax_topk_fwd' "$1")"
}
for spec in "tiny_dense:3 2 0" "tiny_moe:3 0 2" "mixtral_like:3 0 2" "switch:3 1 1" "deepseek_like:5 3 0" \
            "tiny_moe_bf16:3 0 2"; do
    ex=${spec%%:*}; want=${spec#*:}
    M --dump=ir --after=fuse examples/$ex.moe >"$TMP/f_$ex.ir" 2>&1
    M --dump=ir --after=autodiff examples/$ex.moe >"$TMP/b_$ex.ir" 2>&1
    got=$(fused_counts "$TMP/f_$ex.ir")
    nbs=$(grep -c ' backward .*moek_swiglu_proj_bwd' "$TMP/b_$ex.ir")
    nbt=$(grep -c ' backward .*moek_softmax_topk_bwd' "$TMP/b_$ex.ir")
    set -- $want
    if [ "$got" = "$want" ] && [ "$nbs" = "$2" ] && [ "$nbt" = "$3" ]; then
        pass "fusion_ops_$ex"
    else
        fail "fusion_ops_$ex" "fused (add_rms_norm swiglu_proj softmax_topk) $got, want $want; backward $nbs $nbt"
    fi
done
# the pattern's ops are gone where everything fused: tiny_dense has no
# swiglu or projection matmul of the MLP left, tiny_moe no softmax or topk
if ! grep -q ' moek_swiglu_fwd(' "$TMP/f_tiny_dense.ir" && ! grep -q '^node .*mlp\.w[13]\.matmul"' "$TMP/f_tiny_dense.ir" &&
   ! grep -q ' moek_softmax_fwd(\| moek_topk_fwd(' "$TMP/f_tiny_moe.ir" &&
   grep -q 'moek_softmax_topk_fwd_bf16(' "$TMP/f_tiny_moe_bf16.ir"; then
    pass fusion_patterns_replaced
else
    fail fusion_patterns_replaced "$(grep -m3 ' moek_swiglu_fwd\| moek_softmax_fwd\| moek_topk_fwd' "$TMP/f_tiny_dense.ir" "$TMP/f_tiny_moe.ir")"
fi

# tiny_gelu: both linear layers of each MLP fused (2 layers: 2 + 2), their
# backward kernels in the plan, no gelu or bias_add kernel left; the bias
# pattern never steals the first two ops of the GELU one (longer rules first)
M --dump=ir --after=fuse examples/tiny_gelu.moe >"$TMP/f_gelu.ir" 2>&1
M --dump=ir --after=autodiff examples/tiny_gelu.moe >"$TMP/b_gelu.ir" 2>&1
got="$(grep -c ' moek_matmul_bias_gelu_fwd(' "$TMP/f_gelu.ir") $(grep -c ' moek_matmul_bias_fwd(' "$TMP/f_gelu.ir")"
got="$got $(grep -c ' backward .*moek_matmul_bias_gelu_bwd(' "$TMP/b_gelu.ir") $(grep -c ' backward .*moek_matmul_bias_bwd(' "$TMP/b_gelu.ir")"
if [ "$got" = "2 2 2 2" ] && ! grep -q ' moek_gelu_fwd(\| moek_bias_add_fwd(' "$TMP/f_gelu.ir" &&
   grep -q '"layers.0.mlp.gelu (fused matmul_bias_gelu)" moek_matmul_bias_gelu_fwd(v24, v27, v29, v30, v31, N=512, K=64, M=256)' "$TMP/f_gelu.ir"; then
    pass fusion_ops_tiny_gelu
else
    fail fusion_ops_tiny_gelu "fused fwd (gelu, bias) and bwd: $got, want 2 2 2 2; $(grep -m2 ' moek_gelu_fwd\| moek_bias_add_fwd' "$TMP/f_gelu.ir")"
fi
# bf16 and fp16 plans take the half instances of both fused ops
for p in bf16 fp16; do
    sed "s/precision = fp32/precision = $p/" examples/tiny_gelu.moe >"$TMP/gelu_$p.moe"
    M --dump=ir --after=fuse "$TMP/gelu_$p.moe" >"$TMP/gelu_$p.ir" 2>&1
    sfx=_${p/fp/f}
    n=$(grep -c " moek_matmul_bias_gelu_fwd$sfx(\| moek_matmul_bias_fwd$sfx(" "$TMP/gelu_$p.ir")
    if [ "$n" = 4 ]; then pass "fusion_linear_bias_$p"; else fail "fusion_linear_bias_$p" "$n fused $p nodes, want 4"; fi
done

# --explain: fewer launches at -O2 than at -O0, activation peak no higher
for ex in tiny_dense tiny_moe tiny_moe_bf16 mixtral_like switch deepseek_like tiny_gelu; do
    M -O0 --explain examples/$ex.moe >"$TMP/$ex.o0" 2>&1
    M --explain examples/$ex.moe >"$TMP/$ex.o2" 2>&1
    l0=$(awk '$1 == "memplan" {print $3}' "$TMP/$ex.o0"); l2=$(awk '$1 == "memplan" {print $3}' "$TMP/$ex.o2")
    p0=$(awk '$1 == "memplan" {print $4}' "$TMP/$ex.o0"); p2=$(awk '$1 == "memplan" {print $4}' "$TMP/$ex.o2")
    echo "# $ex: launches -O0 $l0 -O2 $l2, peak live -O0 $p0 -O2 $p2"
    if [ -n "$l0" ] && [ -n "$l2" ] && [ "$l2" -lt "$l0" ] && [ "$p2" -le "$p0" ] && grep -q '^  fuse ' "$TMP/$ex.o2"; then
        pass "fusion_fewer_launches_$ex"
    else
        fail "fusion_fewer_launches_$ex" "launches $l0 -> $l2, peak $p0 -> $p2"
    fi
done

# bf16: the fused op's bf16 instance replaces the bf16 pattern
M --dump=ir --after=fuse examples/tiny_moe_bf16.moe >"$TMP/bf16.ir" 2>&1
if grep -q 'moek_add_rmsnorm_fwd_bf16(' "$TMP/bf16.ir" && ! grep -q 'moek_add_rmsnorm_fwd(' "$TMP/bf16.ir"; then
    pass fusion_bf16_instance
else
    fail fusion_bf16_instance "$(grep -c add_rmsnorm "$TMP/bf16.ir") fused nodes: $(grep -m1 error "$TMP/bf16.ir")"
fi

# --passes=fuse alone; fuse off at -O1
M --passes=fuse --dump=ir --after=fuse examples/tiny_dense.moe >"$TMP/only.ir" 2>&1
M -O1 --explain examples/tiny_dense.moe >"$TMP/o1.txt" 2>&1
if [ "$(grep -c 'moek_add_rmsnorm_fwd(' "$TMP/only.ir")" = 3 ] && ! grep -q '^  fuse ' "$TMP/o1.txt"; then
    pass fusion_pass_selection; else fail fusion_pass_selection "$(head -3 "$TMP/only.ir")"; fi

# 5 training steps with the CPU kernels: -O0 and -O2 give the same losses
# and the same weights and Adam moments, bit for bit (docs/passes.md says why)
DATA=$DEFAULT_DATA
[ -f "$ROOT/${MOEC_BUILD:-build}/data/default.txt" ] && DATA=$ROOT/${MOEC_BUILD:-build}/data/default.txt
if [ -x "$RUN" ] && [ -f "$DATA" ]; then
    cp "$TMP/gelu_bf16.moe" "$TMP/tiny_gelu_bf16.moe"
    cp "$TMP/gelu_fp16.moe" "$TMP/tiny_gelu_fp16.moe"
    # every example model (custom_op/model.moe needs its own kernel library:
    # tests/cli/test_custom_op.sh) plus tiny_gelu in bf16 and fp16
    for ex in tiny_dense tiny_moe tiny_moe_bf16 tiny_moe_dense_twin mixtral_like switch deepseek_like \
              tiny_gelu tiny_gelu_bf16 tiny_gelu_fp16; do
        src=examples/$ex.moe
        [ -f "$src" ] || src=$TMP/$ex.moe
        for o in O0 O2; do
            M -$o -o "$TMP/$ex-$o.bin" "$src" >/dev/null 2>&1
            (cd "$TMP" && "$RUN" --device cpu --data "$DATA" --steps 5 -q --metrics "$TMP/$ex-$o.jsonl" \
                --checkpoint "$TMP/$ex-$o.st" "$TMP/$ex-$o.bin" >/dev/null 2>&1)
        done
        l0=$(grep -o '"loss":[^,]*' "$TMP/$ex-O0.jsonl" 2>/dev/null | tr '\n' ' ')
        l2=$(grep -o '"loss":[^,]*' "$TMP/$ex-O2.jsonl" 2>/dev/null | tr '\n' ' ')
        if [ "$(grep -c loss "$TMP/$ex-O0.jsonl" 2>/dev/null)" = 5 ] && [ "$l0" = "$l2" ] &&
           cmp -s "$TMP/$ex-O0.st" "$TMP/$ex-O2.st"; then
            pass "fusion_same_training_$ex"
        else
            fail "fusion_same_training_$ex" "-O0 $l0 / -O2 $l2"
        fi
    done
else
    skip fusion_same_training "no $RUN or no $DATA"
fi

# rule errors: each shows its message (a copy of tiny_dense with one bad op)
bad() {   # bad NAME PATTERN BODY: an extern op with BODY, compiled
    { cat examples/tiny_dense.moe
      printf 'extern op bad_fused(a: f32[*N, D], b: f32[*N, D], w: f32[D], eps: float = 1e-5)\n'
      printf '    -> (s: f32[*N, D], y: f32[*N, D], rstd: f32[N] saved) {\n'
      printf '  forward = moek_add_rmsnorm_fwd(a, b, w, s, y, rstd, N, D, eps)\n'
      printf '  backward = moek_add_rmsnorm_bwd(dy, ds, s, w, rstd, da, db, dw, N, D)\n'
      printf '%s\n}\n' "$3"; } >"$TMP/$1.moe"
    expect_fail "fusion_rule_$1" "$2" M -o "$TMP/$1.bin" "$TMP/$1.moe"
}
bad unknown_op "\`addd\` in the pattern of \`bad_fused\` is not an op that can be fused" \
    'fuses { s = addd(a, b)  y, rstd = rms_norm(s, w, eps = eps) }'
bad untied_attr "the pattern does not give attribute \`eps\` of \`rms_norm\`" \
    'fuses { s = add(a, b)  y, rstd = rms_norm(s, w) }'
bad unused_input "the pattern of \`bad_fused\` does not use its input \`b\`" \
    'fuses { s = add(a, a)  y, rstd = rms_norm(s, w, eps = eps) }'
bad missing_output "the pattern of \`bad_fused\` does not compute its output \`rstd\`" \
    'fuses { s = add(a, b)  y = rms_norm(s, w, eps = eps) }'
bad not_a_value "\`q\` is not a value of the pattern" \
    'fuses { s = add(a, q)  y, rstd = rms_norm(s, w, eps = eps) }'
bad not_a_call "a fusion pattern holds only op calls" \
    'fuses { s = a + b  y, rstd = rms_norm(s, w, eps = eps) }'
bad no_body "\`fuses\` in extern op \`bad_fused\` takes a \\{ \\} body" 'fuses = add(a, b)'
bad body_elsewhere "\`phase\` in extern op \`bad_fused\` is not a \\{ \\} body" 'phase { s = add(a, b) }'
bad bad_attr "\`tol\` is not a float attribute of \`bad_fused\`" \
    'fuses { s = add(a, b)  y, rstd = rms_norm(s, w, eps = tol) }'
bad unread "\`t\` in the pattern of \`bad_fused\` is neither read nor an output" \
    'fuses { t = add(a, b)  s = add(a, b)  y, rstd = rms_norm(s, w, eps = eps) }'
bad empty "empty fusion pattern in \`bad_fused\`" 'fuses { }'
bad unused_attr "the pattern of \`bad_fused\` does not use its attribute \`eps\`" \
    'fuses { s = add(a, b)  y, rstd = rms_norm(s, w, eps = 1e-5) }'
