#!/usr/bin/env bash
# Data parallelism over MPI ranks on the CPU (docs/parallel.md): 2 ranks
# train exactly what 1 rank trains with the whole global batch, a 2-rank
# checkpoint resumes on 1 rank, a plan for 2 ranks refuses 3, and a stuck
# rank ends the job within --comm-timeout naming itself and the collective.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
DATA=$ROOT/$B/data/default.txt
if ! command -v mpirun >/dev/null; then skip mpi.dp "mpirun not found (apt install openmpi-bin libopenmpi-dev)"; exit 0; fi
if [ ! -f "$LIBDIR/libmoec_comm_mpi.so" ]; then skip mpi.dp "no $LIBDIR/libmoec_comm_mpi.so (run make; needs mpicc)"; exit 0; fi
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip mpi.dp "build moec, run and $DATA first"; exit 0; fi
export MOEC_KERNELS=$LIBDIR OMP_NUM_THREADS=1
MPIRUN=(mpirun --oversubscribe)
[ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)
cd "$TMP"

# compare two metrics files: every key given, relative tolerance, same steps

mk() {   # NAME SED-EXPR SOURCE: compile a variant of an example
    sed "$2" "$ROOT/examples/$3" > "$1.moe"
    "$MOEC" --stdlib "$ROOT/stdlib" "$1.moe" -o "$1.bin" || fail "mpi.compile.$1" "moec failed"
}
NOPAR='s/^parallel {.*}$//'
mk dense_r2 "$NOPAR;\$a parallel { ranks = 2 }" tiny_dense.moe
mk dense_b16 "$NOPAR;s/batch = 8 /batch = 16 /" tiny_dense.moe
mk moe_r2 "$NOPAR;\$a parallel { ranks = 2 }" tiny_moe.moe
mk moe_ga2 "$NOPAR;s/batch = 8 /batch = 8  grad_accum = 2 /" tiny_moe.moe

# 1. dense: 2 ranks x batch 8 == 1 rank x batch 16 (loss, norm, val loss)
"$RUN" dense_b16.bin --data "$DATA" --steps 12 --metrics d1.jsonl -q --checkpoint d1.st
"${MPIRUN[@]}" -np 2 "$RUN" dense_r2.bin --data "$DATA" --steps 12 --metrics d2.jsonl -q \
    --checkpoint d2.st >/dev/null 2>d2.err || fail mpi.dense_run "$(tail -5 d2.err)"
cmp_metrics mpi.dense_2ranks_eq_batch16 d1.jsonl d2.jsonl 1e-5 loss norm val_loss

# 2. MoE: 2 ranks == 1 rank with grad_accum 2 (the balance loss is a
# per-micro-batch statistic, so this is the exact twin), and close to batch 16
"$RUN" moe_ga2.bin --data "$DATA" --steps 10 --metrics m1.jsonl -q --checkpoint m1.st
"${MPIRUN[@]}" -np 2 "$RUN" moe_r2.bin --data "$DATA" --steps 10 --metrics m2.jsonl -q \
    --checkpoint m2.st >/dev/null 2>m2.err || fail mpi.moe_run "$(tail -5 m2.err)"
cmp_metrics mpi.moe_2ranks_eq_accum2 m1.jsonl m2.jsonl 1e-6 loss norm layers.0.moe.balance layers.1.moe.balance

# 3. a 2-rank checkpoint resumes on 1 rank (batch 16) and continues the same curve
"${MPIRUN[@]}" -np 2 "$RUN" dense_r2.bin --data "$DATA" --steps 10 --metrics r2.jsonl -q \
    --checkpoint r2.st >/dev/null 2>&1
cp r2.jsonl r1.jsonl
"$RUN" dense_b16.bin --data "$DATA" --steps 12 --resume r2.st --metrics r1.jsonl -q --checkpoint r1.st
cmp_metrics mpi.ckpt_2ranks_resumes_on_1 d2.jsonl r1.jsonl 1e-5 loss norm

