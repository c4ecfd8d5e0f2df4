#!/usr/bin/env bash
# The CUDA kernel library's own sources, run on the CPU.  make builds
# $B/cuemu/libmoek_cuda.so from kernels/cuda/*.cu with the host compiler
# and the CUDA-language emulator (tests/standin/cuemu.h: a block's threads
# as fibers, __syncthreads/__syncwarp/shuffles/WMMA as real barriers,
# cp.async performed at its wait, a stand-in CUDA runtime and cuBLAS).
# 1. The five CUDA-vs-CPU programs (the checks a GPU runs: every kernel,
#    fp32/bf16/fp16, against its CPU twin on NaN-poisoned outputs, graphs
#    replayed bit for bit) against it, with the warps run in three orders
#    (CUEMU_ORDER): forward reports every check as emu.*, reverse and one
#    random order report one line per program (a race between warps
#    shows as a wrong result under some order).
# 2. Whole models through ./run --device cuda on it (test_gpu_train.sh's
#    GPU part: fp32 dense/MoE vs the CPU, graph replay vs eager and resume
#    bit for bit, bf16 and fp16 within 1e-2, sampling across devices), over
#    EMU_TRAIN_STEPS steps (default 4: the emulator runs a tiny model's
#    step in about a second; 2 in a sanitizer build).
# 3. Two ranks over the NCCL backend (stand-in NCCL) on the emulated
#    kernels, data- and expert-parallel, with CUDA graphs: the backend's
#    capture path (collectives on its own stream, joined by events, inside
#    the captured step) replays to the eager run's losses bit for bit.
# 4. The emulator's own error paths: a deadlocked block, launches with a bad
#    configuration or too much shared memory, and an unknown CUEMU_ORDER.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
EMU=$ROOT/$B/cuemu
if [ ! -f "$EMU/libmoek_cuda.so" ]; then
    skip cuda_emulated "no $B/cuemu/libmoek_cuda.so (make builds it on x86-64 when the CUDA headers exist)"
    exit 0
fi

cd "$TMP" || exit 1

# A sanitizer build runs the emulator several times slower: the whole-model
# parts take 2 steps there (the same checks, resume after 1)
san=""
nm "$EMU/standin_cuemu.o" | grep -q __asan && san="-fsanitize=address,undefined"
SAN_STEPS=${san:+2}

# ---- 1. the kernel twin programs ------------------------------------------
for prog in test_kernels_cuda test_kernels_cuda_fused test_kernels_cuda_fused_mlp \
            test_kernels_cuda_stdlib2 test_kernels_cuda_routing; do
    exe=$ROOT/$B/tests/$prog
    if [ ! -x "$exe" ]; then fail "emu.$prog" "no $exe: run make first"; continue; fi
    for order in forward reverse random:7; do
        out=$(CUEMU_ORDER=$order MOEC_BUILD=$EMU timeout 900 "$exe" 2>&1); rc=$?
        p=$(grep -c '^PASS ' <<<"$out"); f=$(grep -c '^FAIL ' <<<"$out"); s=$(grep -c '^SKIP ' <<<"$out")
        if [ "$order" = forward ]; then
            # every check, renamed: these ran on the emulator, not on a GPU
            sed -n -E 's/^(PASS|FAIL) /\1 emu./p' <<<"$out"
            grep -q '^# worst' <<<"$out" && grep '^# worst' <<<"$out" | sed "s/^# /info: emu $prog: /"
            nforward=$p
        fi
        if [ $s -gt 0 ]; then
            fail "emu.$prog.$order" "the program skipped on the emulator: $(grep -m1 '^SKIP' <<<"$out")"
        elif [ $rc -ne 0 ] && [ $f -eq 0 ]; then
            fail "emu.$prog.$order" "exited $rc without a FAIL line: $(tail -3 <<<"$out")"
        elif [ "$order" != forward ]; then
            if [ $f -eq 0 ] && [ $rc -eq 0 ] && [ "$p" -eq "$nforward" ]; then
                pass "emu.$prog.$order ($p checks)"
            else
                fail "emu.$prog.$order" "$p passed (forward: $nforward), $f failed: $(grep -m3 '^FAIL' <<<"$out")"
            fi
        fi
    done
done

