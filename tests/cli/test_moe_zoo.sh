#!/usr/bin/env bash
# The MoE zoo (examples/switch.moe, mixtral_like.moe, deepseek_like.moe):
# each compiles, trains 20 steps on the CPU with a falling loss, logs its
# routing statistics, and --explain gives the hand-counted parameters.
source "$(dirname "$0")/../lib.sh"
cd "$ROOT" || exit 1
PY=/usr/bin/python3

# name total active  (hand counts, d_model 48, vocab 256, 4 heads)
#  switch: embed 12288 + 2 x (attn 9216 + norms 96) + dense mlp 3*48*64 + router 8*48
#          + experts 3*8*64*48 = 73728 + final norm 48 + lm_head 12288 = 126576;
#          active = 126576 - 73728 + 73728/8 = 62064
#  mixtral_like: 12288 + 2 x (9312 + 384 + 73728) + 48 + 12288 = 191472;
#          active = 191472 - 147456 + 147456*2/8 = 80880
#  deepseek_like: 12288 + 3 x 9312 + dense 9216 + 2 x (router 768 + experts 3*16*16*48
#          = 36864 + shared 3*48*16 = 2304) + 48 + 12288 = 141648;
#          active = 141648 - 73728 + 73728*4/16 = 86352 (the bias buffers are not weights)
while read -r name total active; do
    src=examples/$name.moe
    plan=$TMP/$name.bin
    if ! "$MOEC" --stdlib "$ROOT/stdlib" -o "$plan" "$src" >"$TMP/$name.moec" 2>&1; then
        fail "zoo_${name}_compiles" "$(tail -5 "$TMP/$name.moec")"; continue
    fi
    pass "zoo_${name}_compiles"
    "$MOEC" --stdlib "$ROOT/stdlib" --explain "$src" >"$TMP/$name.explain" 2>&1
    got_t=$(awk '$1 == "total" && NF == 2 {print $2; exit}' "$TMP/$name.explain")
    got_a=$(awk '$1 == "active" {print $4; exit}' "$TMP/$name.explain")
    if [ "$got_t" = "$total" ] && [ "$got_a" = "$active" ]; then pass "zoo_${name}_param_counts"
    else fail "zoo_${name}_param_counts" "total $got_t active $got_a, hand count $total $active"; fi
    if ! (cd "$TMP" && "$RUN" "$plan" --steps 20 --metrics "$TMP/$name.jsonl" \
              --checkpoint "$TMP/$name.ckpt" >"$TMP/$name.out" 2>&1); then
        fail "zoo_${name}_trains" "$(tail -5 "$TMP/$name.out")"; continue
    fi
    $PY - "$TMP/$name.jsonl" "$name" <<'PYEOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
name = sys.argv[2]
first, last = recs[0]["loss"], recs[-1]["loss"]
print(("PASS" if len(recs) == 20 and last < first - 0.5 else "FAIL") +
      f" zoo_{name}_loss_falls" + ("" if last < first - 0.5 else f": {first} -> {last}"))
r = recs[-1].get("routing", {})
ok = bool(r) and all(len(v["load"]) >= 8 and v["min"] <= v["mean"] <= v["max"] for v in r.values())
print(("PASS" if ok else "FAIL") + f" zoo_{name}_routing_stats_logged" + ("" if ok else f": {r}"))
PYEOF
    if grep -q "tokens/expert min" "$TMP/$name.out"; then pass "zoo_${name}_stats_line"
    else fail "zoo_${name}_stats_line" "no per-layer load line in the log"; fi
done <<'LIST'
switch 126576 62064
mixtral_like 191472 80880
deepseek_like 141648 86352
LIST

# switch: top-1 with capacity 1.25 drops tokens and says how many, and the
# load (before capacity) of every step adds up to the batch's 4 x 32 slots
$PY - "$TMP/switch.jsonl" <<'PYEOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
r = [x["routing"]["layers.1.moe"] for x in recs]
ok = all(sum(v["load"]) == 128 for v in r) and all(0 <= v["dropped_share"] < 1 for v in r)
ok = ok and all(v["dropped"] >= sum(max(0, l - 20) for l in v["load"]) for v in r)  # capacity ceil(1.25*128/8) = 20
print(("PASS" if ok else "FAIL") + " zoo_switch_capacity_drops" + ("" if ok else f": {r[-1]}"))
PYEOF

