#!/usr/bin/env bash
# ZeRO stages 1 and 2 over MPI ranks on the CPU (stage 3: test_mpi_zero3.sh) (docs/parallel.md "ZeRO"):
# each stage reproduces the 1-rank loss and grad-norm curves, the sharded
# checkpoint resumes on 1 rank and a 1-rank checkpoint resumes sharded, and
# the pools run allocates equal what moec --explain predicts and the
# docs/memory.md formula (plus slice padding).
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
DATA=$ROOT/$B/data/default.txt
if ! command -v mpirun >/dev/null; then skip mpi.zero "mpirun not found (apt install openmpi-bin libopenmpi-dev)"; exit 0; fi
if [ ! -f "$LIBDIR/libmoec_comm_mpi.so" ]; then skip mpi.zero "no $LIBDIR/libmoec_comm_mpi.so (run make; needs mpicc)"; exit 0; fi
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip mpi.zero "build moec, run and $DATA first"; exit 0; fi
export MOEC_KERNELS=$LIBDIR OMP_NUM_THREADS=1
MPIRUN=(timeout 120 mpirun --oversubscribe)
[ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)
cd "$TMP"

NOPAR='s/^parallel {.*}$//'
mk() {   # NAME SED-EXPR SOURCE
    sed "$2" "$ROOT/examples/$3" > "$1.moe"
    "$MOEC" --stdlib "$ROOT/stdlib" "$1.moe" -o "$1.bin" || fail "mpi.zero.compile.$1" "moec failed"
}
mk dense_b16 "$NOPAR;s/batch = 8 /batch = 16 /" tiny_dense.moe
mk moe_ga2 "$NOPAR;s/batch = 8 /batch = 8  grad_accum = 2 /" tiny_moe.moe
"$RUN" dense_b16.bin --data "$DATA" --steps 10 --metrics d1.jsonl -q
"$RUN" moe_ga2.bin --data "$DATA" --steps 10 --metrics m1.jsonl -q

# 1. equivalence: 2 ranks x ZeRO stage == 1 rank with the same global batch
for z in 1 2; do
    mk dense_z$z "$NOPAR;\$a parallel { ranks = 2  zero = $z }" tiny_dense.moe
    mk moe_z$z "$NOPAR;\$a parallel { ranks = 2  expert = 1  zero = $z }" tiny_moe.moe
    "${MPIRUN[@]}" -np 2 "$RUN" dense_z$z.bin --data "$DATA" --steps 10 --metrics dz$z.jsonl \
        > dz$z.out 2>&1 || fail mpi.zero$z.dense_run "$(tail -5 dz$z.out)"
    cmp_metrics mpi.zero$z.dense_eq_1rank d1.jsonl dz$z.jsonl 1e-5 loss norm val_loss
    "${MPIRUN[@]}" -np 2 "$RUN" moe_z$z.bin --data "$DATA" --steps 10 --metrics mz$z.jsonl -q \
        > mz$z.out 2>&1 || fail mpi.zero$z.moe_run "$(tail -5 mz$z.out)"
    cmp_metrics mpi.zero$z.moe_eq_1rank m1.jsonl mz$z.jsonl 1e-5 loss norm layers.0.moe.balance
done

# 2. memory: the pools run allocates == moec --explain's plan == the formula
#    (fp32 AdamW, N = 2: stage 1 optstate 8 Psi / N, stage 2 grads 4 Psi / N)
mk dense_z0 "$NOPAR;\$a parallel { ranks = 2  zero = 0 }" tiny_dense.moe
"${MPIRUN[@]}" -np 2 "$RUN" dense_z0.bin --data "$DATA" --steps 1 --metrics "" > dz0.out 2>&1
for z in 0 1 2; do
    "$MOEC" --stdlib "$ROOT/stdlib" dense_z$z.moe --explain > ex$z.txt
    if out=$(/usr/bin/python3 - ex$z.txt dz$z.out $z <<'PY'
import re, sys
ex, run, z = open(sys.argv[1]).read(), open(sys.argv[2]).read(), int(sys.argv[3])
m = re.search(r"run: allocated param (\d+), grad (\d+), optstate (\d+),", run)
if not m: print("no 'run: allocated' line"); sys.exit(1)
got = dict(zip(("param", "grad", "optstate"), map(int, m.groups())))
pred = {k: int(re.search(r"^  %s +(\d+)" % k, ex, re.M).group(1)) for k in got}
psi = int(re.search(r"^  total +(\d+)", ex, re.M).group(1))
ntensors = 64   # bound on trainable tensors: each slice pads < 32 floats + 64-byte alignment
N = 2
form = {"param": 4 * psi, "grad": 4 * psi / (N if z >= 2 else 1),
        "optstate": 8 * psi / (N if z >= 1 else 1)}
bad = [k for k in got if got[k] != pred[k]]
bad += [k + " formula" for k in got if not form[k] <= got[k] <= form[k] + ntensors * (32 * 4 * 2 + 64)]
print("stage %d: run %s, explain %s, formula %s" % (z, got, pred, {k: int(v) for k, v in form.items()}))
sys.exit(1 if bad else 0)
PY
    ); then pass mpi.zero$z.memory_matches; echo "  $out"; else fail mpi.zero$z.memory_matches "$out"; fi
