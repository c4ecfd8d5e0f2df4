#!/usr/bin/env bash
# ZeRO with precision = bf16 over MPI ranks on the CPU (docs/parallel.md
# "ZeRO with bf16 or fp16", docs/memory.md "Model-state memory per rank"):
# tiny_moe_bf16 (and its fp16 twin) at 2 ranks ZeRO 1, 2, 3 reproduces one
# rank (grad_accum 2) over 10 steps; the pools run allocates at every stage, fp32 and bf16,
# equal moec --explain and the per-stage bytes/param table of docs/memory.md.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
DATA=$ROOT/$B/data/default.txt
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip mpi.zero_bf16 "build moec, run and $DATA first"; exit 0; fi
if ! command -v mpirun >/dev/null; then skip mpi.zero_bf16 "mpirun not found"; exit 0; fi
if [ ! -f "$LIBDIR/libmoec_comm_mpi.so" ]; then skip mpi.zero_bf16 "no $LIBDIR/libmoec_comm_mpi.so"; exit 0; fi
export MOEC_KERNELS=$LIBDIR OMP_NUM_THREADS=1
MPIRUN=(timeout 120 mpirun --oversubscribe)
[ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)
cd "$TMP"
NOPAR='s/^parallel {.*}$//'
mk() {   # NAME SED-EXPR SOURCE
    sed "$NOPAR;$2" "$ROOT/examples/$3" > "$1.moe"
    "$MOEC" --stdlib "$ROOT/stdlib" "$1.moe" -o "$1.bin" || fail "mpi.zero_bf16.compile.$1" "moec failed"
}

# 1. bf16 ZeRO 1, 2, 3 at 2 ranks == 1 rank within 1e-4 relative (bf16
# rounds at 3.9e-3; ZeRO-1 is bit-identical, 2 and 3 sum the widened
# gradients in another fp32 order, 7.6e-6 measured)
# eq_one_rank PREC PREFIX SED: ZeRO 1, 2, 3 at 2 ranks against one rank with
# grad_accum 2, both made from tiny_moe_bf16 edited by SED
eq_one_rank() {
    local prec=$1 p=$2 ed=$3 z out
    mk ${p}one "${ed}s/batch = 8 /batch = 8  grad_accum = 2 /" tiny_moe_bf16.moe
    "$RUN" ${p}one.bin --data "$DATA" --steps 10 --metrics ${p}one.jsonl -q
    for z in 1 2 3; do
        mk ${p}z$z "${ed}\$a parallel { ranks = 2  zero = $z }" tiny_moe_bf16.moe
        "${MPIRUN[@]}" -np 2 "$RUN" ${p}z$z.bin --data "$DATA" --steps 10 --metrics ${p}z$z.jsonl -q \
            --comm-timeout 60 > ${p}z$z.out 2>&1 || fail mpi.zero_$prec.run$z "$(tail -3 ${p}z$z.out)"
        if out=$(/usr/bin/python3 - ${p}one.jsonl ${p}z$z.jsonl <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]; b = [json.loads(l) for l in open(sys.argv[2])]
if len(a) != len(b) or len(a) != 10: print("steps %d vs %d" % (len(a), len(b))); sys.exit(1)
w = max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b) for k in ("loss", "norm"))
print("worst relative difference %.3g over %d steps (loss %.6f -> %.6f)" % (w, len(a), b[0]["loss"], b[-1]["loss"]))
sys.exit(0 if w <= 1e-4 and b[-1]["loss"] < b[0]["loss"] else 1)
PY
        ); then pass mpi.zero_$prec.z${z}_eq_1rank; echo "  ZeRO-$z $prec: $out"
        else fail mpi.zero_$prec.z${z}_eq_1rank "$out"; fi
    done
}
eq_one_rank bf16 "" ""
# the same for fp16 (dynamic loss scaling: every rank sees the summed
# gradient's norm, so all skip or step together)
eq_one_rank fp16 f16 's/precision = bf16/precision = fp16/;'

# the half gradients reach the reduce-scatter as bf16
if "$RUN" --inspect z2.bin | grep -q 'moec_comm_zero_reduce_scatter_half(1, d.layers.0.attn.wq.weight, 4096, layers.0.attn.wq.weight.grad, 2048, 1, 1)'; then
    pass mpi.zero_bf16.reduce_scatter_half_in_plan
else fail mpi.zero_bf16.reduce_scatter_half_in_plan "$("$RUN" --inspect z2.bin | grep -m2 reduce_scatter)"; fi

