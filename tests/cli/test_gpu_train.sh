#!/usr/bin/env bash
# The GPU side of ./run.
# Part 1 (any machine): a stand-in "cuda" library (tests/standin/moek_cuda.c:
# libmoek_cpu.so's kernels, graph capture refused, a device sync that fails
# on request) shows the two error paths: a
# capture failure falls back to eager with one line, and a data error
# reported by moek_device_sync names the step and the op; every kind of
# example (bf16, fp16, DeepSeek, Mixtral, switch, fused GELU) trains on the
# device path exactly as on the CPU, and samples both ways.
# Part 2 (GPU only): tiny_dense and tiny_moe, 20 steps on cuda vs cpu (same
# plan, data and seed): every step's loss within 1e-4 relative; CUDA graph
# replay vs --no-graph bit for bit (losses and final checkpoint); 10 + resume
# + 10 steps on cuda equal 20 straight; bf16 (dense and MoE) and fp16 (MoE)
# within 1e-2 relative of the CPU at each of 20 steps (and a bf16 GELU MLP
# model, which takes the cuBLASLt epilogue GEMMs); checkpoints trained
# on either device sample the same greedy text on both.
# With GPU_TRAIN_KERNELS=DIR (a folder with libmoek_cuda.so and
# libmoek_cpu.so), only part 2 runs, on that library, its checks named
# $GPU_TRAIN_LABEL.gpu.* and over GPU_TRAIN_STEPS steps (default 20):
# tests/cli/test_cuda_emulated.sh runs it on the CUDA kernels emulated on
# the CPU.
source "$(dirname "$0")/../lib.sh"
B=""
for b in ${MOEC_BUILD:-} build build-gpurt; do
    if [ -f "$ROOT/$b/libmoek_cpu.so" ]; then B="$ROOT/$b"; break; fi
done
if [ -z "$B" ] || [ ! -x "$RUN" ] || [ ! -x "$MOEC" ]; then
    skip gpu.train "build ./moec, ./run and libmoek_cpu.so first"; exit 0
fi
cd "$TMP"
cat "$ROOT"/docs/*.md "$ROOT"/README.md > data.txt
for m in tiny_dense tiny_moe; do
    if ! "$MOEC" --stdlib "${MOEC_STDLIB:-$ROOT/stdlib}" "$ROOT/examples/$m.moe" -o "$m.bin" > "$m.moec.log" 2>&1; then
        fail "gpu.compile_$m" "$(tail -3 "$m.moec.log")"; exit 0
    fi
done
losses() { sed -E 's/^\{"step":([0-9]+),"loss":([^,]+),.*/\1 \2/' "$1"; }

# ---- part 1: error paths through a stand-in device library ----------------
mkdir -p fake
if [ -n "${GPU_TRAIN_KERNELS:-}" ]; then
    :   # part 2 only
elif ! "${CC:-cc}" -std=c11 -D_GNU_SOURCE -shared -fPIC -o fake/libmoek_cuda.so "$ROOT/tests/standin/moek_cuda.c" \
        -L"$B" -Wl,--no-as-needed -lmoek_cpu -Wl,-rpath,"$B" -ldl 2> fake/cc.log; then
    skip gpu.fake "cannot build the stand-in library: $(head -2 fake/cc.log)"
