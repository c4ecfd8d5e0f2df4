#!/usr/bin/env bash
# The "@comm" ZeRO and EP dispatchers on device buffers (docs/parallel.md
# "Collectives on device buffers"): with --device cuda they either hand plan
# tensors to a backend that takes device pointers (nccl: "direct") or stage
# them through host memory with the kernel library's copy service
# ("staged").  No GPU here: MOEC_TEST_COMM_DEVICE forces either path on CPU
# ranks (the CPU copy service is a memcpy), and every layout must give the
# same loss and grad norm, bit for bit, as the plain host path.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
DATA=$ROOT/$B/data/default.txt
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip mpi.comm_device "build moec, run and $DATA first"; exit 0; fi
export MOEC_KERNELS=$LIBDIR OMP_NUM_THREADS=1
cd "$TMP"
NOPAR='s/^parallel {.*}$//'
mk() {   # NAME SED-EXPR SOURCE
    sed "$NOPAR;$2" "$ROOT/examples/$3" > "$1.moe"
    "$MOEC" --stdlib "$ROOT/stdlib" "$1.moe" -o "$1.bin" || fail "mpi.comm_device.compile.$1" "moec failed"
}

# a wrong value of the test hook is an error, not a silent host run
mk one '' tiny_dense.moe
expect_fail mpi.comm_device.bad_hook "MOEC_TEST_COMM_DEVICE is 'gpu'; use staged or direct \(or unset it\)" \
    env MOEC_TEST_COMM_DEVICE=gpu "$RUN" one.bin --data "$DATA" --steps 1 --metrics ""

if ! command -v mpirun >/dev/null; then skip mpi.comm_device "mpirun not found"; exit 0; fi
if [ ! -f "$LIBDIR/libmoec_comm_mpi.so" ]; then skip mpi.comm_device "no $LIBDIR/libmoec_comm_mpi.so"; exit 0; fi
MPIRUN=(timeout 120 mpirun --oversubscribe -x MOEC_TEST_COMM_DEVICE)
[ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)

# EP counts and exchanges, half-precision reduce-scatters, slices and
# gathers (bf16 EP 2 ZeRO-2); fp32 reduce-scatters and ZeRO-3 gathers
# (EP 2 ZeRO-3); padded slices (mixtral_like, EP 2 ZeRO-2: slices, gathers and reduce-scatters)
mk bf16_ep2z2 '$a parallel { ranks = 2  expert = 2  zero = 2 }' tiny_moe_bf16.moe
mk ep2z3 '$a parallel { ranks = 2  expert = 2  zero = 3 }' tiny_moe.moe
mk mix_ep2z2 's/steps = [0-9]*/steps = 5/;$a parallel { ranks = 2  expert = 2  zero = 2 }' mixtral_like.moe
for p in bf16_ep2z2 ep2z3 mix_ep2z2; do
    for mode in host staged direct; do
        MOEC_TEST_COMM_DEVICE=$([ $mode = host ] || echo $mode) "${MPIRUN[@]}" -np 2 "$RUN" $p.bin \
            --data "$DATA" --steps 5 --metrics $p.$mode.jsonl --comm-timeout 60 > $p.$mode.out 2>&1 ||
            fail mpi.comm_device.run.$p.$mode "$(tail -3 $p.$mode.out)"
    done
    if out=$(/usr/bin/python3 - $p <<'PY'
import json, sys
p = sys.argv[1]
runs = {m: [json.loads(l) for l in open("%s.%s.jsonl" % (p, m))] for m in ("host", "staged", "direct")}
said = {m: ("device buffers %s" % m) in open("%s.%s.out" % (p, m)).read() for m in ("staged", "direct")}
bad = [m for m in ("staged", "direct") if len(runs[m]) != 5 or
       any(x[k] != y[k] for x, y in zip(runs["host"], runs[m]) for k in ("loss", "norm"))]
bad += ["%s not announced" % m for m in said if not said[m]]
h = runs["host"]
print("%s: 5 steps, loss %.6f -> %.6f, host = staged = direct bit for bit%s" %
      (p, h[0]["loss"], h[-1]["loss"], "" if not bad else "; differs: %s" % bad))
sys.exit(1 if bad or len(h) != 5 else 0)
PY
    ); then pass mpi.comm_device.$p; echo "  $out"; else fail mpi.comm_device.$p "$out"; fi
done
