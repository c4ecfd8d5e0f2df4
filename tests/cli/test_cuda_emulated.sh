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
#    step in about a second).
# 3. The emulator's own error paths: a deadlocked block and a launch with
#    a bad configuration.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
EMU=$ROOT/$B/cuemu
if [ ! -f "$EMU/libmoek_cuda.so" ]; then
    skip cuda_emulated "no $B/cuemu/libmoek_cuda.so (make builds it on x86-64 when the CUDA headers exist)"
    exit 0
fi

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
GPU_TRAIN_KERNELS=$TMP/k GPU_TRAIN_LABEL=emu GPU_TRAIN_STEPS=${EMU_TRAIN_STEPS:-4} \
    bash "$ROOT/tests/cli/test_gpu_train.sh"

# ---- 3. the emulator's own errors --------------------------------------------
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
    k_half_sync<<<1, 32, 0, s>>>(x);
    cudaError_t launch = cudaGetLastError();
    cudaError_t sync = cudaStreamSynchronize(s);
    printf("big=%d launch=%d sync=%d sticky=%d\n", (int)big, (int)launch, (int)sync,
           (int)cudaDeviceSynchronize());
    return 0;
}
EOF
sed -f "$ROOT/tests/standin/cuemu.sed" "$TMP/bad.cu" > "$TMP/bad.cpp"
san=""   # the emulator's objects of a sanitizer build need its runtime
nm "$EMU/standin_cuemu.o" | grep -q __asan && san="-fsanitize=address,undefined"
if ${CXX:-g++} -std=c++17 $san -include "$ROOT/tests/standin/cuemu.h" -I"$ROOT/tests/standin/include" \
       -I"$ROOT/tests/standin" -I"${CUDA_HOME:-/usr/local/cuda}/include" -o "$TMP/bad" "$TMP/bad.cpp" \
       "$EMU/standin_cuemu.o" "$EMU/standin_cudart.o" "$EMU/standin_cublas.o" -lpthread 2> "$TMP/bad.log"; then
    out=$("$TMP/bad" 2>&1)
    want="big=9 launch=0 sync=719 sticky=719"   # cudaErrorInvalidConfiguration, cudaErrorLaunchFailure
    if grep -q "^cuemu: kernel k_half_sync, block (0,0,0): deadlock: 16 threads wait at __syncthreads and 16 at a warp collective that cannot complete$" <<<"$out" &&
       grep -qx "$want" <<<"$out"; then
        pass emu.deadlock_and_bad_launch
    else fail emu.deadlock_and_bad_launch "$out (want: $want)"; fi
else
    fail emu.deadlock_and_bad_launch "cannot build the probe: $(head -3 "$TMP/bad.log")"
fi
