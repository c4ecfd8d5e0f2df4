#!/usr/bin/env bash
# Collectives issued early and the predicted overlap (docs/parallel.md,
# "Overlap"; docs/passes.md, "schedule"): where the gradient all-reduces go
# at grad_accum 1 and 2, the --explain overlap table at -O0 and -O2 on two
# ranks (plain, ZeRO-2), and the act pool of every example at -O2 no larger
# than at -O0.
source "$(dirname "$0")/../lib.sh"
if [ ! -x "$MOEC" ]; then skip overlap "build moec first"; exit 0; fi
cd "$TMP"

mk() {   # NAME SED-EXPR: a variant of tiny_moe
    sed "$2" "$ROOT/examples/tiny_moe.moe" > "$1.moe"
}
mk r2 's/^parallel {.*}$/parallel { ranks = 2 }/'
mk ga2 's/^parallel {.*}$/parallel { ranks = 2 }/;s/batch = 8 /batch = 8  grad_accum = 2 /'
mk z2 's/^parallel {.*}$/parallel { ranks = 2  zero = 2 }/'
moec() { "$MOEC" --stdlib "$ROOT/stdlib" "$@"; }

# the row of one kind in the overlap table: ops bytes window_mflop comm_us hidden_us
row() {   # FILE KIND
    awk -v k="$2" 'index($0, "  " k " ") == 1 { n = split($0, f, " "); print f[n-5], f[n-4], f[n-3], f[n-2], f[n-1] }' "$1"
}
gt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a > b) }'; }

# 1. where the all-reduces go: in backward with one micro-step, ahead of
# backward compute at -O2; in the optimizer phase with grad_accum = 2
moec -O2 --dump=ir r2.moe > r2.ir && moec -O2 --dump=ir ga2.moe > ga2.ir
first=$(grep -n '^node .* "all-reduce gradients' r2.ir | head -1 | cut -d: -f1)
lastb=$(grep -n '^node n[0-9]* backward' r2.ir | grep -v 'from @comm' | tail -1 | cut -d: -f1)
if grep '^node .* "all-reduce gradients' r2.ir | head -1 | grep -q '^node n[0-9]* backward' &&
   [ -n "$first" ] && [ -n "$lastb" ] && [ "$first" -lt "$lastb" ]; then
    pass overlap.allreduce_in_backward; echo "  first all-reduce at line $first, last backward compute at line $lastb"
else fail overlap.allreduce_in_backward "first all-reduce line '$first', last backward op line '$lastb'"; fi
nb=$(grep -c '^node n[0-9]* backward .*"all-reduce gradients' ga2.ir)
no=$(grep -c '^node n[0-9]* optimizer .*"all-reduce gradients' ga2.ir)
if [ "$nb" -eq 0 ] && [ "$no" -eq 3 ]; then pass overlap.accum2_stays_in_optimizer
else fail overlap.accum2_stays_in_optimizer "$nb in backward, $no in the optimizer phase"; fi
# buckets in the order gradients become final: the last layer's first
b0=$(grep '^node .* "all-reduce gradients, bucket 0' r2.ir | grep -o 'bucket=0, [0-9]*, v[0-9]*' | grep -o 'v[0-9]*$')
name=$(grep "^value $b0 " r2.ir | awk '{print $3}')
if [ -n "$b0" ] && [ "$name" = lm_head.weight.grad ]; then pass overlap.bucket0_is_last_layer
else fail overlap.bucket0_is_last_layer "bucket 0 starts with '$name' ($b0)"; fi

