#!/usr/bin/env bash
# moec's command line: examples compile, --dump=ast goldens, usage errors
# exit 2, parameter and FLOP counts equal hand counts.
source "$(dirname "$0")/../lib.sh"
cd "$ROOT" || exit 1
M() { "$MOEC" --stdlib stdlib "$@"; }

for ex in tiny_dense tiny_moe; do
    expect_ok "compile_$ex" M -o "$TMP/$ex.bin" examples/$ex.moe
    if [ -s "$TMP/$ex.bin" ]; then pass "plan_written_$ex"; else fail "plan_written_$ex" "no plan"; fi
    M --dump=ast examples/$ex.moe >"$TMP/$ex.ast" 2>&1
    [ "${UPDATE:-0}" = 1 ] && cp "$TMP/$ex.ast" tests/golden/ast/$ex.ast
    expect_same "dump_ast_$ex" tests/golden/ast/$ex.ast "$TMP/$ex.ast"
done
M --dump=ast stdlib/nn.moe >"$TMP/nn.ast" 2>&1
[ "${UPDATE:-0}" = 1 ] && cp "$TMP/nn.ast" tests/golden/ast/nn.ast
expect_same "dump_ast_stdlib_nn" tests/golden/ast/nn.ast "$TMP/nn.ast"

# hand counts (see tests/unit/test_elab.c for the arithmetic)
out=$(M --explain examples/tiny_moe.moe 2>&1)
if echo "$out" | grep -Eq 'total +262976'; then pass "explain_moe_params"; else fail "explain_moe_params" "$out"; fi
if echo "$out" | grep -Eq 'active per token +164672'; then pass "explain_moe_active"; else fail "explain_moe_active" "$out"; fi

# bad usage: exit 2
usage_rc() {
    local name=$1; shift
    "$@" >/dev/null 2>"$TMP/u.err"; local rc=$?
    if [ $rc -eq 2 ] && grep -q 'moec: error:' "$TMP/u.err"; then pass "$name"; else fail "$name" "exit $rc: $(cat "$TMP/u.err")"; fi
}
usage_rc usage_no_input "$MOEC"
usage_rc usage_bad_option "$MOEC" --frobnicate examples/tiny_dense.moe
usage_rc usage_two_inputs "$MOEC" examples/tiny_dense.moe examples/tiny_moe.moe
usage_rc usage_missing_file "$MOEC" does/not/exist.moe
usage_rc usage_bad_max_errors "$MOEC" --max-errors 0 examples/tiny_dense.moe
expect_ok version "$MOEC" --version
expect_ok help "$MOEC" --help

# the default stdlib is found next to the moec executable
if [ -d "$(dirname "$MOEC")/stdlib" ]; then
    expect_ok default_stdlib "$MOEC" -o "$TMP/d.bin" examples/tiny_dense.moe
fi
# -I and MOEC_PATH find imports; the error lists the searched paths
mkdir -p "$TMP/inc"
printf 'block twice(x) { return x + x }\n' >"$TMP/inc/mylib.moe"
sed 's/import "nn"/import "nn"\nimport "mylib"/' examples/tiny_dense.moe >"$TMP/with_import.moe"
expect_ok import_via_I M -I "$TMP/inc" -o "$TMP/i.bin" "$TMP/with_import.moe"
expect_ok import_via_MOEC_PATH env MOEC_PATH="$TMP/nope:$TMP/inc" "$MOEC" --stdlib stdlib -o "$TMP/i.bin" "$TMP/with_import.moe"
expect_fail import_missing "not found \(searched .*with_import|not found \(searched" M -o "$TMP/i.bin" "$TMP/with_import.moe"
# an import cycle is harmless: each file is read once
printf 'import "b"\nblock fa(x) { return x }\n' >"$TMP/inc/a.moe"
printf 'import "a"\nblock fb(x) { return x }\n' >"$TMP/inc/b.moe"
sed 's/import "nn"/import "nn"\nimport "a"/' examples/tiny_dense.moe >"$TMP/cycle.moe"
expect_ok import_cycle M -I "$TMP/inc" -o "$TMP/c.bin" "$TMP/cycle.moe"