done

# 3. checkpoints are layout-independent: ZeRO-2 on 2 ranks -> 1 rank, and back
"$RUN" dense_b16.bin --data "$DATA" --steps 12 --metrics full.jsonl -q
"${MPIRUN[@]}" -np 2 "$RUN" dense_z2.bin --data "$DATA" --steps 8 --metrics a.jsonl -q \
    --checkpoint z2.st > a.out 2>&1 || fail mpi.zero.ckpt_save "$(tail -5 a.out)"
"$RUN" dense_b16.bin --data "$DATA" --steps 12 --resume z2.st --metrics a.jsonl -q
cmp_metrics mpi.zero2_ckpt_resumes_on_1rank full.jsonl a.jsonl 1e-5 loss norm
"$RUN" dense_b16.bin --data "$DATA" --steps 8 --metrics b.jsonl -q --checkpoint one.st
"${MPIRUN[@]}" -np 2 "$RUN" dense_z1.bin --data "$DATA" --steps 12 --resume one.st \
    --metrics b.jsonl -q > b.out 2>&1 || fail mpi.zero.ckpt_load "$(tail -5 b.out)"
cmp_metrics mpi.zero1_resumes_1rank_ckpt full.jsonl b.jsonl 1e-5 loss norm

# 4. ZeRO with expert parallelism: expert tensors are ZeRO slices of this
#    rank's experts (over the expert-DP group); the file is still the
#    one-rank file.  4 ranks EP 2 ZeRO-2 -> 1 rank, 1 rank -> 4 ranks EP 2 ZeRO-1
mk moe_ga4 "$NOPAR;s/batch = 8 /batch = 8  grad_accum = 4 /" tiny_moe.moe
mk moe_ep2z2 "$NOPAR;\$a parallel { ranks = 4  expert = 2  zero = 2 }" tiny_moe.moe
mk moe_ep2z1 "$NOPAR;\$a parallel { ranks = 4  expert = 2  zero = 1 }" tiny_moe.moe
"$RUN" moe_ga4.bin --data "$DATA" --steps 12 --metrics mfull.jsonl -q
"${MPIRUN[@]}" -np 4 "$RUN" moe_ep2z2.bin --data "$DATA" --steps 8 --metrics c.jsonl -q \
    --checkpoint ep2z2.st > c.out 2>&1 || fail mpi.zero.ep_ckpt_save "$(tail -5 c.out)"
"$RUN" moe_ga4.bin --data "$DATA" --steps 12 --resume ep2z2.st --metrics c.jsonl -q
cmp_metrics mpi.zero2_ep2_ckpt_resumes_on_1rank mfull.jsonl c.jsonl 1e-5 loss norm layers.0.moe.balance
"$RUN" moe_ga4.bin --data "$DATA" --steps 8 --metrics d.jsonl -q --checkpoint moe1.st
"${MPIRUN[@]}" -np 4 "$RUN" moe_ep2z1.bin --data "$DATA" --steps 12 --resume moe1.st \
    --metrics d.jsonl -q > d.out 2>&1 || fail mpi.zero.ep_ckpt_load "$(tail -5 d.out)"
cmp_metrics mpi.zero1_ep2_resumes_1rank_ckpt mfull.jsonl d.jsonl 1e-5 loss norm layers.0.moe.balance