# 2. the overlap table, -O0 vs -O2 (the schedule pass runs at -O2)
moec -O0 --explain r2.moe > r2.O0 && moec -O2 --explain r2.moe > r2.O2
read -r o0 b0 w0 c0 h0 <<< "$(row r2.O0 'gradient all-reduce')"
read -r o2 b2 w2 c2 h2 <<< "$(row r2.O2 'gradient all-reduce')"
echo "  tiny_moe, 2 ranks, gradient all-reduce: -O0 ops $o0 bytes $b0 window $w0 MFLOP hidden $h0 of $c0 us; -O2 window $w2 MFLOP hidden $h2 of $c2 us"
# 262976 fp32 gradients in 3 buckets of at most 8 tensors
if [ "$o0" = 3 ] && [ "$o2" = 3 ] && [ "$b0" = 1051904 ] && [ "$b2" = 1051904 ] && [ "$c0" = "$c2" ] &&
   gt "$c0" 0; then pass overlap.explain_counts
else fail overlap.explain_counts "ops $o0/$o2 bytes $b0/$b2 comm $c0/$c2"; fi
if gt "$w2" "$w0" && gt "$h2" "$h0" && gt 0.01 "$h0"; then pass overlap.O2_hides_more_than_O0
else fail overlap.O2_hides_more_than_O0 "window $w0 -> $w2 MFLOP, hidden $h0 -> $h2 us"; fi
if grep -q 'gradient all-reduces run in backward, each bucket after its last gradient is final (grad_accum = 1)' r2.O2 &&
   grep -q 'assumes compute at 50 TFLOP/s .* own stream at 25 GB/s' r2.O2; then pass overlap.explain_says_where_and_assumptions
else fail overlap.explain_says_where_and_assumptions "$(sed -n '/communication overlap/,/backend with/p' r2.O2)"; fi
moec -O2 --explain ga2.moe > ga2.O2
if grep -q 'gradient all-reduces run at the start of the optimizer phase: with grad_accum = 2 the micro-steps' ga2.O2; then
    pass overlap.explain_says_accum2; else fail overlap.explain_says_accum2 "$(grep -A1 'gradient all-reduce ' ga2.O2)"; fi
moec -O2 --explain "$ROOT/examples/tiny_moe.moe" > r1.O2
if grep -q 'communication overlap' r1.O2; then fail overlap.none_on_one_rank "a one-rank plan has an overlap table"
else pass overlap.none_on_one_rank; fi

# ZeRO-2: the reduce-scatters of each micro-step also move up
moec -O0 --explain z2.moe > z2.O0 && moec -O2 --explain z2.moe > z2.O2
read -r zo0 zb0 zw0 zc0 zh0 <<< "$(row z2.O0 'reduce-scatter')"
read -r zo2 zb2 zw2 zc2 zh2 <<< "$(row z2.O2 'reduce-scatter')"
echo "  tiny_moe, 2 ranks, ZeRO-2 reduce-scatter: ops $zo0, window $zw0 -> $zw2 MFLOP, hidden $zh0 -> $zh2 of $zc0 us"
if [ "$zo0" = 23 ] && [ "$zo2" = 23 ] && [ "$zb0" = 1051904 ] && gt "$zw2" "$zw0" && gt "$zh2" "$zh0"; then
    pass overlap.zero2_reduce_scatter_earlier
else fail overlap.zero2_reduce_scatter_earlier "ops $zo0/$zo2 bytes $zb0 window $zw0 -> $zw2 hidden $zh0 -> $zh2"; fi

# 3. no example needs a larger act pool at -O2 than at -O0
for f in "$ROOT"/examples/*.moe; do
    ex=$(basename "$f" .moe)
    p0=$(moec -O0 --explain "$f" | awk '$1 == "memplan" { print $5 }')
    p2=$(moec -O2 --explain "$f" | awk '$1 == "memplan" { print $5 }')
    if [ -n "$p0" ] && [ -n "$p2" ] && [ "$p2" -le "$p0" ]; then
        pass "overlap.act_pool_O2_le_O0.$ex"; echo "  $ex: act pool -O0 $p0, -O2 $p2"
    else fail "overlap.act_pool_O2_le_O0.$ex" "act pool -O0 '$p0', -O2 '$p2'"; fi
done