# a bf16 ZeRO-3 checkpoint (param and master slices) resumes exactly on
# ZeRO-3 and continues on ZeRO-1
"${MPIRUN[@]}" -np 2 "$RUN" z3.bin --data "$DATA" --steps 5 --checkpoint z3.st --metrics r3.jsonl \
    -q --comm-timeout 60 > s.out 2>&1 || fail mpi.zero_bf16.save "$(tail -3 s.out)"
cp r3.jsonl r1.jsonl
for z in 3 1; do
    "${MPIRUN[@]}" -np 2 "$RUN" z$z.bin --data "$DATA" --steps 10 --resume z3.st --metrics r$z.jsonl \
        -q --comm-timeout 60 > r$z.out 2>&1 || fail mpi.zero_bf16.resume$z "$(tail -3 r$z.out)"
done
if out=$(/usr/bin/python3 - z3.jsonl r3.jsonl r1.jsonl <<'PY'
import json, sys
f = [[json.loads(l) for l in open(p)] for p in sys.argv[1:]]
if any(len(x) != 10 for x in f): print("steps %s" % [len(x) for x in f]); sys.exit(1)
w = [max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(f[0], g) for k in ("loss", "norm")) for g in f[1:]]
print("ZeRO-3 bf16 saved at step 5, resumed on ZeRO-3: %.3g, on ZeRO-1: %.3g (worst relative vs unbroken)" % tuple(w))
sys.exit(0 if w[0] == 0 and w[1] <= 1e-4 else 1)
PY
); then pass mpi.zero_bf16.z3_ckpt_resumes; echo "  $out"; else fail mpi.zero_bf16.z3_ckpt_resumes "$out"; fi

# 2. memory: every stage, fp32 and bf16: run's pools == moec --explain ==
# the docs/memory.md table (tiny_moe: every tensor a multiple of 64
# elements, so no slice padding).  fp32 AdamW 16, 8 + 8/N, 4 + 12/N, 16/N;
# bf16 (fp32 gradients) 18, 6 + 12/N, 2 + 16/N, 18/N bytes per param.
for prec in fp32 bf16; do
    src=tiny_moe.moe; [ $prec = bf16 ] && src=tiny_moe_bf16.moe
    for z in 0 1 2 3; do
        mk m_${prec}_$z "\$a parallel { ranks = 2  zero = $z }" $src
        "${MPIRUN[@]}" -np 2 "$RUN" m_${prec}_$z.bin --data "$DATA" --steps 1 --metrics "" \
            > m_${prec}_$z.out 2>&1 || fail mpi.zero_bf16.mem_run "$(tail -3 m_${prec}_$z.out)"
        "$MOEC" --stdlib "$ROOT/stdlib" m_${prec}_$z.moe --explain > m_${prec}_$z.ex
    done
    if out=$(/usr/bin/python3 - $prec <<'PY'
import re, sys
prec, N = sys.argv[1], 2
# bytes per param (param, grad, optstate) per stage: docs/memory.md
table = {"fp32": [(4, 4, 8), (4, 4, 8 / N), (4, 4 / N, 8 / N), (4 / N, 4 / N, 8 / N)],
         "bf16": [(2, 4, 12), (2, 4, 12 / N), (2, 4 / N, 12 / N), (2 / N, 4 / N, 12 / N)]}[prec]
rows, bad = [], []
for z in range(4):
    run = open("m_%s_%d.out" % (prec, z)).read(); ex = open("m_%s_%d.ex" % (prec, z)).read()
    m = re.search(r"run: allocated param (\d+), grad (\d+), optstate (\d+),", run)
    if not m: print("stage %d: no 'run: allocated' line" % z); sys.exit(1)
    got = tuple(map(int, m.groups()))
    pred = tuple(int(re.search(r"^  %s +(\d+)" % k, ex, re.M).group(1)) for k in ("param", "grad", "optstate"))
    psi = int(re.search(r"^  total +(\d+)", ex, re.M).group(1))
    form = tuple(int(b * psi) for b in table[z])
    if got != pred: bad.append("stage %d: run %s, explain %s" % (z, got, pred))
    if got != form: bad.append("stage %d: run %s, table %s" % (z, got, form))
    rows.append("%d: %.2f" % (z, sum(got) / psi))
print("%s, Psi %d, bytes/param per rank by stage  %s" % (prec, psi, ",  ".join(rows)))
print("; ".join(bad)) if bad else None
sys.exit(1 if bad else 0)
PY
    ); then pass mpi.zero_bf16.memory_table_$prec; echo "  $out"; else fail mpi.zero_bf16.memory_table_$prec "$out"; fi
done
