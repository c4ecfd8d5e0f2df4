#!/bin/bash
# On a GPU machine: run the CUDA kernel test, then time the bf16 grouped GEMM
# and attention of the baseline and the current library (bench/kernels_cuda.cu)
# and their PyTorch twins.  D holds libmoek_cuda.so, base/libmoek_cuda.so,
# test_kernels_cuda, kernels_cuda and libs/ (OpenBLAS and friends).
#   bash bench/kernels_cuda.sh build-gpuperf/dev [outdir]
D=${1:-build-gpuperf/dev}
O=${2:-${OUT:-/tmp}}
export LD_LIBRARY_PATH=$PWD/$D/libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
if command -v cuobjdump >/dev/null; then
    cuobjdump -sass "$D/libmoek_cuda.so" > "$O/sass.txt" 2>&1
    awk '/Function : /{f=$3} /HMMA/{c[f]++} END{for (k in c) print "HMMA", c[k], k}' "$O/sass.txt" | grep -E "k_tc|k_fa"
    gzip -f "$O/sass.txt"
fi
MOEC_BUILD=$D "$D/test_kernels_cuda" > "$O/test.log" 2>&1
echo "test_kernels_cuda rc=$?: $(grep -c '^PASS' "$O/test.log") PASS, $(grep -c '^FAIL' "$O/test.log") FAIL, $(grep -c '^SKIP' "$O/test.log") SKIP"
grep -E '^(FAIL|SKIP)' "$O/test.log" | head -20
grep -E 'grouped_matmul.*bf16|attention_fwd_bf16' "$O/test.log" | head -30
"$D/kernels_cuda" "$D/base/libmoek_cuda.so" "$D/libmoek_cuda.so" "$D/libmoek_cuda.so" 2>&1 | tee "$O/bench.log"
counts=$(sed -n 's/^expert rows: \(.*\) (R = .*/\1/p' "$O/bench.log")
PYTHONUNBUFFERED=1 python3 bench/torch_kernels.py $counts 2>&1 | tee "$O/torch.log"
