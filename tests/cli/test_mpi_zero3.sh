#!/usr/bin/env bash
# ZeRO stage 3 over MPI ranks on the CPU (docs/parallel.md "ZeRO stage 3"):
# parameters are [S] slices, gathered into activation buffers before their
# first forward and first backward reader.  Checks: the gathers run one
# layer ahead at -O1 and -O2 (the scheduler keeps them pinned); the pools run allocates equal
# moec --explain and the 16 Psi / N formula (fp32 AdamW: 4 + 4 + 8 bytes,
# plus slice padding); a checkpoint written by 4 ranks EP 4 ZeRO-3 gives the
# same logits at 1 rank and at 2 ranks ZeRO-1 and continues the one-rank
# loss curve; a tied weight trains as on one rank.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
DATA=$ROOT/$B/data/default.txt
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip mpi.zero3 "build moec, run and $DATA first"; exit 0; fi
export MOEC_KERNELS=$LIBDIR OMP_NUM_THREADS=1
cd "$TMP"
NOPAR='s/^parallel {.*}$//'
mk() {   # NAME SED-EXPR SOURCE [MOEC-ARGS]
    sed "$NOPAR;$2" "$ROOT/examples/$3" > "$1.moe"
    "$MOEC" --stdlib "$ROOT/stdlib" "$1.moe" -o "$1.bin" $4 || fail "mpi.zero3.compile.$1" "moec failed"
}

# 1. the plan (no MPI needed): in forward and in backward, at -O1 (the
# compiler's order) and at -O2 (the default, after the memory-minded
# scheduler), every gather of prefetch group k+1 (a layer; any other param
# its own group) comes before the first reader of group k's copies; and the
# scheduled order needs no larger act pool than the compiler's
for O in -O1 -O2 ""; do
    n=moe_ep4z3${O:-_default}
    mk $n '$a parallel { ranks = 4  expert = 4  zero = 3 }' tiny_moe.moe "$O"
    "$RUN" --inspect $n.bin > $n.txt 2>&1
    if out=$(/usr/bin/python3 - $n.txt "${O:-default}" <<'PY'
import re, sys
ops = [l for l in open(sys.argv[1]) if re.match(r"\s*\d+ (forward|backward) ", l)]
def key(p):   # the prefetch group: layers.<l>, else the param itself
    m = re.match(r"(layers\.\d+)\.", p)
    return m.group(1) if m else p
bad, lines = [], []
for ph in ("forward", "backward"):
    seq = [l for l in ops if " %s " % ph in l]
    gat, rd = {}, {}   # group -> op positions of its gathers / of its copies' readers
    for i, l in enumerate(seq):
        m = re.search(r"# ZeRO-3 all-gather (\S+) ", l)
        if m:
            gat.setdefault(key(m.group(1)), []).append(i)
            continue
        for p in re.findall(r"([\w.]+)\.gathered(?:_bwd)?\b", l.split("#")[0]):
            rd.setdefault(key(p), []).append(i)
    order = sorted(rd, key=lambda k: rd[k][0])
    for a, b in zip(order, order[1:]):
        if max(gat[b]) >= rd[a][0]:
            bad.append("%s: a gather of %s at op %d, after %s's first reader at op %d" % (ph, b, max(gat[b]), a, rd[a][0]))
    lines.append("%s: %d groups, %d gathers; group 2 (%s) gathered by op %d, group 1 (%s) read from op %d" %
                 (ph, len(order), sum(map(len, gat.values())), order[1], max(gat[order[1]]), order[0], rd[order[0]][0]))
print(sys.argv[2] + ": " + "; ".join(lines + bad))
sys.exit(1 if bad or len(lines) != 2 else 0)
PY
    ); then pass mpi.zero3.gather_one_layer_ahead${O:-_default}; echo "  $out"; else fail mpi.zero3.gather_one_layer_ahead${O:-_default} "$out"; fi
