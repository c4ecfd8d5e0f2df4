#!/usr/bin/env bash
# The NCCL backend (docs/launching.md).
# Any machine where it was built (nvcc and nccl.h): libmoec_comm_nccl.so
# exports the three backend tables and the stream hook and needs no MPI at
# link time; `run --comm nccl` names a bad launch variable; without a GPU
# it says so.  (The TCP rendezvous itself: tests/unit/test_rendezvous.c.)
# GPU only: a 1-rank NCCL world runs tiny_dense on cuda exactly as --comm
# single does; with 2 GPUs, 2 ranks through the TCP rendezvous train what
# one rank trains with the whole batch.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
LIB=$LIBDIR/libmoec_comm_nccl.so
DATA=$ROOT/$B/data/default.txt
if [ ! -f "$LIB" ]; then skip nccl "no $LIB (built by make when nvcc and nccl.h exist)"; exit 0; fi
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip nccl "build moec, run and $DATA first"; exit 0; fi
export MOEC_KERNELS=$LIBDIR OMP_NUM_THREADS=1
cd "$TMP"

# 1. the library: the tables run looks up, and no MPI (or any) link to a launcher
syms=$(nm -D --defined-only "$LIB" 2>&1)
missing=""
for s in moec_comm_backend moec_comm_backend_ep moec_comm_zero_backend moec_comm_bind_stream; do
    echo "$syms" | grep -Eq " T $s\$" || missing="$missing $s"
done
if [ -z "$missing" ]; then pass nccl.lib_exports; else fail nccl.lib_exports "missing:$missing"; fi
needed=$(readelf -d "$LIB" | grep NEEDED)
if echo "$needed" | grep -q libnccl && ! echo "$needed" | grep -qi mpi; then
    pass nccl.lib_links_nccl_not_mpi
else
    fail nccl.lib_links_nccl_not_mpi "$needed"
fi

"$MOEC" --stdlib "$ROOT/stdlib" "$ROOT/examples/tiny_dense.moe" -o td.bin > moec.log 2>&1 ||
    { fail nccl.compile "$(tail -3 moec.log)"; exit 0; }
NOPAR='s/^parallel {.*}$//'
sed "$NOPAR;\$a parallel { ranks = 2 }" "$ROOT/examples/tiny_dense.moe" > td_r2.moe
"$MOEC" --stdlib "$ROOT/stdlib" td_r2.moe -o td_r2.bin > moec2.log 2>&1 ||
    { fail nccl.compile_r2 "$(tail -3 moec2.log)"; exit 0; }

# 2. launch variables are checked before anything starts, naming the variable
envrun() { env -u OMPI_COMM_WORLD_SIZE -u PMI_SIZE -u PMIX_RANK -u MPI_LOCALNRANKS "$@"; }
L=(RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MOEC_JOB_TOKEN=t)
expect_fail nccl.env_bad_port 'the nccl backend failed to start: MASTER_PORT=70000 is not a port number \(1-65535\)' \
    envrun "${L[@]}" MASTER_PORT=70000 "$RUN" td_r2.bin --data "$DATA" --comm nccl --steps 1 -q
expect_fail nccl.env_bad_world "the nccl backend failed to start: WORLD_SIZE='x' is not an integer" \
    envrun "${L[@]}" WORLD_SIZE=x MASTER_PORT=29500 "$RUN" td_r2.bin --data "$DATA" --comm nccl --steps 1 -q
expect_fail nccl.env_rank_above_world 'RANK=2 is not below WORLD_SIZE=2' \
    envrun "${L[@]}" RANK=2 MASTER_PORT=29500 "$RUN" td_r2.bin --data "$DATA" --comm nccl --steps 1 -q
expect_fail nccl.env_no_token 'MOEC_JOB_TOKEN is not set' \
    envrun -u MOEC_JOB_TOKEN RANK=1 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 "$RUN" td_r2.bin --data "$DATA" --comm nccl --steps 1 -q