else
    common=(tiny_dense.bin --data data.txt --steps 4)
    MOEC_KERNELS=$B "$RUN" "${common[@]}" --device cpu --metrics cpu4.jsonl --checkpoint c.st -q > /dev/null 2>&1
    out=$(MOEC_KERNELS=$TMP/fake "$RUN" "${common[@]}" --device cuda --metrics fake4.jsonl --checkpoint f.st 2>&1); rc=$?
    n=$(grep -c 'graph capture' <<<"$out")
    if [ $rc -eq 0 ] && [ "$n" -eq 1 ] && grep -q '^run: CUDA graph capture of the forward\.\.backward phases failed (stand-in: capture refused); running every phase eagerly from now on$' <<<"$out"; then
        pass gpu.capture_fallback_line; else fail gpu.capture_fallback_line "exit $rc, $n lines: $out"; fi
    if [ -s cpu4.jsonl ] && [ "$(losses cpu4.jsonl)" = "$(losses fake4.jsonl)" ] && cmp -s c.st f.st; then
        pass gpu.capture_fallback_exact; else fail gpu.capture_fallback_exact "$(losses cpu4.jsonl) vs $(losses fake4.jsonl)"; fi
    out=$(MOEC_KERNELS=$TMP/fake "$RUN" "${common[@]}" --device cuda --no-graph --metrics nog.jsonl --checkpoint n.st 2>&1); rc=$?
    if [ $rc -eq 0 ] && ! grep -q 'graph' <<<"$out" && cmp -s c.st n.st; then
        pass gpu.no_graph_silent; else fail gpu.no_graph_silent "exit $rc: $out"; fi
    # sampling on the device path: a CPU-trained checkpoint sampled on
    # "cuda" and a "cuda"-trained one on the CPU give the CPU's text
    smp() { MOEC_KERNELS=$1 "$RUN" tiny_dense.bin --device "$2" --sample --checkpoint "$3" \
                --prompt "The " --tokens 24 --temperature 0.8 --top-k 8 --seed 5 2>> smp.err; }
    a=$(smp "$B" cpu c.st); b=$(smp "$TMP/fake" cuda c.st); c=$(smp "$B" cpu f.st)
    if [ "$(tail -1 <<<"$a" | wc -c)" -ge 24 ] && [ "$a" = "$b" ] && [ "$a" = "$c" ]; then
        pass gpu.fake_sample_both_ways
    else fail gpu.fake_sample_both_ways "cpu: $a | cuda: $b | cpu from cuda: $c | $(tail -3 smp.err)"; fi
    # every kind of example takes the device path of the runtime (arenas,
    # copies, fp16 loss scaling, routing, checkpoints from device memory)
    # to the CPU's losses and checkpoint, bit for bit
    sed 's/precision = bf16/precision = fp16/' "$ROOT/examples/tiny_moe_bf16.moe" > tiny_moe_f16.moe
    for src in "$ROOT"/examples/{tiny_moe_bf16,deepseek_like,mixtral_like,switch,tiny_gelu}.moe tiny_moe_f16.moe; do
        n=$(basename "$src" .moe)
        args=("$n.bin" --data data.txt --steps 6 -q --no-graph)
        if ! "$MOEC" --stdlib "${MOEC_STDLIB:-$ROOT/stdlib}" "$src" -o "$n.bin" > "$n.moec.log" 2>&1; then
            fail "gpu.fake_$n" "$(tail -3 "$n.moec.log")"; continue
        fi
        MOEC_KERNELS=$B "$RUN" "${args[@]}" --device cpu --metrics "$n.c.jsonl" --checkpoint "$n.c.st" > /dev/null 2>&1
        if MOEC_KERNELS=$TMP/fake "$RUN" "${args[@]}" --device cuda --metrics "$n.f.jsonl" --checkpoint "$n.f.st" > "$n.f.err" 2>&1 &&
           [ -s "$n.c.jsonl" ] && [ "$(losses "$n.c.jsonl")" = "$(losses "$n.f.jsonl")" ] && cmp -s "$n.c.st" "$n.f.st"; then
            pass "gpu.fake_${n}_eq_cpu"
        else fail "gpu.fake_${n}_eq_cpu" "$(tail -2 "$n.f.err") $(diff <(losses "$n.c.jsonl") <(losses "$n.f.jsonl") | head -3)"; fi
    done
    # sync fails at the 3rd call (step 3), and again in the eager re-run: op 0
    expect_fail gpu.sync_error_names_step_and_op \
        '^run: step 3: stand-in: a kernel found bad data, first raised by op [0-9]+ \([^,]+, .*\.moe:[0-9]+:[0-9]+\); check the data and the model$' \
        env MOEC_KERNELS="$TMP/fake" STANDIN_SYNC_FAIL_AT=3 "$RUN" "${common[@]}" --device cuda --metrics "" --checkpoint s.st -q
fi

# ---- part 2: the real GPU (or the library GPU_TRAIN_KERNELS names) ---------
K=${GPU_TRAIN_KERNELS:-$B}
G=${GPU_TRAIN_LABEL:+$GPU_TRAIN_LABEL.}gpu
S=${GPU_TRAIN_STEPS:-20}
H=$((S / 2))
probe=$(MOEC_KERNELS=$K "$RUN" tiny_dense.bin --data data.txt --device cuda --steps 0 --metrics "" --checkpoint probe.st -q 2>&1)
if [ $? -ne 0 ]; then
    why=$(sed -nE 's/.*cannot use device cuda: ([^;]*);.*/\1/p' <<<"$probe")
    if [ -n "${GPU_TRAIN_KERNELS:-}" ]; then fail $G.train "cannot use $K: ${why:-$probe}"; exit 0; fi
    skip gpu.train "no GPU: ${why:-$probe}"; exit 0