done
pool() { "$MOEC" --stdlib "$ROOT/stdlib" moe_ep4z3_default.moe "$1" --explain | awk '$1 == "memplan" { print $5 }'; }
p1=$(pool -O1) p2=$(pool -O2)
if [ -n "$p1" ] && [ -n "$p2" ] && [ "$p2" -le "$p1" ]; then pass mpi.zero3.O2_act_pool_le_O1; echo "  act pool -O1 $p1, -O2 $p2"
else fail mpi.zero3.O2_act_pool_le_O1 "act pool -O1 '$p1', -O2 '$p2'"; fi

if ! command -v mpirun >/dev/null; then skip mpi.zero3 "mpirun not found"; exit 0; fi
if [ ! -f "$LIBDIR/libmoec_comm_mpi.so" ]; then skip mpi.zero3 "no $LIBDIR/libmoec_comm_mpi.so"; exit 0; fi
MPIRUN=(timeout 120 mpirun --oversubscribe)
[ "$(id -u)" -eq 0 ] && MPIRUN=(timeout 120 mpirun --allow-run-as-root --oversubscribe)

# 2. memory: run's pools == moec --explain == 16 Psi / N (+ slice padding)
mk dense_z3 '$a parallel { ranks = 2  zero = 3 }' tiny_dense.moe
"${MPIRUN[@]}" -np 2 "$RUN" dense_z3.bin --data "$DATA" --steps 1 --metrics "" > dz3.out 2>&1 ||
    fail mpi.zero3.dense_run "$(tail -3 dz3.out)"
"$MOEC" --stdlib "$ROOT/stdlib" dense_z3.moe --explain > ex3.txt
if out=$(/usr/bin/python3 - ex3.txt dz3.out <<'PY'
import re, sys
ex, run = open(sys.argv[1]).read(), open(sys.argv[2]).read()
m = re.search(r"run: allocated param (\d+), grad (\d+), optstate (\d+),", run)
if not m: print("no 'run: allocated' line"); sys.exit(1)
got = dict(zip(("param", "grad", "optstate"), map(int, m.groups())))
pred = {k: int(re.search(r"^  %s +(\d+)" % k, ex, re.M).group(1)) for k in got}
psi = int(re.search(r"^  total +(\d+)", ex, re.M).group(1))
N, ntensors = 2, 64
form = {"param": 4 * psi / N, "grad": 4 * psi / N, "optstate": 8 * psi / N}
bad = [k for k in got if got[k] != pred[k]]
bad += [k + " formula" for k in got if not form[k] <= got[k] <= form[k] + ntensors * (32 * 4 * 2 + 64)]
print("stage 3: run %s, explain %s, formula 16 Psi/N %s (Psi %d)" % (got, pred, {k: int(v) for k, v in form.items()}, psi))
sys.exit(1 if bad else 0)
PY
); then pass mpi.zero3.memory_matches; echo "  $out"; else fail mpi.zero3.memory_matches "$out"; fi

# 3. a tied weight (lm_head reads embed.weight) is gathered for both readers
TIE='s/name = "lm_head")/name = "lm_head", tie = "embed.weight")/'
mk tied_b16 "$TIE;s/batch = 8 /batch = 16 /" tiny_dense.moe
mk tied_z3 "$TIE;\$a parallel { ranks = 2  zero = 3 }" tiny_dense.moe
"$RUN" tied_b16.bin --data "$DATA" --steps 10 --metrics t1.jsonl -q
"${MPIRUN[@]}" -np 2 "$RUN" tied_z3.bin --data "$DATA" --steps 10 --metrics t2.jsonl -q \
    --comm-timeout 60 > t.out 2>&1 || fail mpi.zero3.tied_run "$(tail -3 t.out)"
if out=$(/usr/bin/python3 - t1.jsonl t2.jsonl <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]; b = [json.loads(l) for l in open(sys.argv[2])]
if len(a) != len(b) or not a: print("steps %d vs %d" % (len(a), len(b))); sys.exit(1)
w = max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b) for k in ("loss", "norm"))
print("tied weights, 2 ranks ZeRO-3 vs 1 rank: worst relative %.3g over %d steps" % (w, len(a)))
sys.exit(0 if w <= 1e-5 else 1)
PY
); then pass mpi.zero3.tied_eq_1rank; echo "  $out"; else fail mpi.zero3.tied_eq_1rank "$out"; fi

