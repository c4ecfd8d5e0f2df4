#!/usr/bin/env bash
# `backward { }` of an extern op (gradients as calls of other ops,
# docs/language.md): the IR shows the step nodes; training is bit-identical
# to the same op with a backward kernel; the model's gradient through it
# matches central finite differences of the loss.
source "$(dirname "$0")/../lib.sh"
cd "$ROOT" || exit 1
PY=/usr/bin/python3
DATA=$TMP/data.txt
if [ -f "$SHARED_DATA/tinyshakespeare.txt" ]; then head -c 20000 "$SHARED_DATA/tinyshakespeare.txt" >"$DATA"
else for i in $(seq 400); do echo "the quick brown fox jumps over the lazy dog $i"; done >"$DATA"; fi

# the same model twice: myscale with the kernel backward, and with a
# backward block of two steps (scale, then a scalar product)
model() {   # $1 = the backward line(s)
    cat <<MOE
import "nn"
config { vocab = 256  d = 32  seq = 16 }
extern op myscale(x: float[*N], s: float = 1.0) -> (y: float[*N]) {
  forward = moek_scale_fwd(x, y, N, s)
  $1
}
model m(tokens: i32[B, seq], targets: i32[B, seq]) {
  x = embedding(tokens, vocab, d, name = "embed")
  x = myscale(rmsnorm(x, name = "n0"), s = 1.5) + x
  logits = linear(rmsnorm(x, name = "n1"), vocab, name = "head")
  return cross_entropy(logits, targets), logits
}
train { batch = 2  steps = 6  seed = 7  optimizer = adamw(lr = 1e-2)  precision = ${2:-fp32} }
MOE
}
model 'backward = moek_scale_bwd(dy, dx, N, s)' >"$TMP/kern.moe"
model 'backward { dx = scale(dy, s = s * 2.0) * 0.5 }' >"$TMP/expr.moe"
model 'backward = moek_scale_bwd(dy, dx, N, s)' bf16 >"$TMP/kern16.moe"
model 'backward { dx = scale(dy, s = s * 2.0) * 0.5 }' bf16 >"$TMP/expr16.moe"

for v in kern expr kern16 expr16; do
    "$MOEC" --stdlib stdlib -o "$TMP/$v.bin" "$TMP/$v.moe" >/dev/null 2>"$TMP/$v.err" ||
        fail "bwd_expr_compile_$v" "$(head -5 "$TMP/$v.err")"
done

# the IR: the block's two steps, labelled, at the forward call's location
"$MOEC" --stdlib stdlib --dump=ir "$TMP/expr.moe" >"$TMP/expr.ir" 2>&1
if grep -q '"myscale (backward: scale)" moek_scale_fwd(.*s=3) at .*expr.moe:9:' "$TMP/expr.ir" &&
   grep -q '"myscale (backward: scale)" moek_scale_fwd(.*s=0.5) at .*expr.moe:9:' "$TMP/expr.ir" &&
   ! grep -q 'moek_scale_bwd' "$TMP/expr.ir"; then pass "bwd_expr_ir_steps"
else fail "bwd_expr_ir_steps" "$(grep -n 'myscale' "$TMP/expr.ir" | head)"; fi
# the stdlib's scale uses the form too (tiny_moe scales its balance loss)
if "$MOEC" --stdlib stdlib --dump=ir examples/tiny_moe.moe 2>&1 |
   grep -q '"layers.0.moe.scale (backward: scale)" moek_scale_fwd('; then pass "bwd_expr_stdlib_scale"
else fail "bwd_expr_stdlib_scale" "tiny_moe has no scale step"; fi

# bf16: the steps are the bf16 instances of scale
if "$MOEC" --stdlib stdlib --dump=ir "$TMP/expr16.moe" 2>&1 |
   grep -q '"myscale (backward: scale<bf16>)" moek_scale_fwd_bf16('; then pass "bwd_expr_ir_bf16_steps"
else fail "bwd_expr_ir_bf16_steps" "no moek_scale_fwd_bf16 step"; fi

# training: bit-identical losses and checkpoint tensors
for v in kern expr kern16 expr16; do
    "$RUN" --device cpu "$TMP/$v.bin" --data "$DATA" -q --metrics "$TMP/$v.jsonl" \
        --checkpoint "$TMP/$v.st" --trace "$TMP/tr_$v" >"$TMP/$v.out" 2>&1 ||
        fail "bwd_expr_train_$v" "$(tail -3 "$TMP/$v.out")"