# ---- goldens of --dump=ir and --explain for both examples (UPDATE=1 rewrites)
mkdir -p tests/golden/ir tests/golden/explain
for ex in tiny_dense tiny_moe; do
    M --dump=ir examples/$ex.moe >"$TMP/$ex.ir" 2>&1
    M --explain examples/$ex.moe >"$TMP/$ex.explain" 2>&1
    if [ "${UPDATE:-0}" = 1 ]; then
        cp "$TMP/$ex.ir" tests/golden/ir/$ex.ir
        cp "$TMP/$ex.explain" tests/golden/explain/$ex.txt
    fi
    expect_same "dump_ir_$ex" tests/golden/ir/$ex.ir "$TMP/$ex.ir"
    expect_same "explain_$ex" tests/golden/explain/$ex.txt "$TMP/$ex.explain"
done

# ---- --dot: a digraph with every phase, params as boxes, shapes on edges
M --dot tests/golden/dot/tiny.moe >"$TMP/tiny.dot" 2>&1
[ "${UPDATE:-0}" = 1 ] && cp "$TMP/tiny.dot" tests/golden/dot/tiny.dot
expect_same "dot_golden_tiny" tests/golden/dot/tiny.dot "$TMP/tiny.dot"
dot_ok=$(awk '
    NR == 1 && !/^digraph "[^"]*" \{$/ { bad = "first line " $0 }
    / \[/ && !/->/ { split($1, a, " "); decl[$1] = 1 }
    /->/ { if (!($1 in decl)) bad = "edge from undeclared " $1; t = $3; if (!(t in decl)) bad = "edge to undeclared " t;
           if ($0 !~ /label="(f32|bf16|i32)\[[0-9,]*\]"|label="update"/) bad = "edge without a shape: " $0; edges++ }
    { opens += gsub(/\{/, "{"); closes += gsub(/\}/, "}"); last = $0 }
    END { if (last != "}") bad = "last line " last; if (opens != closes) bad = "unbalanced braces";
          if (edges < 10) bad = "only " edges " edges"; print bad ? bad : "ok" }' "$TMP/tiny.dot")
if [ "$dot_ok" = ok ]; then pass "dot_parses_as_digraph"; else fail "dot_parses_as_digraph" "$dot_ok"; fi
nf=$(grep -c 'shape=ellipse.*#cfe2ff' "$TMP/tiny.dot"); nb=$(grep -c 'shape=ellipse.*#ffd8b1' "$TMP/tiny.dot")
no=$(grep -c 'shape=ellipse.*#c8f7c5' "$TMP/tiny.dot"); np=$(grep -v 'label="__mt' "$TMP/tiny.dot" | grep -c 'shape=box.*#fff3b0.* param"')
# tiny.moe: 4 forward ops; 7 backward-phase ops (4 op backwards, the sum of the
# tied weight's two gradients, 2 accumulates); 2 params (embed.weight, tied
# into the head, and norm.weight), besides the flat buffer __mt0.p that the
# multi_tensor pass makes them views of
if [ "$nf" = 4 ] && [ "$nb" = 7 ] && [ "$no" -ge 5 ] && [ "$np" = 2 ]; then pass "dot_phases_and_params"
else fail "dot_phases_and_params" "forward $nf (want 4), backward $nb (want 7), optimizer $no (>= 5), params $np (want 2)"; fi
if command -v dot >/dev/null; then
    expect_ok dot_renders dot -Tsvg -o "$TMP/tiny.svg" "$TMP/tiny.dot"
fi
usage_rc usage_dot_with_explain M --dot --explain examples/tiny_dense.moe

# ---- --explain --layout: another layout, checked like parallel { } (exit 2)
out=$(M --explain --layout ranks=8,expert=4,zero=3 examples/tiny_moe.moe 2>&1)
# tiny_moe: 262976 params of which 131072 expert; ranks 8, expert 4: dense
# params / 8, expert params / 4 / 2 (their data-parallel size); stage 3 shards
# params, grads and the 8 bytes of m,v: 4 x (131904/8 + 131072/8) = 131488
if echo "$out" | grep -q 'parallel layout (--layout): ranks=8 expert=4 zero=3' &&
   echo "$out" | grep -Eq '^  3 \* +131488 +131488 +262976 +525952  <- zero in --layout$'; then
    pass "explain_layout_override"
else fail "explain_layout_override" "$out"; fi
layout_err() {
    local name=$1 spec=$2 want=$3
    M --explain --layout "$spec" examples/tiny_moe.moe >/dev/null 2>"$TMP/l.err"; local rc=$?
    if [ $rc -eq 2 ] && grep -q -- "$want" "$TMP/l.err"; then pass "$name"
    else fail "$name" "exit $rc: $(cat "$TMP/l.err")"; fi
}
layout_err layout_ranks_not_divisible ranks=6,expert=4 '`ranks` = 6 is not divisible by `expert` = 4'
layout_err layout_experts_not_divisible ranks=6,expert=6 '4 experts of `layers.0.moe.w1` are not divisible by `expert` = 6'
layout_err layout_zero_range zero=4 '`zero` must be a ZeRO stage 0-3, got 4'
layout_err layout_unknown_field ranks=8,rank=2 'unknown field `rank` (did you mean `ranks`?)'
layout_err layout_not_a_number ranks=eight '`ranks` needs a whole number, got `ranks=eight`'
layout_err layout_ranks_zero ranks=0 '`ranks` must be at least 1, got 0'
layout_err layout_empty '' '--layout needs ranks=R,expert=E,zero=Z'
usage_rc usage_layout_without_explain M --layout ranks=2 examples/tiny_dense.moe

# ---- issue 2 stdlib: layernorm, linear bias, grouped-query attention, gelu/silu MLP
cat >"$TMP/gpt.moe" <<'MOE'
import "nn"
config { vocab = 256  d_model = 32  heads = 4  seq = 16  d_ff = 64 }
model gptish(tokens: i32[B, seq], targets: i32[B, seq]) {
  x = embedding(tokens, vocab, d_model, name = "embed")
  x = x + attention(layernorm(x, name = "ln1"), heads, kv_heads = 2, name = "attn")
  x = x + mlp(layernorm(x, name = "ln2"), d_ff, act = "gelu", bias = true, name = "mlp")
  x = x + mlp(layernorm(x, name = "ln3"), d_ff, act = "silu", name = "mlp2")
  logits = linear(layernorm(x, name = "lnf"), vocab, bias = true, name = "lm_head")
  return cross_entropy(logits, targets), logits
}
train { batch = 2  steps = 2  precision = fp32 }
MOE
sed 's/precision = fp32/precision = bf16/' "$TMP/gpt.moe" >"$TMP/gpt_bf16.moe"
expect_ok stdlib2_compiles M -o "$TMP/gpt.bin" "$TMP/gpt.moe"
expect_ok stdlib2_compiles_bf16 M -o "$TMP/gpt16.bin" "$TMP/gpt_bf16.moe"
ir=$(M -O0 --dump=ir "$TMP/gpt.moe" 2>&1)   # -O0: at -O2 bias_add and gelu fuse into the linear layers
# GQA: wk/wv project to kv_heads * d_head = 2 * 8 = 16, repeat_kv back to 32
if echo "$ir" | grep -q 'value v[0-9]* attn.wk.weight f32\[16,32\]' &&
   echo "$ir" | grep -Eq 'moek_repeat_kv_fwd\(v[0-9]+, v[0-9]+, N=32, kv_heads=2, heads=4, C/kv_heads=8\)'; then
    pass "stdlib2_gqa_shapes"; else fail "stdlib2_gqa_shapes" "$(echo "$ir" | grep -E 'wk|repeat_kv' | head -5)"; fi
for k in moek_layernorm_fwd moek_layernorm_bwd moek_bias_add_fwd moek_bias_add_bwd moek_gelu_fwd \
         moek_silu_fwd moek_silu_bwd moek_repeat_kv_bwd; do
    if echo "$ir" | grep -q " $k("; then pass "stdlib2_uses_$k"; else fail "stdlib2_uses_$k" "not in the IR"; fi
done
if echo "$ir" | grep -q 'param p[0-9]* lm_head.bias value=v[0-9]* .*init=zeros'; then pass "stdlib2_linear_bias_param"
else fail "stdlib2_linear_bias_param" "$(echo "$ir" | grep 'param.*bias')"; fi
ir16=$(M --dump=ir "$TMP/gpt_bf16.moe" 2>&1)
if echo "$ir16" | grep -q ' moek_layernorm_fwd_bf16(' && echo "$ir16" | grep -q ' moek_repeat_kv_bwd_bf16('; then
    pass "stdlib2_bf16_kernels"; else fail "stdlib2_bf16_kernels" "no _bf16 layernorm/repeat_kv"; fi
# the blocks' own checks
sed 's/kv_heads = 2/kv_heads = 3/' "$TMP/gpt.moe" >"$TMP/gqa_bad.moe"
expect_fail stdlib2_kv_heads_must_divide "kv_heads must divide the number of attention heads" M -o "$TMP/x.bin" "$TMP/gqa_bad.moe"
sed 's/act = "gelu"/act = "relu"/' "$TMP/gpt.moe" >"$TMP/act_bad.moe"
expect_fail stdlib2_mlp_unknown_act "mlp act must be swiglu, gelu or silu" M -o "$TMP/x.bin" "$TMP/act_bad.moe"