# 4. layout moves: 4 ranks EP 4 ZeRO-3 -> 1 rank and -> 2 ranks ZeRO-1
mk one_b32 's/batch = 8 /batch = 32 /' tiny_moe.moe
mk one_ga4 's/batch = 8 /batch = 8  grad_accum = 4 /' tiny_moe.moe
mk ep4z3 '$a parallel { ranks = 4  expert = 4  zero = 3 }' tiny_moe.moe
mk z1_b16 's/batch = 8 /batch = 16 /;$a parallel { ranks = 2  zero = 1 }' tiny_moe.moe
"$RUN" one_ga4.bin --data "$DATA" --steps 10 --metrics full.jsonl -q
"${MPIRUN[@]}" -np 4 "$RUN" ep4z3.bin --data "$DATA" --steps 6 --metrics a.jsonl -q \
    --checkpoint z3.st --comm-timeout 60 > a.out 2>&1 || fail mpi.zero3.save "$(tail -3 a.out)"
"$RUN" one_ga4.bin --data "$DATA" --steps 10 --resume z3.st --metrics a.jsonl -q
if out=$(/usr/bin/python3 - full.jsonl a.jsonl <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]; b = [json.loads(l) for l in open(sys.argv[2])]
if len(a) != len(b): print("steps %d vs %d" % (len(a), len(b))); sys.exit(1)
w = max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b) for k in ("loss", "norm"))
print("4 ranks EP 4 ZeRO-3 (6 steps) + 1 rank (4 steps) vs 1 rank: worst relative %.3g over %d steps" % (w, len(a)))
sys.exit(0 if w <= 1e-5 else 1)
PY
); then pass mpi.zero3.ckpt_resumes_on_1rank; echo "  $out"; else fail mpi.zero3.ckpt_resumes_on_1rank "$out"; fi
"$RUN" one_b32.bin --data "$DATA" --resume z3.st --eval-logits one.f32 > one.out 2>&1 ||
    fail mpi.zero3.logits_one "$(tail -3 one.out)"
"${MPIRUN[@]}" -np 4 "$RUN" ep4z3.bin --data "$DATA" --resume z3.st --eval-logits ep4z3.f32 \
    --comm-timeout 60 > e.out 2>&1 || fail mpi.zero3.logits_ep4z3 "$(tail -3 e.out)"
"${MPIRUN[@]}" -np 2 "$RUN" z1_b16.bin --data "$DATA" --resume z3.st --eval-logits z1.f32 \
    --comm-timeout 60 > z.out 2>&1 || fail mpi.zero3.logits_z1 "$(tail -3 z.out)"
"$RUN" one_b32.bin --data "$DATA" --eval-logits init.f32 > init.out 2>&1 ||
    fail mpi.zero3.logits_init "$(tail -3 init.out)"
for x in ep4z3 z1 init; do
    if out=$(/usr/bin/python3 - one.f32 $x.f32 $x <<'PY'
import struct, sys
a = open(sys.argv[1], "rb").read(); b = open(sys.argv[2], "rb").read()
if len(a) != len(b) or not a:
    print("sizes %d, %d" % (len(a), len(b))); sys.exit(1)
n = len(a) // 4
x = struct.unpack("<%df" % n, a); y = struct.unpack("<%df" % n, b)
scale = max(abs(p) for p in x)
worst = max(abs(p - q) for p, q in zip(x, y)) / scale
print("%s vs 1 rank: worst difference %.3g of the largest logit over %d logits" % (sys.argv[3], worst, n))
ok = worst > 1e-2 if sys.argv[3] == "init" else worst <= 1e-6
sys.exit(0 if ok else 1)
PY
    ); then pass mpi.zero3.logits_$x; echo "  $out"; else fail mpi.zero3.logits_$x "$out"; fi
done