fi
export MOEC_KERNELS=$K
for m in tiny_dense tiny_moe; do
    r() { "$RUN" "$m.bin" --data data.txt -q "$@" > /dev/null 2>> "$m.err" || { echo "exit $? from: run $m.bin $*" >> "$m.err"; return 1; }; }
    r --device cpu --steps $S --metrics "$m.cpu.jsonl" --checkpoint "$m.cpu.st" &&
    r --device cuda --steps $S --metrics "$m.graph.jsonl" --checkpoint "$m.graph.st" &&
    r --device cuda --steps $S --no-graph --metrics "$m.eager.jsonl" --checkpoint "$m.eager.st" &&
    r --device cuda --steps $H --metrics "$m.res.jsonl" --checkpoint "$m.res.st" &&
    r --device cuda --steps $S --resume "$m.res.st" --metrics "$m.res.jsonl" --checkpoint "$m.res.st"
    if [ $? -ne 0 ]; then fail "$G.$m" "a run failed: $(tail -3 "$m.err")"; continue; fi
    worst=$(paste <(losses "$m.cpu.jsonl") <(losses "$m.graph.jsonl") |
            awk '{d=$2-$4; if(d<0)d=-d; r=d/($2<0?-$2:$2); if(r>w)w=r; n++} END{printf "%d %.3g", n, w}')
    read -r n w <<<"$worst"
    echo "info: $m loss cpu/cuda at steps 1, $H, $S: $(paste <(losses "$m.cpu.jsonl") <(losses "$m.graph.jsonl") | sed -n "1p;${H}p;${S}p" | awk '{printf "%s %s/%s; ", $1, $2, $4}')"
    if [ "$n" -eq "$S" ] && awk -v w="$w" 'BEGIN{exit !(w <= 1e-4)}'; then
        pass "$G.${m}_cuda_vs_cpu ($S steps, max rel loss diff $w)"
    else fail "$G.${m}_cuda_vs_cpu" "$n steps, max rel loss diff $w > 1e-4"; fi
    if [ "$(losses "$m.graph.jsonl")" = "$(losses "$m.eager.jsonl")" ] && cmp -s "$m.graph.st" "$m.eager.st"; then
        pass "$G.${m}_graph_equals_eager"
    else fail "$G.${m}_graph_equals_eager" "$(diff <(losses "$m.graph.jsonl") <(losses "$m.eager.jsonl") | head -4)"; fi
    if [ "$(losses "$m.graph.jsonl")" = "$(losses "$m.res.jsonl")" ] && cmp -s "$m.graph.st" "$m.res.st"; then
        pass "$G.${m}_resume_exact"
    else fail "$G.${m}_resume_exact" "$(diff <(losses "$m.graph.jsonl") <(losses "$m.res.jsonl") | head -4)"; fi
done
# mixed precision: the same plan on cuda and cpu (both bf16 or fp16 storage
# with fp32 accumulation; only summation order differs) within 1e-2
# relative loss at each of 20 steps, dense and MoE
sed 's/precision = fp32/precision = bf16/' "$ROOT/examples/tiny_dense.moe" > td_bf16.moe
sed 's/precision = bf16/precision = fp16/' "$ROOT/examples/tiny_moe_bf16.moe" > tm_fp16.moe
cp "$ROOT/examples/tiny_moe_bf16.moe" tm_bf16.moe
# GELU MLPs: the linear + bias + GELU GEMMs with cuBLASLt epilogues
sed 's/precision = fp32/precision = bf16/' "$ROOT/examples/tiny_gelu.moe" > tg_bf16.moe
for m in td_bf16 tm_bf16 tm_fp16 tg_bf16; do
    "$MOEC" --stdlib "${MOEC_STDLIB:-$ROOT/stdlib}" "$m.moe" -o "$m.bin" > "$m.moec.log" 2>&1 ||
        { fail "$G.${m}_cuda_vs_cpu" "$(tail -3 "$m.moec.log")"; continue; }
    for d in cpu cuda; do
        "$RUN" "$m.bin" --data data.txt -q --device $d --steps $S --metrics "$m.$d.jsonl" --checkpoint "" \
            > /dev/null 2>> "$m.err" || echo "exit $? on $d" >> "$m.err"
    done
    worst=$(paste <(losses "$m.cpu.jsonl") <(losses "$m.cuda.jsonl") |
            awk '{d=$2-$4; if(d<0)d=-d; r=d/($2<0?-$2:$2); if(r>w)w=r; n++} END{printf "%d %.3g", n, w}')
    read -r n w <<<"$worst"
    if [ "$n" -eq "$S" ] && awk -v w="$w" 'BEGIN{exit !(w <= 1e-2)}'; then
        pass "$G.${m}_cuda_vs_cpu ($S steps, max rel loss diff $w)"
    else fail "$G.${m}_cuda_vs_cpu" "$n steps, max rel loss diff $w > 1e-2: $(tail -3 "$m.err")"; fi
done
# a checkpoint trained on one device samples on the other: greedy text of
# the fp32 model equal (logits differ by float rounding only)
greedy() { "$RUN" tiny_moe.bin --device "$1" --sample --checkpoint "$2" --prompt "The " --tokens 32 \
               --temperature 0 --seed 1 2>> greedy.err; }
for from in cpu graph; do
    a=$(greedy cpu "tiny_moe.$from.st"); ra=$?; b=$(greedy cuda "tiny_moe.$from.st"); rb=$?
    if [ $ra -eq 0 ] && [ $rb -eq 0 ] && [ "$(tail -1 <<<"$a" | wc -c)" -ge 32 ] && [ "$a" = "$b" ]; then
        pass "$G.sample_from_${from}_checkpoint"
    else fail "$G.sample_from_${from}_checkpoint" "cpu (exit $ra): $a | cuda (exit $rb): $b | $(tail -3 greedy.err)"; fi
done
out=$("$RUN" tiny_moe.bin --data data.txt --device cuda --steps 3 --metrics "" --checkpoint cap.st 2>&1)
if grep -q '^run: captured the forward\.\.backward phases as a CUDA graph ([0-9]* ops); replaying it$' <<<"$out" &&
   grep -q '^run: captured the optimizer phase as a CUDA graph' <<<"$out"; then
    pass $G.graph_captured; else fail $G.graph_captured "$out"; fi
