#!/usr/bin/env bash
# Save at one layout, load at another: identical logits on a fixed batch
# (docs/parallel.md "--eval-logits").  A checkpoint written by 2 ranks with
# expert parallelism is loaded by 1 rank (batch 8), by 2 ranks EP 2 and by
# 2 ranks ZeRO-2 (batch 4 each); `run --eval-logits` gives the logits of the
# first validation batch, which must agree within 1e-6 of the largest logit.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
DATA=$ROOT/$B/data/default.txt
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip mpi.logits "build moec, run and $DATA first"; exit 0; fi
export MOEC_KERNELS=$LIBDIR OMP_NUM_THREADS=1
cd "$TMP"
NOPAR='s/^parallel {.*}$//'
mk() {   # NAME SED-EXPR
    sed "$NOPAR;$2" "$ROOT/examples/mixtral_like.moe" > "$1.moe"
    "$MOEC" --stdlib "$ROOT/stdlib" "$1.moe" -o "$1.bin" || fail "mpi.logits.compile.$1" "moec failed"
}
mk one 's/batch = 4 /batch = 8 /'

# errors first (no MPI needed): an unwritable path, bf16 logits
expect_fail mpi.logits.unwritable 'eval-logits: cannot write /nonexistent/l.bin' \
    "$RUN" one.bin --data "$DATA" --eval-logits /nonexistent/l.bin
mk half 's/batch = 4 /batch = 4  precision = bf16 /'
if grep -q 'precision = bf16' half.moe && [ -f half.bin ]; then
    expect_fail mpi.logits.bf16 'the plan keeps no fp32 logits tensor' \
        "$RUN" half.bin --data "$DATA" --eval-logits l.bin
fi

if ! command -v mpirun >/dev/null; then skip mpi.logits "mpirun not found"; exit 0; fi
if [ ! -f "$LIBDIR/libmoec_comm_mpi.so" ]; then skip mpi.logits "no $LIBDIR/libmoec_comm_mpi.so"; exit 0; fi
MPIRUN=(timeout 120 mpirun --oversubscribe -np 2)
[ "$(id -u)" -eq 0 ] && MPIRUN=(timeout 120 mpirun --allow-run-as-root --oversubscribe -np 2)
mk ep2 '$a parallel { ranks = 2  expert = 2 }'
mk z2 '$a parallel { ranks = 2  zero = 2 }'

"${MPIRUN[@]}" "$RUN" ep2.bin --data "$DATA" --steps 5 --metrics "" -q --checkpoint ep2.st \
    --comm-timeout 60 > save.out 2>&1 || fail mpi.logits.save "$(tail -3 save.out)"
"$RUN" one.bin --data "$DATA" --resume ep2.st --eval-logits one.f32 > one.out 2>&1 ||
    fail mpi.logits.one "$(tail -3 one.out)"
"${MPIRUN[@]}" "$RUN" ep2.bin --data "$DATA" --resume ep2.st --eval-logits ep2.f32 \
    --comm-timeout 60 > e.out 2>&1 || fail mpi.logits.ep2 "$(tail -3 e.out)"
"${MPIRUN[@]}" "$RUN" z2.bin --data "$DATA" --resume ep2.st --eval-logits z2.f32 \
    --comm-timeout 60 > z.out 2>&1 || fail mpi.logits.z2 "$(tail -3 z.out)"
# and the initial weights (no checkpoint) differ: the test can tell weights apart
"$RUN" one.bin --data "$DATA" --eval-logits init.f32 > init.out 2>&1 ||
    fail mpi.logits.init "$(tail -3 init.out)"
for x in ep2 z2 init; do
    if out=$(/usr/bin/python3 - one.f32 $x.f32 $x <<'PY'
import struct, sys
a = open(sys.argv[1], "rb").read(); b = open(sys.argv[2], "rb").read()
want = 8 * 32 * 256 * 4   # batch 8 (2 ranks x 4) x seq 32 x vocab 256, fp32
if len(a) != want or len(b) != want:
    print("sizes %d, %d, want %d" % (len(a), len(b), want)); sys.exit(1)
n = want // 4
x = struct.unpack("<%df" % n, a); y = struct.unpack("<%df" % n, b)
# relative to the largest logit: elementwise ratios of logits near 0 would
# measure only the summation order of the matmuls (batch 8 vs 4 rows)
scale = max(abs(p) for p in x)
worst = max(abs(p - q) for p, q in zip(x, y)) / scale
print("%s vs 1 rank: worst difference %.3g of the largest logit (%.3g) over %d logits"
      % (sys.argv[3], worst, scale, n))
ok = worst > 1e-2 if sys.argv[3] == "init" else worst <= 1e-6
sys.exit(0 if ok else 1)
PY
    ); then pass mpi.logits.$x; echo "  $out"; else fail mpi.logits.$x "$out"; fi
done
