#!/usr/bin/env bash
# The layout matrix over MPI ranks on the CPU (docs/parallel.md "Equivalence
# matrix"): for the Mixtral-style and the DeepSeek-style examples, every
# valid combination of ranks R in {2, 4}, expert-parallel size P in {1, 2, 4}
# (P divides R) and ZeRO stage Z in {0, 1, 2, 3} trains what one rank trains
# with the same global batch (Mixtral: batch B and grad_accum R, since its
# balance loss is a per-micro-batch statistic; DeepSeek: batch R*B, since
# its router bias moves once a step from the load of all R*B rows).  Loss and grad norm match at every one of STEPS
# steps within 1e-5 relative.  ZeRO with P > 1 slices the expert tensors
# over their expert-DP group (R/P ranks, 1 when P = R).
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
DATA=$ROOT/$B/data/default.txt
STEPS=${MOEC_MATRIX_STEPS:-20}
if ! command -v mpirun >/dev/null; then skip mpi.matrix "mpirun not found (apt install openmpi-bin libopenmpi-dev)"; exit 0; fi
if [ ! -f "$LIBDIR/libmoec_comm_mpi.so" ]; then skip mpi.matrix "no $LIBDIR/libmoec_comm_mpi.so (run make; needs mpicc)"; exit 0; fi
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip mpi.matrix "build moec, run and $DATA first"; exit 0; fi
export MOEC_KERNELS=$LIBDIR OMP_NUM_THREADS=1
MPIRUN=(timeout 120 mpirun --oversubscribe)
[ "$(id -u)" -eq 0 ] && MPIRUN=(timeout 120 mpirun --allow-run-as-root --oversubscribe)
cd "$TMP"

NOPAR='s/^parallel {.*}$//'
for ex in mixtral_like deepseek_like; do
    # the per-rank batch stays the example's (4).  Mixtral: the reference
    # accumulates R micro-batches of 4 (its balance loss is per micro-batch).
    # DeepSeek: its router bias moves once per step from the expert load,
    # which the ranks sum (compiler/parallel.c), so its reference is one
    # batch of 4R (its balance loss is per sequence: batch-independent).
    for r in 1 2 4; do
        if [ $ex = mixtral_like ]; then ref="batch = 4  grad_accum = $r "; else ref="batch = $((4 * r)) "; fi
        sed "$NOPAR;s/batch = 4 /$ref/" "$ROOT/examples/$ex.moe" > ref_${ex}_$r.moe
        "$MOEC" --stdlib "$ROOT/stdlib" ref_${ex}_$r.moe -o ref_${ex}_$r.bin ||
            fail mpi.matrix.compile.ref_${ex}_$r "moec failed"
        "$RUN" ref_${ex}_$r.bin --data "$DATA" --steps "$STEPS" --metrics ref_${ex}_$r.jsonl -q ||
            fail mpi.matrix.ref_${ex}_$r "run failed"
    done
    for r in 2 4; do
        for p in 1 2 4; do
            [ $p -le $r ] || continue
            for z in 0 1 2 3; do
                name=${ex}.r$r.ep$p.z$z
                sed "$NOPAR;\$a parallel { ranks = $r  expert = $p  zero = $z }" \
                    "$ROOT/examples/$ex.moe" > $name.moe
                "$MOEC" --stdlib "$ROOT/stdlib" $name.moe -o $name.bin ||
                    { fail mpi.matrix.$name "moec failed"; continue; }
                if "${MPIRUN[@]}" -np $r "$RUN" $name.bin --data "$DATA" --steps "$STEPS" \
                        --metrics $name.jsonl -q --comm-timeout 60 > $name.out 2>&1; then
                    cmp_metrics mpi.matrix.$name ref_${ex}_$r.jsonl $name.jsonl 1e-5 loss norm
                else
                    fail mpi.matrix.$name "mpirun failed: $(tail -3 $name.out)"
                fi
            done
        done
    done
done
