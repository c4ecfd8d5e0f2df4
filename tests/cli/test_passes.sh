#!/usr/bin/env bash
# moec's pass pipeline from the command line: -O levels, --passes,
# --dump=ir --after, the --explain per-pass table, train { freeze } errors.
source "$(dirname "$0")/../lib.sh"
M() { "$MOEC" --stdlib "$ROOT/stdlib" "$@"; }
cd "$ROOT" || exit 1
EX=examples/tiny_dense.moe

# usage errors: exit 2, with a did-you-mean
out=$(M --passes=cse,inplce "$EX" 2>&1); rc=$?
if [ $rc -eq 2 ] && grep -q "unknown pass \`inplce\` in --passes (did you mean \`inplace\`?)" <<<"$out"; then
    pass passes_unknown_pass; else fail passes_unknown_pass "rc $rc: $out"; fi
out=$(M --dump=ir --after=autodif "$EX" 2>&1); rc=$?
if [ $rc -eq 2 ] && grep -q "unknown pass \`autodif\` in --after (did you mean \`autodiff\`?)" <<<"$out"; then
    pass passes_unknown_after; else fail passes_unknown_after "rc $rc: $out"; fi
out=$(M --after=cse "$EX" 2>&1); rc=$?
if [ $rc -eq 2 ] && grep -q "after=cse needs --dump=ir" <<<"$out"; then
    pass passes_after_needs_dump; else fail passes_after_needs_dump "rc $rc: $out"; fi
out=$(M -O1 --dump=ir --after=schedule "$EX" 2>&1); rc=$?
if [ $rc -eq 2 ] && grep -q "pass \`schedule\` does not run here (-O1)" <<<"$out"; then
    pass passes_after_not_run; else fail passes_after_not_run "rc $rc: $out"; fi
expect_fail passes_O3_unknown "unknown option \`-O3\`" M -O3 "$EX"

# --dump=ir --after: the IR right after that pass
M --dump=ir --after=cse "$EX" >"$TMP/cse.ir" 2>&1
M --dump=ir --after=autodiff "$EX" >"$TMP/ad.ir" 2>&1
M --dump=ir --after=inplace "$EX" >"$TMP/ip.ir" 2>&1
if ! grep -q ' backward ' "$TMP/cse.ir" && grep -q ' backward ' "$TMP/ad.ir" && ! grep -q ' optimizer ' "$TMP/ad.ir" &&
   ! grep -q '^pools' "$TMP/ip.ir" && grep -Eq 'moek_add_fwd\(v([0-9]+), v[0-9]+, v\1,|moek_add_fwd\(v[0-9]+, v([0-9]+), v\2,' "$TMP/ip.ir"; then
    pass passes_dump_after
else
    fail passes_dump_after "cse/autodiff/inplace dumps not as expected: $(grep -c ' backward ' "$TMP/cse.ir") backward ops after cse"
fi

# --explain: one row per pass that ran; -O2 uses less activation memory
M -O0 --explain "$EX" >"$TMP/o0.txt" 2>&1
M --explain "$EX" >"$TMP/o2.txt" 2>&1
M --passes=dce --explain "$EX" >"$TMP/dce.txt" 2>&1
pool() { awk '$1 == "memplan" {print $5}' "$1"; }
if grep -q '^  pass  *ops  *launches  *peak live  *act pool  *MFLOP/step' "$TMP/o2.txt" &&
   ! grep -q '^  schedule ' "$TMP/o0.txt" && grep -q '^  schedule ' "$TMP/o2.txt" && grep -q '^  inplace ' "$TMP/o2.txt" &&
   grep -q '^  dce ' "$TMP/dce.txt" && ! grep -q '^  cse ' "$TMP/dce.txt" &&
   [ -n "$(pool "$TMP/o0.txt")" ] && [ "$(pool "$TMP/o2.txt")" -lt "$(pool "$TMP/o0.txt")" ]; then
    pass passes_explain_table
else
    fail passes_explain_table "act pool -O0 $(pool "$TMP/o0.txt") -O2 $(pool "$TMP/o2.txt"): $(sed -n '/^passes/,$p' "$TMP/o2.txt")"
fi

# plans at every level write and, where ./run exists, load
for o in -O0 -O1 -O2; do
    expect_ok "passes_plan_$o" M $o -o "$TMP/plan$o.bin" "$EX"
done
if [ -x "$RUN" ]; then
    expect_ok passes_plan_O2_loads "$RUN" --inspect "$TMP/plan-O2.bin"
fi

# train { freeze }: errors
sed 's/^train {/train { freeze = "layer.0.*"/' "$EX" >"$TMP/fz1.moe"
expect_fail passes_freeze_no_match "freeze pattern \`layer.0.\*\` matches no parameter" M "$TMP/fz1.moe"
sed 's/^train {/train { freeze = ("embed.*", 3)/' "$EX" >"$TMP/fz2.moe"
expect_fail passes_freeze_not_string "freeze takes parameter name patterns in quotes" M "$TMP/fz2.moe"
sed 's/^train {/train { freeze = ("embed.*", "layers.0.*")/' "$EX" >"$TMP/fz3.moe"
M --dump=ir "$TMP/fz3.moe" >"$TMP/fz3.ir" 2>&1
if grep -q '^param p0 embed.weight value=v[0-9]* init=normal(0.02) decay frozen$' "$TMP/fz3.ir" &&
   ! grep -q 'layers\.0\..*(backward)' "$TMP/fz3.ir" && grep -q 'layers\.1\..*(backward)' "$TMP/fz3.ir"; then
    pass passes_freeze_plan
else
    fail passes_freeze_plan "$(grep -m3 '^param' "$TMP/fz3.ir")"
fi
