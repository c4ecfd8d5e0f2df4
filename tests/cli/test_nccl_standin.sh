#!/usr/bin/env bash
# The NCCL backend without a GPU: libmoec_comm_nccl.so as built, loaded next
# to stand-ins for the CUDA runtime and NCCL (tests/standin/: host memory,
# a worker thread per stream, collectives between processes over a shared
# file) and a libmoek_cuda.so stand-in that runs the CPU kernels on
# "device" memory.  So `run --device cuda --comm nccl` takes the GPU paths
# of the runtime (device-buffer ZeRO and expert all-to-all, comm.c "direct")
# and all of the backend's own code: TCP rendezvous and MPI bootstrap,
# communicator splits, grouped calls, host staging, stream/event ordering,
# the watchdog.  What it cannot show is real NCCL on real GPUs
# (tests/cli/test_nccl.sh does, where there are GPUs).
#  1. one rank equals --device cpu --comm single bit for bit;
#  2. the layout matrix of tests/cli/test_mpi_matrix.sh (ranks 2, 4 x expert
#     1, 2, 4 x ZeRO 0-3, every valid cell) for the Mixtral- and
#     DeepSeek-style examples: loss and grad norm within 1e-5 of one rank at
#     every step; 2-rank cells launched through the TCP rendezvous, 4-rank
#     cells through mpirun (the MPI bootstrap) where it exists;
#  3. bf16 with ZeRO 2 and fp16 with ZeRO 3 equal the MPI backend on CPU
#     ranks (same plan) within 1e-6;
#  4. a stuck rank and a killed rank: the other ranks exit non-zero within
#     the timeout, naming the collective that timed out.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
NCCL_LIB=$LIBDIR/libmoec_comm_nccl.so
DATA=$ROOT/$B/data/default.txt
STEPS=${MOEC_MATRIX_STEPS:-20}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -f "$NCCL_LIB" ]; then skip nccl_standin "no $NCCL_LIB (built by make when nvcc and nccl.h exist)"; exit 0; fi
if [ ! -f "$LIBDIR/libmoek_cpu.so" ] || [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then
    skip nccl_standin "build moec, run, libmoek_cpu.so and $DATA first"; exit 0
fi
export OMP_NUM_THREADS=1
cd "$TMP"

# ---- the stand-ins, named as libmoec_comm_nccl.so needs them ----------------
SD=$TMP/standin
if standin_libs "$SD" "$NCCL_LIB" &&
   "${CC:-cc}" -std=c11 -D_GNU_SOURCE -O1 -Wall -Wextra -Werror -fPIC -shared -I"$CUDA_HOME/include" \
        -DSTANDIN_CUDART -o "$SD/libmoek_cuda.so" "$ROOT/tests/standin/moek_cuda.c" -L"$SD" -Wl,--no-as-needed \
        -l:"$CUDART" -L"$LIBDIR" -lmoek_cpu -Wl,-rpath,"$SD:$LIBDIR" -ldl 2>> "$SD/cc.log"; then
    pass nccl_standin.build
else
    fail nccl_standin.build "$(head -5 "$SD/cc.log")"; exit 0
fi
ln -s "$NCCL_LIB" "$SD/libmoec_comm_nccl.so"
# the backend must resolve its libraries to the stand-ins, not a real CUDA
if LD_LIBRARY_PATH=$SD ldd "$SD/libmoec_comm_nccl.so" | grep -E "$CUDART|$NCCLSO" | grep -qv "$SD/"; then
    fail nccl_standin.resolves "$(LD_LIBRARY_PATH=$SD ldd "$SD/libmoec_comm_nccl.so" | grep -E 'cudart|nccl')"; exit 0
fi
SIN=(env -u OMPI_COMM_WORLD_SIZE -u PMI_SIZE -u PMIX_RANK -u MPI_LOCALNRANKS
     LD_LIBRARY_PATH="$SD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" MOEC_KERNELS="$SD" STANDIN_NCCL_DIR="$TMP"
     STANDIN_NCCL_HANG_S=120)

losses() { sed -E 's/^\{"step":([0-9]+),"loss":([^,]+),"lr":[^,]+,"norm":([^,]+),.*/\1 \2 \3/' "$1"; }

# launch NAME R ARGS...: R ranks of run through the TCP rendezvous, each
# writing NAME_<rank>.jsonl / .err; returns non-zero if any rank failed
launch() {
    local name=$1 r=$2; shift 2
    local port=$((20000 + RANDOM % 30000)) pids=() k rc=0
    for ((k = r - 1; k >= 0; k--)); do
        "${SIN[@]}" RANK=$k WORLD_SIZE=$r LOCAL_RANK=$k MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
            MOEC_JOB_TOKEN=standin$$ timeout 300 "$RUN" "$@" --device cuda --comm nccl --no-graph -q \
            --comm-timeout 60 --metrics ${name}_$k.jsonl --checkpoint "" > ${name}_$k.err 2>&1 &
        pids+=($!)
    done
    for k in "${pids[@]}"; do wait "$k" || rc=1; done
    return $rc
}

# ---- 1. one rank: the device path equals the CPU ---------------------------
"$MOEC" --stdlib "$ROOT/stdlib" "$ROOT/examples/tiny_moe.moe" -o tm.bin > moec.log 2>&1 ||
    { fail nccl_standin.compile "$(tail -3 moec.log)"; exit 0; }
MOEC_KERNELS=$LIBDIR "$RUN" tm.bin --data "$DATA" --steps 6 -q --device cpu --comm single \
    --metrics cpu1.jsonl --checkpoint "" > cpu1.err 2>&1 || fail nccl_standin.cpu_ref "$(tail -3 cpu1.err)"
if "${SIN[@]}" "$RUN" tm.bin --data "$DATA" --steps 6 -q --device cuda --comm nccl --no-graph \
        --metrics n1.jsonl --checkpoint "" > n1.err 2>&1; then
    if [ -s cpu1.jsonl ] && [ "$(losses cpu1.jsonl)" = "$(losses n1.jsonl)" ]; then
        pass nccl_standin.one_rank_eq_cpu
    else
        fail nccl_standin.one_rank_eq_cpu "$(diff <(losses cpu1.jsonl) <(losses n1.jsonl) | head -4)"
    fi
else
    fail nccl_standin.one_rank_eq_cpu "$(tail -3 n1.err)"
fi

# ---- 2. the layout matrix ------------------------------------------------------
MPIRUN=()
if command -v mpirun > /dev/null; then
    MPIRUN=(timeout 300 mpirun --oversubscribe)
    [ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)
fi
NOPAR='s/^parallel {.*}$//'
for ex in mixtral_like deepseek_like; do
    for r in 2 4; do   # the references of test_mpi_matrix.sh (see there why they differ)
        if [ $ex = mixtral_like ]; then ref="batch = 4  grad_accum = $r "; else ref="batch = $((4 * r)) "; fi
        sed "$NOPAR;s/batch = 4 /$ref/" "$ROOT/examples/$ex.moe" > ref_${ex}_$r.moe
        "$MOEC" --stdlib "$ROOT/stdlib" ref_${ex}_$r.moe -o ref_${ex}_$r.bin > /dev/null 2>&1 &&
            MOEC_KERNELS=$LIBDIR "$RUN" ref_${ex}_$r.bin --data "$DATA" --steps "$STEPS" \
                --metrics ref_${ex}_$r.jsonl --checkpoint "" -q > /dev/null 2>&1 ||
            fail nccl_standin.ref_${ex}_$r "the one-rank reference failed"
    done
    for cell in {2.1,2.2,4.1,4.2,4.4}.{0,1,2,3}; do
        IFS=. read -r r p z <<< "$cell"
        name=${ex}.r$r.ep$p.z$z
        sed "$NOPAR;\$a parallel { ranks = $r  expert = $p  zero = $z }" "$ROOT/examples/$ex.moe" > $name.moe
        "$MOEC" --stdlib "$ROOT/stdlib" $name.moe -o $name.bin > /dev/null 2>&1 ||
            { fail nccl_standin.$name "moec failed"; continue; }
        if [ "$r" -eq 4 ] && [ ${#MPIRUN[@]} -gt 0 ]; then   # the MPI bootstrap (MPI_Bcast of the id)
            how=mpirun
            "${MPIRUN[@]}" -np $r -x LD_LIBRARY_PATH="$SD" -x MOEC_KERNELS="$SD" -x STANDIN_NCCL_DIR="$TMP" \
                -x OMP_NUM_THREADS=1 "$RUN" $name.bin --data "$DATA" --steps "$STEPS" --device cuda \
                --comm nccl --no-graph -q --comm-timeout 60 --metrics ${name}_0.jsonl --checkpoint "" \
                > ${name}_0.err 2>&1
        else
            how=tcp
            launch $name $r $name.bin --data "$DATA" --steps "$STEPS"
        fi
        if [ $? -eq 0 ]; then
            cmp_metrics nccl_standin.$how.$name ref_${ex}_$r.jsonl ${name}_0.jsonl 1e-5 loss norm
        else
            fail nccl_standin.$how.$name "a rank failed: $(tail -q -n 3 ${name}_*.err | head -6)"
        fi
    done
done

# ---- 3. half precision with ZeRO: the NCCL device path equals MPI on the host --
if [ ${#MPIRUN[@]} -gt 0 ] && [ -f "$LIBDIR/libmoec_comm_mpi.so" ]; then
    for cfg in bf16.2 fp16.3; do
        IFS=. read -r prec z <<< "$cfg"
        name=half_${prec}_z$z
        sed "$NOPAR;s/precision = bf16/precision = $prec/;\$a parallel { ranks = 2  expert = 2  zero = $z }" \
            "$ROOT/examples/tiny_moe_bf16.moe" > $name.moe
        "$MOEC" --stdlib "$ROOT/stdlib" $name.moe -o $name.bin > $name.moec 2>&1 ||
            { fail nccl_standin.$name "moec failed: $(tail -2 $name.moec)"; continue; }
        MOEC_KERNELS=$LIBDIR "${MPIRUN[@]}" -np 2 -x OMP_NUM_THREADS=1 "$RUN" $name.bin --data "$DATA" \
            --steps 10 -q --comm mpi --metrics ${name}_mpi.jsonl --checkpoint "" > ${name}_mpi.err 2>&1 ||
            { fail nccl_standin.$name "the MPI run failed: $(tail -3 ${name}_mpi.err)"; continue; }
        if launch $name 2 $name.bin --data "$DATA" --steps 10; then
            cmp_metrics nccl_standin.$name ${name}_mpi.jsonl ${name}_0.jsonl 1e-6 loss norm
        else
            fail nccl_standin.$name "a rank failed: $(tail -q -n 3 ${name}_*.err | head -6)"
        fi
    done
else
    skip nccl_standin.half "no mpirun or libmoec_comm_mpi.so for the host reference"
fi

# ---- 4. a stuck rank, a killed rank: the others end, naming the collective ----
sed "$NOPAR;\$a parallel { ranks = 2 }" "$ROOT/examples/tiny_dense.moe" > td_r2.moe
"$MOEC" --stdlib "$ROOT/stdlib" td_r2.moe -o td_r2.bin > /dev/null 2>&1
TIMEOUT_RE='^run: rank 0: collective #[0-9]+ \([^)]+, group [a-z_]+\) timed out after 3 s: a rank of the group is stuck or dead'
dead_peer() {   # NAME HOW: rank 1 stalls (MOEC_TEST_STALL_RANK) or is killed
    local name=$1 how=$2 port=$((20000 + RANDOM % 30000)) t0 t1 rc
    local L=(RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port MOEC_JOB_TOKEN=dead$$)
    local extra=()
    [ "$how" = stall ] && extra=(MOEC_TEST_STALL_RANK=1 MOEC_TEST_STALL_AT=5)
    "${SIN[@]}" "${L[@]}" RANK=1 LOCAL_RANK=1 "${extra[@]}" timeout 120 "$RUN" td_r2.bin --data "$DATA" \
        --device cuda --comm nccl --no-graph -q --steps 100000 --comm-timeout 3 --metrics "" \
        --checkpoint "" > ${name}_1.err 2>&1 &
    local victim=$!
    disown $victim   # no "Killed" line from the shell
    t0=$(date +%s)
    "${SIN[@]}" "${L[@]}" timeout 120 "$RUN" td_r2.bin --data "$DATA" --device cuda --comm nccl \
        --no-graph -q --steps 100000 --comm-timeout 3 --metrics ${name}_0.jsonl --checkpoint "" \
        > ${name}_0.err 2>&1 &
    local survivor=$!
    # $victim is timeout(1); the rank is its child
    if [ "$how" = kill ]; then   # mid-step, once training is under way
        for _ in $(seq 100); do [ -s ${name}_0.jsonl ] && break; sleep 0.1; done
        pkill -KILL -P $victim
    fi
    wait $survivor; rc=$?
    t1=$(date +%s)
    pkill -KILL -P $victim
    if [ $rc -ne 0 ] && [ $rc -lt 124 ] && [ $((t1 - t0)) -le 30 ] && grep -Eq "$TIMEOUT_RE" ${name}_0.err; then
        pass nccl_standin.$name
        echo "  nccl_standin.$name: rank 0 exited $rc after $((t1 - t0)) s: $(grep -E 'timed out' ${name}_0.err | cut -c1-110)"
    else
        fail nccl_standin.$name "rc $rc after $((t1 - t0)) s: $(tail -3 ${name}_0.err)"
    fi
}
dead_peer stuck_rank stall
dead_peer killed_rank kill
