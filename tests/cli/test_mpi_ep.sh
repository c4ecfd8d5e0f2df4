#!/usr/bin/env bash
# Expert parallelism over MPI ranks on the CPU (docs/parallel.md): tiny_moe's
# 4 experts split over 2 ranks (parallel { ranks = 2 expert = 2 }) train
# exactly what 1 rank trains with grad_accum 2 - dropless and with a
# capacity, and with every token routed to the experts of rank 0 (rank 1
# receives nothing and must not hang) - and checkpoints move between the
# layouts (EP 2 -> 1 rank, 1 rank -> EP 2).
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
LIBDIR=${MOEC_KERNELS:-$ROOT/$B}
DATA=$ROOT/$B/data/default.txt
if ! command -v mpirun >/dev/null; then skip mpi.ep "mpirun not found (apt install openmpi-bin libopenmpi-dev)"; exit 0; fi
if [ ! -f "$LIBDIR/libmoec_comm_mpi.so" ]; then skip mpi.ep "no $LIBDIR/libmoec_comm_mpi.so (run make; needs mpicc)"; exit 0; fi
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip mpi.ep "build moec, run and $DATA first"; exit 0; fi
export MOEC_KERNELS=$LIBDIR OMP_NUM_THREADS=1
MPIRUN=(timeout 300 mpirun --oversubscribe -np 2)
[ "$(id -u)" -eq 0 ] && MPIRUN=(timeout 300 mpirun --allow-run-as-root --oversubscribe -np 2)
cd "$TMP"

mk() {   # NAME SED-EXPR: a variant of tiny_moe
    sed "$2" "$ROOT/examples/tiny_moe.moe" > "$1.moe"
    "$MOEC" --stdlib "$ROOT/stdlib" "$1.moe" -o "$1.bin" || fail "mpi.ep.compile.$1" "moec failed"
}
NOPAR='s/^parallel {.*}$//'
GA2='s/batch = 8 /batch = 8  grad_accum = 2 /'
CAP='s/top_k = top_k,/top_k = top_k, capacity = 1.0,/'
mk ga2 "$NOPAR;$GA2"
mk ep2 "$NOPAR;\$a parallel { ranks = 2  expert = 2 }"
mk ga2_cap "$NOPAR;$GA2;$CAP"
mk ep2_cap "$NOPAR;$CAP;\$a parallel { ranks = 2  expert = 2 }"
# (val_loss is left out: 2 ranks evaluate twice the rows of 1 rank's batch)
KEYS=(loss norm layers.0.moe.balance layers.1.moe.balance)

# 0. the plan: experts sharded, exchanges in forward and backward, norm over ep
out=$("$RUN" --inspect ep2.bin)
if echo "$out" | grep -Eq 'layers\.0\.moe\.w1 f32 \[2, 128, 64\] param' &&
   [ "$(echo "$out" | grep -c 'forward   moec_comm_ep_counts(2, ')" -eq 2 ] &&
   [ "$(echo "$out" | grep -c 'forward   moec_comm_ep_exchange(2, ')" -eq 4 ] &&
   [ "$(echo "$out" | grep -c 'backward  moec_comm_ep_exchange(2, ')" -eq 4 ] &&
   echo "$out" | grep -q 'optimizer moec_comm_allreduce_f32(grad_norm_sq.experts, 1, 2)'; then
    pass mpi.ep.plan; else fail mpi.ep.plan "$(echo "$out" | grep -E 'w1 |comm_ep|norm_sq' | head)"; fi

# 1. dropless: EP 2 on 2 ranks == 1 rank with grad_accum 2
"$RUN" ga2.bin --data "$DATA" --steps 10 --metrics g1.jsonl -q --checkpoint g1.st
"${MPIRUN[@]}" "$RUN" ep2.bin --data "$DATA" --steps 10 --metrics e2.jsonl -q --checkpoint e2.st \
    --comm-timeout 60 >/dev/null 2>e2.err || fail mpi.ep.run "$(tail -5 e2.err)"