GPUS=0
if command -v nvidia-smi > /dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU '); fi
if [ "$GPUS" -lt 1 ]; then
    # 3. no GPU: a clear error, not a crash, both alone and as a launched rank
    expect_fail nccl.no_gpu 'the nccl backend failed to start: no usable GPU \(cudaGetDeviceCount: .*\); the nccl backend needs one GPU per rank; use --comm mpi for CPU ranks' \
        envrun "$RUN" td.bin --data "$DATA" --comm nccl --steps 1 -q
    expect_fail nccl.no_gpu_rank 'local rank 1: no usable GPU \(.*CUDA_VISIBLE_DEVICES=1\)' \
        envrun "${L[@]}" RANK=1 LOCAL_RANK=1 MASTER_PORT=29500 "$RUN" td_r2.bin --data "$DATA" --comm nccl --steps 1 -q
    # under mpirun each rank narrows CUDA_VISIBLE_DEVICES to its local rank first
    if command -v mpirun > /dev/null; then
        MPIRUN=(mpirun --oversubscribe)
        [ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)
        expect_fail nccl.no_gpu_mpirun 'local rank ([01]): no usable GPU \(.*CUDA_VISIBLE_DEVICES=\1\)' \
            timeout 60 "${MPIRUN[@]}" -np 2 "$RUN" td_r2.bin --data "$DATA" --device cuda --steps 1 -q
    else
        skip nccl.no_gpu_mpirun "no mpirun"
    fi
    skip nccl.gpu_1rank "no GPU here (nvidia-smi lists none)"
    skip nccl.gpu_2ranks "no GPU here"
    exit 0
fi

losses() { sed -E 's/^\{"step":([0-9]+),"loss":([^,]+),.*/\1 \2/' "$1"; }

# 4. one GPU: a 1-rank NCCL world equals --comm single on cuda, bit for bit
common=(td.bin --data "$DATA" --device cuda --steps 10 -q)
envrun "$RUN" "${common[@]}" --comm single --metrics s.jsonl --checkpoint s.st > /dev/null 2> s.err ||
    fail nccl.gpu_single_run "$(tail -3 s.err)"
if envrun "$RUN" "${common[@]}" --comm nccl --metrics n.jsonl --checkpoint n.st > /dev/null 2> n.err; then
    if [ -s s.jsonl ] && cmp -s <(losses s.jsonl) <(losses n.jsonl); then
        pass nccl.gpu_1rank_eq_single
    else
        fail nccl.gpu_1rank_eq_single "$(diff <(losses s.jsonl) <(losses n.jsonl) | head -5)"
    fi
else
    fail nccl.gpu_1rank_eq_single "$(tail -3 n.err)"
fi

# 5. two GPUs: 2 ranks through the TCP rendezvous == 1 rank with batch 16
if [ "$GPUS" -lt 2 ]; then skip nccl.gpu_2ranks "one GPU only"; exit 0; fi
sed "$NOPAR;s/batch = 8 /batch = 16 /" "$ROOT/examples/tiny_dense.moe" > td_b16.moe
"$MOEC" --stdlib "$ROOT/stdlib" td_b16.moe -o td_b16.bin > /dev/null 2>&1
envrun "$RUN" td_b16.bin --data "$DATA" --device cuda --steps 10 -q --metrics b16.jsonl --checkpoint b.st > /dev/null 2>&1
PORT=$((20000 + RANDOM % 20000))
for r in 1 0; do
    envrun RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT MOEC_JOB_TOKEN=t$$ \
        "$RUN" td_r2.bin --data "$DATA" --device cuda --comm nccl --steps 10 -q --comm-timeout 60 \
        --metrics r2_$r.jsonl --checkpoint r2_$r.st > /dev/null 2> r2_$r.err &
done
wait
/usr/bin/python3 - b16.jsonl r2_0.jsonl <<'EOF' && pass nccl.gpu_2ranks_eq_batch16 || fail nccl.gpu_2ranks_eq_batch16 "$(tail -3 r2_0.err r2_1.err)"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert a and len(a) == len(b), (len(a), len(b))
worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
print("  nccl 2 ranks vs batch 16: worst relative loss difference %.3g" % worst)
sys.exit(0 if worst <= 1e-5 else 1)
EOF