done
if [ "$(cut -d, -f1,2 "$TMP/kern.jsonl")" = "$(cut -d, -f1,2 "$TMP/expr.jsonl")" ] &&
   [ "$(wc -l <"$TMP/expr.jsonl")" -eq 6 ]; then pass "bwd_expr_losses_bit_identical"
else fail "bwd_expr_losses_bit_identical" "$(paste -d'|' "$TMP/kern.jsonl" "$TMP/expr.jsonl" | head -3)"; fi
if [ "$(cut -d, -f1,2 "$TMP/kern16.jsonl")" = "$(cut -d, -f1,2 "$TMP/expr16.jsonl")" ] &&
   [ "$(wc -l <"$TMP/expr16.jsonl")" -eq 6 ]; then pass "bwd_expr_bf16_losses_bit_identical"
else fail "bwd_expr_bf16_losses_bit_identical" "$(paste -d'|' "$TMP/kern16.jsonl" "$TMP/expr16.jsonl" | head -3)"; fi

cat >"$TMP/st.py" <<'PY'
import json, struct, sys
def load(p):
    b = open(p, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n]); base = 8 + n
    return {k: (v['dtype'], v['shape'], b[base + v['data_offsets'][0]:base + v['data_offsets'][1]])
            for k, v in h.items() if k != '__metadata__'}
def f32(t): return list(struct.unpack('<%df' % (len(t[2]) // 4), t[2]))
def save(p, d):
    h, off, blobs = {}, 0, []
    for k, (dt, sh, data) in d.items():
        h[k] = {'dtype': dt, 'shape': sh, 'data_offsets': [off, off + len(data)]}
        off += len(data); blobs.append(data)
    j = json.dumps(h).encode(); j += b' ' * ((8 - len(j) % 8) % 8)
    open(p, 'wb').write(struct.pack('<Q', len(j)) + j + b''.join(blobs))
cmd = sys.argv[1]
if cmd == 'same':        # every tensor of a also in b, same bytes
    a, b = load(sys.argv[2]), load(sys.argv[3])
    bad = [k for k in a if k not in b or a[k] != b[k]]
    print('%d tensors, differ: %s' % (len(a), bad)); sys.exit(1 if bad or not a else 0)
if cmd == 'shift':       # init + h * direction(grad of the embedding) -> out
    init, grads, h, out = load(sys.argv[2]), load(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    key = [k for k in grads if k.startswith('embed')][0]
    g = f32(grads[key]); norm = sum(x * x for x in g) ** 0.5
    w = f32(init[key])
    dt, sh, _ = init[key]
    init[key] = (dt, sh, struct.pack('<%df' % len(w), *[a + h * b / norm for a, b in zip(w, g)]))
    save(out, init); print(norm)
PY
if $PY "$TMP/st.py" same "$TMP/kern.st" "$TMP/expr.st" >"$TMP/same.out" 2>&1; then pass "bwd_expr_checkpoint_bit_identical"
else fail "bwd_expr_checkpoint_bit_identical" "$(cat "$TMP/same.out")"; fi

# finite differences of the step-1 loss along the embedding gradient's
# direction u: (L(w + h u) - L(w - h u)) / 2h must equal |grad| (the
# embedding's gradient passes through the backward block)
h=0.01
norm=$($PY "$TMP/st.py" shift "$TMP/tr_expr/init.safetensors" "$TMP/tr_expr/grads.safetensors" $h "$TMP/up.st")
$PY "$TMP/st.py" shift "$TMP/tr_expr/init.safetensors" "$TMP/tr_expr/grads.safetensors" -$h "$TMP/dn.st" >/dev/null
for s in up dn; do
    "$RUN" --device cpu "$TMP/expr.bin" --data "$DATA" -q --steps 1 --init-from "$TMP/$s.st" \
        --metrics "$TMP/$s.jsonl" --checkpoint "$TMP/$s.ck" >"$TMP/$s.out" 2>&1 ||
        fail "bwd_expr_fd_run_$s" "$(tail -3 "$TMP/$s.out")"
done
lu=$(sed -n 's/.*"loss":\([^,]*\),.*/\1/p' "$TMP/up.jsonl")
ld=$(sed -n 's/.*"loss":\([^,]*\),.*/\1/p' "$TMP/dn.jsonl")
if $PY -c "import sys; fd = ($lu - $ld) / (2 * $h); n = $norm; print(fd, n); sys.exit(0 if n > 1e-3 and abs(fd - n) <= 2e-3 * n + 1e-5 else 1)" >"$TMP/fd.out" 2>&1
then pass "bwd_expr_grad_finite_differences"
else fail "bwd_expr_grad_finite_differences" "fd vs |grad|: $(cat "$TMP/fd.out") (losses $lu $ld)"; fi