cmp_metrics mpi.ep.dropless_eq_1rank g1.jsonl e2.jsonl 1e-5 "${KEYS[@]}"

# 2. capacity (drops happen): the same
"$RUN" ga2_cap.bin --data "$DATA" --steps 10 --metrics gc.jsonl -q
"${MPIRUN[@]}" "$RUN" ep2_cap.bin --data "$DATA" --steps 10 --metrics ec.jsonl -q \
    --comm-timeout 60 >/dev/null 2>ec.err || fail mpi.ep.run_capacity "$(tail -5 ec.err)"
cmp_metrics mpi.ep.capacity_eq_1rank gc.jsonl ec.jsonl 1e-5 "${KEYS[@]}"

# 3. every token to experts 0 and 1 (rank 0): zero router weights make all
# logits equal and top-2 ties go to the lowest ids; rank 1 gets no row
/usr/bin/python3 - g1.st zr.st <<'EOF'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n]); data = bytearray(raw[8 + n:])
for k, v in hdr.items():
    if k.endswith("router.weight"):
        a, b = v["data_offsets"]; data[a:b] = bytes(b - a)
open(sys.argv[2], "wb").write(raw[:8 + n] + bytes(data))
EOF
"$RUN" ga2.bin --data "$DATA" --steps 5 --init-from zr.st --metrics z1.jsonl -q
"${MPIRUN[@]}" "$RUN" ep2.bin --data "$DATA" --steps 5 --init-from zr.st --metrics z2.jsonl -q \
    --comm-timeout 60 >/dev/null 2>z2.err || fail mpi.ep.run_one_expert "$(tail -5 z2.err)"
cmp_metrics mpi.ep.all_tokens_to_rank0_experts z1.jsonl z2.jsonl 1e-5 "${KEYS[@]}"
# step 1 (before the router learns): 512 tokens x top-2 per micro-batch,
# experts 0 and 1 take every slot in both layers
if [ "$(head -1 z1.jsonl | grep -o '"load":\[512,512,0,0\]' | wc -l)" -eq 2 ]; then
    pass mpi.ep.routing_really_one_rank
else fail mpi.ep.routing_really_one_rank "$(head -1 z1.jsonl | grep -o '"load":\[[^]]*\]')"; fi

# 4. checkpoints: EP 2 -> 1 rank continues the 1-rank curve; 1 rank -> EP 2 too
"$RUN" ga2.bin --data "$DATA" --steps 12 --metrics c1.jsonl -q
cp e2.jsonl r1.jsonl
"$RUN" ga2.bin --data "$DATA" --steps 12 --resume e2.st --metrics r1.jsonl -q
cmp_metrics mpi.ep.ckpt_ep2_resumes_on_1rank c1.jsonl r1.jsonl 1e-5 loss norm
cp g1.jsonl r2.jsonl
"${MPIRUN[@]}" "$RUN" ep2.bin --data "$DATA" --steps 12 --resume g1.st --metrics r2.jsonl -q \
    --comm-timeout 60 >/dev/null 2>r2.err || fail mpi.ep.resume_run "$(tail -5 r2.err)"
cmp_metrics mpi.ep.ckpt_1rank_resumes_on_ep2 c1.jsonl r2.jsonl 1e-5 loss norm
# the EP checkpoint holds global tensors: the same names and shapes as 1 rank's
if /usr/bin/python3 - g1.st e2.st <<'EOF'
import json, struct, sys
def hdr(p):
    raw = open(p, "rb").read(); n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8:8 + n]); h.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"]) for k, v in h.items()}
a, b = hdr(sys.argv[1]), hdr(sys.argv[2])
sys.exit(0 if a == b and a["layers.0.moe.w1"][1] == [4, 128, 64] else 1)
EOF
then pass mpi.ep.ckpt_global_layout; else fail mpi.ep.ckpt_global_layout "names/shapes differ"; fi