# the linear + bias (+ GELU) ops with cuBLASLt's epilogues off: the
# separate kernels that run where cuBLASLt offers no algorithm
out=$(MOEK_CUDA_NO_LT=1 MOEC_BUILD=$EMU timeout 900 "$ROOT/$B/tests/test_kernels_cuda_fused_mlp" 2>&1); rc=$?
p=$(grep -c '^PASS ' <<<"$out"); f=$(grep -c '^FAIL ' <<<"$out")
if [ $rc -eq 0 ] && [ $f -eq 0 ] && [ "$p" -eq 12 ]; then
    pass "emu.test_kernels_cuda_fused_mlp.no_cublaslt ($p checks)"
else fail "emu.test_kernels_cuda_fused_mlp.no_cublaslt" "$p passed, $f failed, exit $rc: $(grep -m3 '^FAIL' <<<"$out")"; fi

# ---- 2. whole models on the emulated device -----------------------------------
mkdir -p "$TMP/k"
ln -sf "$ROOT/$B/libmoek_cpu.so" "$TMP/k/libmoek_cpu.so"
ln -sf "$EMU/libmoek_cuda.so" "$TMP/k/libmoek_cuda.so"
GPU_TRAIN_KERNELS=$TMP/k GPU_TRAIN_LABEL=emu GPU_TRAIN_STEPS=${EMU_TRAIN_STEPS:-${SAN_STEPS:-4}} \
    bash "$ROOT/tests/cli/test_gpu_train.sh"

# ---- 3. ranks over the NCCL backend, with CUDA graphs ----------------------------
# The emulated kernels linked against the stand-in CUDA runtime that the
# NCCL backend loads (one runtime: one set of streams), and the stand-in
# NCCL: two ranks of tiny_moe, data-parallel (ZeRO-1), then Mixtral-like
# expert-parallel with capacity routing, each with graphs (collectives
# captured on the NCCL backend's own stream, joined by events, and
# replayed) and with --no-graph: the same losses and norms bit for bit.
# Data-parallel captures the whole micro-step; expert-parallel keeps
# forward..backward eager (the all-to-all sizes its exchange from counts
# read on the host), says so naming the op, and captures the optimizer.
NCCL_LIB=$ROOT/$B/libmoec_comm_nccl.so
DATA=$DEFAULT_DATA
if [ ! -f "$NCCL_LIB" ]; then
    skip emu.nccl "no $B/libmoec_comm_nccl.so (built by make when nccl.h exists)"
