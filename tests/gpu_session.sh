#!/usr/bin/env bash
# Every GPU check of the CUDA backend, in one command on a GPU machine that
# has none of our build tools or Debian packages (docs/gpu.md "Test").
#
# On the build machine (no GPU needed):
#   bash tests/gpu_session.sh --prepare
# builds into build-gpu-obj/ and assembles build-gpu/ (stripped programs,
# the kernel and NCCL libraries, the default data, and copies of the shared
# libraries the GPU machine lacks: OpenBLAS and its runtime, libffi), small
# enough to carry (the device tool takes 64 MiB).  Then, on the GPU machine,
# from the repository root with build-gpu carried:
#   bash tests/gpu_session.sh --out "$OUT"
# runs the five CUDA-vs-CPU kernel programs (tests/unit/test_kernels_cuda*),
# tests/cli/test_gpu_train.sh (whole models cuda vs cpu in fp32, bf16, fp16;
# graphs; resume; sampling across devices) and tests/cli/test_nccl.sh (a
# 1-rank NCCL world; 2 ranks where there are 2 GPUs), writes each log to
# $OUT and prints one line per program and the total last.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
G=$ROOT/build-gpu
OUT=""
case ${1:-} in
--prepare)
    cd "$ROOT" || exit 1
    O=build-gpu-obj
    cuda_tests=$(ls tests/unit/test_kernels_cuda*.c | sed "s|tests/unit/\(.*\)\.c|$O/tests/\1|")
    make -j2 BUILD=$O MOEC_BIN=$O/bin/moec RUN_BIN=$O/bin/run $O/bin/moec $O/bin/run \
        $O/libmoek_cpu.so $O/libmoek_cuda.so $O/libmoec_comm_nccl.so $O/data/default.txt $cuda_tests ||
        exit 1
    rm -rf "$G"
    mkdir -p "$G/bin" "$G/tests" "$G/data" "$G/syslib"
    cp $O/bin/moec $O/bin/run "$G/bin/"
    cp $O/libmoek_cpu.so $O/libmoek_cuda.so $O/libmoec_comm_nccl.so "$G/"
    cp $O/data/default.txt "$G/data/"
    cp $cuda_tests "$G/tests/"
    strip "$G"/bin/* "$G"/tests/* "$G"/*.so
    # what ldd resolves outside the C library, CUDA and NCCL: the GPU machine lacks it
    for f in "$G"/bin/* "$G"/*.so "$G"/tests/*; do
        ldd "$f" 2> /dev/null | awk '$3 ~ /^\// {print $3}'
    done | sort -u | grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*|libgcc_s|libstdc\+\+|libcuda|libcudart|libcublas[^/]*|libnccl)\.so' |
        while read -r lib; do cp -L "$lib" "$G/syslib/"; done
    echo "build-gpu: $(du -sh "$G" | cut -f1) ($(ls "$G/syslib" | tr '\n' ' '))"
    echo "carry: build-gpu   (commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ', dirty tree'))"
    exit 0 ;;
--out) OUT=${2:-} ;;
"") ;;
*) echo "usage: bash tests/gpu_session.sh --prepare | [--out DIR]" >&2; exit 2 ;;
esac
if [ ! -x "$G/bin/run" ]; then
    echo "no $G/bin/run: run 'bash tests/gpu_session.sh --prepare' where the code builds, and carry build-gpu" >&2
    exit 2
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$G/syslib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOEC_BUILD=build-gpu MOEC_KERNELS=$G MOEC=$G/bin/moec RUN=$G/bin/run OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
cd "$ROOT" || exit 1
{
    date -u
    git rev-parse HEAD 2> /dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    nvcc --version 2> /dev/null | tail -1
} > "$OUT/device.txt"
cat "$OUT/device.txt"
passed=0 failed=0 skipped=0
one() {   # NAME CMD...: its PASS/FAIL/SKIP lines counted, the log kept
    local name=$1; shift
    local t0=$SECONDS rc
    "$@" > "$OUT/$name.log" 2>&1; rc=$?
    local p f s
    p=$(grep -c '^PASS ' "$OUT/$name.log"); f=$(grep -c '^FAIL ' "$OUT/$name.log"); s=$(grep -c '^SKIP ' "$OUT/$name.log")
    if [ $rc -ne 0 ] && [ "$f" -eq 0 ]; then f=1; echo "FAIL $name exited $rc without a FAIL line" >> "$OUT/$name.log"; fi
    printf '%-32s %4d passed %3d failed %3d skipped  %4d s\n' "$name" "$p" "$f" "$s" $((SECONDS - t0))
    grep -E '^(FAIL|SKIP) |^# worst' "$OUT/$name.log" | head -8 | sed 's/^/    /'
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
}
for t in "$G"/tests/test_kernels_cuda*; do one "$(basename "$t")" "$t"; done
# the linear + bias (+ GELU) ops again without cuBLASLt's epilogues: the
# path taken where cuBLASLt has no algorithm
one test_kernels_cuda_fused_mlp.no_cublaslt env MOEK_CUDA_NO_LT=1 "$G/tests/test_kernels_cuda_fused_mlp"
one test_gpu_train bash tests/cli/test_gpu_train.sh
one test_nccl bash tests/cli/test_nccl.sh
grep -h '^PASS gpu\.\|^info:' "$OUT/test_gpu_train.log" | sed 's/^/    /'
echo "$passed passed, $failed failed, $skipped skipped (logs: $OUT)"
[ $failed -eq 0 ]