# deepseek_like: the bias buffers are checkpointed and moved by the update
$PY - "$TMP/deepseek_like.ckpt" <<'PYEOF'
import json, struct, sys
b = open(sys.argv[1], "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
ok = True
for name in ("layers.1.moe.bias", "layers.2.moe.bias"):
    if name not in h: ok = False; print(f"FAIL zoo_deepseek_bias_checkpointed: {name} missing"); continue
    s, e = h[name]["data_offsets"]
    v = struct.unpack("<16f", b[8 + n + s:8 + n + e])
    # 20 steps of +-0.001 (or 0 on a tie with the mean): |bias| <= 0.02, not all zero
    ok &= any(x != 0 for x in v) and all(abs(x) <= 0.02 + 1e-6 for x in v)
print(("PASS" if ok else "FAIL") + " zoo_deepseek_bias_checkpointed_and_moved")
PYEOF

# --routing-stats: one batch, per-expert counts summing to batch x seq x top_k
out=$(cd "$TMP" && "$RUN" "$TMP/deepseek_like.bin" --routing-stats 2>/dev/null)
sums=$(echo "$out" | awk '/^    0:/ {s = 0; for (i = 1; i <= NF; i++) {split($i, a, ":"); if (a[1] != "dropped") s += a[2]} print s}' | sort -u)
if [ "$sums" = "512" ]; then pass "routing_stats_counts"; else fail "routing_stats_counts" "sums '$sums': $out"; fi
expect_fail "routing_stats_dense_plan" "no MoE layer" bash -c "cd $TMP && '$MOEC' --stdlib '$ROOT/stdlib' -o d.bin '$ROOT/examples/tiny_dense.moe' && '$RUN' d.bin --routing-stats"

# the heat map tool: a PNG from the JSONL (matplotlib or its own writer)
if $PY tools/expert_heatmap.py "$TMP/deepseek_like.jsonl" "$TMP/heat.png" >/dev/null &&
   head -c 8 "$TMP/heat.png" | od -An -c | grep -q "P   N   G"; then pass "expert_heatmap_png"
else fail "expert_heatmap_png" "no PNG written"; fi
expect_fail "expert_heatmap_no_routing" "no \"routing\" entries" $PY tools/expert_heatmap.py /dev/null "$TMP/x.png"

# precision = bf16: the router logits are cast to fp32 (to_f32) and trained
sed 's/^train {/train {\n  precision = bf16/' examples/deepseek_like.moe > "$TMP/ds_bf16.moe"
if "$MOEC" --stdlib "$ROOT/stdlib" -o "$TMP/ds_bf16.bin" "$TMP/ds_bf16.moe" >"$TMP/bf16.out" 2>&1 &&
   (cd "$TMP" && "$RUN" "$TMP/ds_bf16.bin" --steps 20 -q --metrics "$TMP/ds_bf16.jsonl" \
        --checkpoint "$TMP/ds_bf16.ckpt" >>"$TMP/bf16.out" 2>&1); then
    $PY - "$TMP/ds_bf16.jsonl" "$TMP/deepseek_like.jsonl" <<'PYEOF'
import json, sys
b = [json.loads(l) for l in open(sys.argv[1])]
f = [json.loads(l) for l in open(sys.argv[2])]
rel = abs(b[-1]["loss"] - f[-1]["loss"]) / f[-1]["loss"]
ok = b[-1]["loss"] < b[0]["loss"] - 0.5 and rel < 0.02
print(("PASS" if ok else "FAIL") + " zoo_deepseek_bf16_trains" +
      ("" if ok else f": bf16 {b[0]['loss']} -> {b[-1]['loss']}, fp32 {f[-1]['loss']}"))
PYEOF
else
    fail "zoo_deepseek_bf16_trains" "$(tail -5 "$TMP/bf16.out")"
fi

# exact resume carries the bias buffers: 5 + 5 steps == 10 steps, byte for byte
(cd "$TMP" && "$RUN" "$TMP/deepseek_like.bin" --steps 10 -q --metrics "" --checkpoint r10.ckpt &&
 "$RUN" "$TMP/deepseek_like.bin" --steps 5 -q --metrics "" --checkpoint r5.ckpt &&
 "$RUN" "$TMP/deepseek_like.bin" --steps 10 -q --metrics "" --resume r5.ckpt --checkpoint r55.ckpt) >/dev/null 2>&1
if cmp -s "$TMP/r10.ckpt" "$TMP/r55.ckpt"; then pass "zoo_deepseek_resume_exact"
else fail "zoo_deepseek_resume_exact" "the resumed checkpoint differs from the unbroken run"; fi