else
    SD=$TMP/sd
    if standin_libs "$SD" "$NCCL_LIB" &&
       ${CXX:-g++} $san -shared -o "$SD/libmoek_cuda.so" $(ls "$EMU"/*.o | grep -v standin_cudart.o) \
           -L"$SD" -l:"$CUDART" -Wl,-rpath,"$SD" -lpthread 2>> "$SD/cc.log"; then
        ln -sf "$ROOT/$B/libmoek_cpu.so" "$SD/libmoek_cpu.so"
        ln -sf "$NCCL_LIB" "$SD/libmoec_comm_nccl.so"
        for cfg in dp:tiny_moe:1 ep:mixtral_like:2; do
            IFS=: read -r kind ex ep <<< "$cfg"
            sed "s/^parallel {.*}\$//;s/capacity = 0.0/capacity = 1.25/;\$a parallel { ranks = 2  expert = $ep  zero = 1 }" \
                "$ROOT/examples/$ex.moe" > nc_$kind.moe
            "$MOEC" --stdlib "$ROOT/stdlib" nc_$kind.moe -o nc_$kind.bin > nc_$kind.moec 2>&1 ||
                { fail emu.nccl_$kind "moec failed: $(tail -2 nc_$kind.moec)"; continue; }
            ok=1
            for mode in graph eager; do
                port=$((20000 + RANDOM % 30000)) pids=()
                extra=(); [ $mode = eager ] && extra=(--no-graph)
                for k in 1 0; do
                    env LD_LIBRARY_PATH="$SD" MOEC_KERNELS="$SD" STANDIN_NCCL_DIR="$TMP" STANDIN_NCCL_HANG_S=300 \
                        RANK=$k WORLD_SIZE=2 LOCAL_RANK=$k MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
                        MOEC_JOB_TOKEN=emu$$ timeout 600 "$RUN" nc_$kind.bin --data "$DATA" --steps ${SAN_STEPS:-3} \
                        --device cuda --comm nccl --comm-timeout 300 "${extra[@]}" \
                        --metrics nc_${kind}_${mode}_$k.jsonl --checkpoint "" > nc_${kind}_${mode}_$k.err 2>&1 &
                    pids+=($!)
                done
                for p in "${pids[@]}"; do wait "$p" || ok=0; done
            done
            if [ $ok -eq 0 ]; then
                fail emu.nccl_$kind "a rank failed: $(tail -q -n 3 nc_${kind}_*.err | head -6)"
            elif [ $kind = dp ] && ! grep -q '^run: captured the forward\.\.backward phases as a CUDA graph' nc_${kind}_graph_0.err; then
                fail emu.nccl_$kind "forward..backward not captured: $(grep -m2 graph nc_${kind}_graph_0.err)"
            elif [ $kind = ep ] && ! { grep -q '^run: captured the optimizer phase as a CUDA graph' nc_${kind}_graph_0.err &&
                 grep -q '^run: no CUDA graph for the forward\.\.backward phases (eager instead): op [0-9]* (all-to-all of expert token counts (ep group), .*moe.moe:[0-9]*:[0-9]*): the expert all-to-all reads the token counts on the host to size its exchange$' nc_${kind}_graph_0.err; }; then
                fail emu.nccl_$kind "want the optimizer phase captured and forward..backward eager, named: $(grep -m3 graph nc_${kind}_graph_0.err)"
            else
                cmp_metrics emu.nccl_${kind}_graph_equals_eager nc_${kind}_eager_0.jsonl nc_${kind}_graph_0.jsonl 0 loss norm
            fi
        done
    else
        fail emu.nccl "cannot build the stand-ins: $(head -5 "$SD/cc.log")"
    fi
fi

# ---- 4. the emulator's own errors --------------------------------------------
# A kernel whose threads can never all meet (half a warp at __syncthreads,
# the other half at __syncwarp) is a deadlock: named, and the launch fails
# with a sticky error, like a GPU fault.
# A block of 2048 threads is refused at launch, as cudaLaunchKernel does.
cat > "$TMP/bad.cu" <<'EOF'
#include <stdio.h>
#include "standin.h"
__global__ void k_half_sync(float *x)
{
    if (threadIdx.x < 16)
        __syncthreads();
    else
        __syncwarp();
    x[threadIdx.x] = 1.0f;
}
__global__ void k_nothing(float *x) { x[0] = 0.0f; }
int main()
{
    float *x = nullptr;
    cudaStream_t s;
    if (cudaMalloc((void **)&x, 256 * sizeof(float)) || cudaStreamCreate(&s))
        return 3;
    k_nothing<<<1, 2048, 0, s>>>(x);
    cudaError_t big = cudaGetLastError();
    k_nothing<<<1, 32, 64 << 10, s>>>(x);   /* over 48 KiB without cudaFuncSetAttribute */
    cudaError_t shm = cudaGetLastError();
    k_half_sync<<<1, 32, 0, s>>>(x);
    cudaError_t launch = cudaGetLastError();
    cudaError_t sync = cudaStreamSynchronize(s);
    printf("big=%d shm=%d launch=%d sync=%d sticky=%d\n", (int)big, (int)shm, (int)launch, (int)sync,
           (int)cudaDeviceSynchronize());
    return 0;
}
EOF
sed -f "$ROOT/tests/standin/cuemu.sed" "$TMP/bad.cu" > "$TMP/bad.cpp"
if ${CXX:-g++} -std=c++17 $san -include "$ROOT/tests/standin/cuemu.h" -I"$ROOT/tests/standin/include" \
       -I"$ROOT/tests/standin" -I"${CUDA_HOME:-/usr/local/cuda}/include" -o "$TMP/bad" "$TMP/bad.cpp" \
       "$EMU/standin_cuemu.o" "$EMU/standin_cudart.o" "$EMU/standin_cublas.o" -lpthread 2> "$TMP/bad.log"; then
    out=$("$TMP/bad" 2>&1)
    # cudaErrorInvalidConfiguration, cudaErrorInvalidValue, cudaErrorLaunchFailure
    want="big=9 shm=1 launch=0 sync=719 sticky=719"
    if grep -q "^cuemu: kernel k_half_sync, block (0,0,0): deadlock: 16 threads wait at __syncthreads and 16 at a warp collective that cannot complete$" <<<"$out" &&
       grep -qx "$want" <<<"$out"; then
        pass emu.deadlock_and_bad_launch
    else fail emu.deadlock_and_bad_launch "$out (want: $want)"; fi
    expect_fail emu.bad_order '^cuemu: CUEMU_ORDER=sideways: expected forward, reverse or random:SEED$' \
        env CUEMU_ORDER=sideways "$TMP/bad"
else
    fail emu.deadlock_and_bad_launch "cannot build the probe: $(head -3 "$TMP/bad.log")"
fi