# 4. layout errors
expect_fail mpi.plan2_on_3 'compiled for 2 ranks .* but 3 were started' \
    timeout 60 "${MPIRUN[@]}" -np 3 "$RUN" dense_r2.bin --data "$DATA" --steps 1 -q
expect_fail mpi.plan2_single 'compiled for 2 ranks .*single process; start it with mpirun -np 2' \
    "$RUN" dense_r2.bin --data "$DATA" --steps 1 -q
expect_fail mpi.plan1_on_2 'compiled for 1 rank .* but 2 were started' \
    timeout 60 "${MPIRUN[@]}" -np 2 "$RUN" dense_b16.bin --data "$DATA" --steps 1 -q
expect_fail mpi.unknown_backend "unknown communication backend 'tcp'" \
    "$RUN" dense_b16.bin --data "$DATA" --steps 1 -q --comm tcp

# 5. groups in --inspect and --explain
out=$("$RUN" --inspect dense_r2.bin)
if echo "$out" | grep -q '^parallel: ranks 2, expert 1, zero 0; process groups:$' &&
   echo "$out" | grep -Eq '^  dp +\{0,1\}$' && echo "$out" | grep -Eq '^  ep +\{0\} \{1\}$' &&
   echo "$out" | grep -Eq 'backward +moec_comm_allreduce_f32_multi\(1, 0, 8, lm_head.weight.grad, 16384'; then
    pass mpi.inspect_groups; else fail mpi.inspect_groups "$(echo "$out" | grep -A4 '^parallel')"; fi

# 6. a stuck rank: every rank exits within the deadline, naming rank 1 and the collective
# (the third collective: bucket 0 is two in-place runs, flat weights and flat norms)
t0=$(date +%s)
out=$(MOEC_TEST_STALL_RANK=1 timeout 120 "${MPIRUN[@]}" -x MOEC_TEST_STALL_RANK -np 2 "$RUN" \
      dense_r2.bin --data "$DATA" --steps 5 -q --metrics "" --comm-timeout 3 2>&1); rc=$?
dt=$(( $(date +%s) - t0 ))
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $dt -lt 60 ] &&
   echo "$out" | grep -q 'rank 0: collective #3 (all-reduce of gradient bucket 1, group dp) timed out after 3 s waiting for rank 1'; then
    pass mpi.stalled_rank_times_out; echo "  mpi.stalled_rank_times_out: exit $rc after ${dt}s"
else fail mpi.stalled_rank_times_out "exit $rc after ${dt}s: $(echo "$out" | head -5)"; fi

# 7. a killed rank: the job ends (mpirun names the rank), nothing hangs
MOEC_TEST_STALL_RANK=1 timeout 120 "${MPIRUN[@]}" -x MOEC_TEST_STALL_RANK -np 2 "$RUN" \
    dense_r2.bin --data "$DATA" --steps 5 -q --metrics "" --comm-timeout 60 >kill.out 2>&1 &
mp=$!
victim=""
for _ in $(seq 1 100); do
    for p in $(pgrep -P "$mp" 2>/dev/null) $(pgrep -f "dense_r2.bin --data" 2>/dev/null); do
        [ -r "/proc/$p/environ" ] || continue
        if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1' &&
           [ "$(readlink "/proc/$p/cwd")" = "$(readlink -f "$TMP")" ]; then victim=$p; break 2; fi
    done
    sleep 0.1
done
if [ -n "$victim" ]; then
    sleep 1; kill -9 "$victim"
    t0=$(date +%s); wait "$mp"; rc=$?; dt=$(( $(date +%s) - t0 ))
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $dt -lt 30 ] && grep -Eqi 'rank 1|process rank 1' kill.out; then
        pass mpi.killed_rank_ends_job; echo "  mpi.killed_rank_ends_job: exit $rc ${dt}s after the kill"
    else fail mpi.killed_rank_ends_job "exit $rc after ${dt}s: $(head -5 kill.out)"; fi
else
    kill "$mp" 2>/dev/null; wait "$mp" 2>/dev/null
    skip mpi.killed_rank_ends_job "could not find rank 1's process"
fi
