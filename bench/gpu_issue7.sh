#!/usr/bin/env bash
# Issue 7 benchmark: moec vs PyTorch on the same GPU, same models
# (bench/models/*.moe and their twins in bench/torch_issue7.py), same batch,
# sequence length and precision (bf16), in one call; prints one table.
#
# It builds nothing on the GPU machine.  Prepare on the build machine:
#   bash bench/gpu_issue7.sh --prepare     # make BUILD=build-i7 moec, run, libmoek_cuda.so
# then carry build-i7 (build-i7/bin/moec, build-i7/bin/run,
# build-i7/libmoek_cuda.so; stdlib/ and bench/ are tracked and travel anyway)
# and run there:
#   bash bench/gpu_issue7.sh --out "$OUT"
#
# For each model: ./run --device cuda (warm-up + timed steps; ms/step is the
# median of the metrics JSONL's "ms" over the timed steps), then PyTorch:
# dense model: eager and torch.compile; MoE models: the per-expert loop
# (Hugging Face Mixtral style), grouped (sorted tokens + torch._grouped_mm)
# eager, and grouped + torch.compile.  Peak GPU memory: the largest
# nvidia-smi memory.used during the run minus the idle reading before it
# (same method for both; the runtime reports only its pool bytes, which are
# listed too, as is torch's max_memory_allocated).
#
# Options:
#   --steps N (20)  timed steps     --warmup W (3)  untimed first steps
#   --batch B (8)   sequences/step  --models "gpt2_124m moe_gpt2s moe_fine"
#   --data SHARD    llm.c uint16 token shard for both sides (default: a
#                   synthetic shard of uniform random ids, written here)
#   --budget S (540)  stop starting runs when S seconds have passed; runs
#                   are ordered so the ones that matter most go first
#   --no-compile    skip the torch.compile variants
#   --tiny          d 64, 2 layers, seq 64, vocab 512 (a CPU check of the
#                   whole script:  bash bench/gpu_issue7.sh --tiny --device cpu)
#   --device cuda|cpu (cuda)   --out DIR (a temp dir)   --prepare
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
I7=${I7_BUILD:-$ROOT/build-i7}
STEPS=20 WARMUP=3 BATCH=8 MODELS="moe_gpt2s gpt2_124m moe_fine" DATA="" BUDGET=540
COMPILE=1 TINY=0 DEVICE=cuda OUTDIR=""
PY=${PYTHON:-}
if [ -z "$PY" ]; then   # the first python3 that has torch (pyenv shims may shadow Debian's)
    for p in python3 /usr/bin/python3; do
        if "$p" -c "import torch" 2> /dev/null; then PY=$p; break; fi
    done
    PY=${PY:-python3}
fi
while [ $# -gt 0 ]; do
    case $1 in
        --steps) STEPS=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --batch) BATCH=$2; shift ;;
        --models) MODELS=$2; shift ;;
        --data) DATA=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --no-compile) COMPILE=0 ;;
        --tiny) TINY=1 ;;
        --device) DEVICE=$2; shift ;;
        --out) OUTDIR=$2; shift ;;
        --prepare)
            cd "$ROOT" && make -j2 BUILD=build-i7 MOEC_BIN=build-i7/bin/moec RUN_BIN=build-i7/bin/run \
                build-i7/bin/moec build-i7/bin/run build-i7/libmoek_cuda.so || exit 1
            echo "carry: build-i7   (commit $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo ', dirty tree'))"
            exit 0 ;;
        *) echo "usage: bash bench/gpu_issue7.sh [--steps N] [--warmup W] [--batch B] [--models LIST] [--data SHARD] [--budget S] [--no-compile] [--tiny] [--device cuda|cpu] [--out DIR] | --prepare" >&2
           exit 2 ;;
    esac
    shift
done
MOEC=${MOEC:-$I7/bin/moec}
RUN=${RUN:-$I7/bin/run}
KDIR=${MOEC_KERNELS:-$I7}
[ "$DEVICE" = cpu ] && [ ! -e "$KDIR/libmoek_cpu.so" ] && KDIR=$ROOT/build
for f in "$MOEC" "$RUN" "$KDIR/libmoek_$DEVICE.so"; do
    [ -e "$f" ] || { echo "gpu_issue7: missing $f; run bash bench/gpu_issue7.sh --prepare and carry build-i7" >&2; exit 1; }
done
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
OUTDIR=${OUTDIR:-$W}
mkdir -p "$OUTDIR"
RES=$OUTDIR/issue7_results.jsonl
: > "$RES"
# checkpoints (up to ~18 bytes/param) go to RAM when there is room
SCR=$W
if [ -d /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 25000000 ] 2>/dev/null; then
    SCR=$(mktemp -d /dev/shm/i7.XXXXXX); trap 'rm -rf "$W" "$SCR"' EXIT
fi
HAVE_SMI=0
[ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null && HAVE_SMI=1
if [ $HAVE_SMI = 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
else
    GPU=cpu
fi
echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)  $(date -u +%Y-%m-%dT%H:%MZ)  steps $STEPS (+$WARMUP warm-up)  batch $BATCH  tiny $TINY"
"$PY" -c 'import torch; print("torch", torch.__version__, "grouped_mm:", hasattr(torch, "_grouped_mm"), "compile:", hasattr(torch, "compile"))'

# ---- data: one shard for both sides --------------------------------------
if [ -z "$DATA" ]; then
    DATA=$W/synthetic_u16.bin
    V=50257; [ $TINY = 1 ] && V=512
    "$PY" - "$DATA" "$V" <<'PY'
import array, random, sys
n, v = 1 << 21, int(sys.argv[2])
r = random.Random(1)
hdr = array.array("i", [20240520, 1, n] + [0] * 253)
tok = array.array("H", (r.randrange(v) for _ in range(n)))
with open(sys.argv[1], "wb") as f:
    hdr.tofile(f); tok.tofile(f)
PY
    echo "data: synthetic llm.c uint16 shard, 2^21 uniform random ids < $V (speed only; losses are meaningless)"
else
    echo "data: $DATA"
fi

# ---- helpers -------------------------------------------------------------
SMI_PID=""
smi_start() {   # idle reading, then poll memory.used every 100 ms
    [ $HAVE_SMI = 1 ] || return 0
    SMI_BASE=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$W/smi.log" 2>/dev/null &
    SMI_PID=$!
}
smi_stop() {    # prints the peak above the idle reading, in MiB
    [ -n "$SMI_PID" ] || { echo '""'; return 0; }
    kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; SMI_PID=""
    awk -v b="$SMI_BASE" '$1 + 0 > m {m = $1 + 0} END {print (m > b ? m - b : 0)}' "$W/smi.log"
}
left() { echo $((BUDGET - SECONDS)); }
error_row() {   # model impl message
    printf '{"model":"%s","impl":"%s","error":"%s"}\n' "$1" "$2" "$(echo "$3" | tr -d '"\\' | cut -c1-160)" >> "$RES"
    echo "  $2: $3"
}
model_src() {   # the .moe, shrunk for --tiny and set to --batch
    local src=$ROOT/bench/models/$1.moe dst=$W/$1.moe
    if [ $TINY = 1 ]; then
        sed -e 's/vocab = 50304/vocab = 512/; s/d_model = 768/d_model = 64/; s/heads = 12/heads = 4/' \
            -e 's/layers = 12/layers = 2/; s/seq = 1024/seq = 64/; s/d_ff = 3072/d_ff = 256/' \
            -e 's/d_ff = 2048/d_ff = 128/; s/d_expert = 512/d_expert = 32/' "$src"
    else
        cat "$src"
    fi | sed -E "s/^(  batch = )[0-9]+/\1$BATCH/" > "$dst"
    echo "$dst"
}

run_moec() {    # model
    local m=$1 src plan ex rc ms bt
    src=$(model_src "$m"); plan=$W/$m.plan
    ex=$W/$m.explain
    if ! "$MOEC" --stdlib "$ROOT/stdlib" "$src" -o "$plan" > "$W/moec.log" 2>&1 ||
       ! "$MOEC" --stdlib "$ROOT/stdlib" --explain "$src" > "$ex" 2>&1; then
        error_row "$m" moec "moec failed: $(tail -1 "$W/moec.log")"; return
    fi
    cp "$ex" "$OUTDIR/$m.explain.txt"
    bt=$("$RUN" --inspect "$plan" | sed -nE 's/^train: batch ([0-9]+), seq ([0-9]+), grad_accum ([0-9]+).*/\1 \2 \3/p')
    local cap=180; [ "$(left)" -lt $cap ] && cap=$(left)
    if [ "$cap" -lt 30 ]; then error_row "$m" moec "skipped: time budget ($BUDGET s) spent"; return; fi
    smi_start
    MOEC_KERNELS=$KDIR timeout "$cap" "$RUN" "$plan" --device "$DEVICE" \
        --steps $((WARMUP + STEPS)) --data "$DATA" --metrics "$W/$m.jsonl" \
        --checkpoint "$SCR/$m.ck" > "$W/$m.run.log" 2>&1
    rc=$?
    local peak; peak=$(smi_stop)
    rm -f "$SCR/$m.ck" "$SCR/$m.ck.tmp"
    [ "$W" -ef "$OUTDIR" ] || cp "$W/$m.run.log" "$OUTDIR/$m.run.log"; cp "$W/$m.jsonl" "$OUTDIR/$m.moec.jsonl" 2>/dev/null
    local done_steps; done_steps=$(grep -c '"step"' "$W/$m.jsonl" 2>/dev/null); done_steps=${done_steps:-0}
    if [ "$done_steps" -le "$WARMUP" ]; then   # no timed step: report why
        [ $rc = 124 ] && error_row "$m" moec "timeout after $cap s ($done_steps steps)" ||
            error_row "$m" moec "run rc $rc: $(grep -v '^step' "$W/$m.run.log" | tail -1)"
        return
    fi
    sed -nE 's/^\{"step":([0-9]+),"loss":([^,]+),.*"ms":([0-9.]+).*/\1 \2 \3/p' "$W/$m.jsonl" |
    awk -v w="$WARMUP" -v bt="$bt" -v m="$m" -v dev="$GPU" -v peak="$peak" -v rc="$rc" \
        -v params="$(awk '/^  total +[0-9]+$/ {print $2; exit}' "$ex")" \
        -v active="$(awk '/active per token/ {print $4; exit}' "$ex")" \
        -v fpt="$(awk '/^  total +[0-9]+ +\(forward/ {print $2; exit}' "$ex")" \
        -v emib="$(awk '/^  total +[0-9]+ +[0-9.]+ MiB/ {print $3; exit}' "$ex")" \
        -v wmib="$(awk -v d="on $DEVICE" '/^  workspace +[0-9]+/ && index($0, d) {print $3; exit}' "$ex")" \
        -v pools="$(sed -nE 's/^run: allocated .* total ([0-9]+) bytes.*/\1/p' "$W/$m.run.log")" '
        NR == 1 {l0 = $2}
        {ll = $2}
        $1 > w {t[++n] = $3}
        END {
            split(bt, b, " ")
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (t[j] < t[i]) {x = t[i]; t[i] = t[j]; t[j] = x}
            ms = (n % 2) ? t[(n + 1) / 2] : (t[n / 2] + t[n / 2 + 1]) / 2
            tok = b[1] * b[2] * b[3]; tps = tok / ms * 1000
            printf "{\"model\":\"%s\",\"impl\":\"moec\",\"device\":\"%s\",\"dtype\":\"bf16\",\"batch\":%d,\"seq\":%d,", m, dev, b[1], b[2]
            printf "\"steps\":%d,\"warmup\":%d,\"ms\":%.3f,\"tok_s\":%.1f,\"ms_min\":%.3f,\"ms_max\":%.3f,", n, w, ms, tps, t[1], t[n]
            printf "\"params\":%d,\"active\":%d,\"flops_per_token\":%d,\"mfu\":%.4f,", params, active, fpt, tps * fpt / 989e12
            printf "\"loss_first\":%.4f,\"loss_last\":%.4f,\"smi_peak_mib\":%s,\"pools_mib\":%.1f,", l0, ll, peak == "" ? "\"\"" : peak, pools / 1048576
            printf "\"explain_mib\":%s,\"explain_workspace_mib\":%s,\"run_rc\":%d}\n", emib, wmib, rc
        }' >> "$RES"
    tail -1 "$RES" | cut -c1-200
}

run_torch() {   # model variant [--compile]
    local m=$1 v=$2 c=${3:-} impl cap rc peak
    impl=torch-$v${c:++compile}
    cap=150; [ -n "$c" ] && cap=240
    [ "$(left)" -lt "$cap" ] && cap=$(left)
    if [ "$cap" -lt 30 ]; then error_row "$m" "$impl" "skipped: time budget ($BUDGET s) spent"; return; fi
    local tiny=""; [ $TINY = 1 ] && tiny=--tiny
    rm -f "$W/t.jsonl"
    smi_start
    PYTHONUNBUFFERED=1 timeout "$cap" "$PY" "$ROOT/bench/torch_issue7.py" --model "$m" --variant "$v" $c $tiny \
        --steps "$STEPS" --warmup "$WARMUP" --batch "$BATCH" --device "$DEVICE" --data "$DATA" \
        --out "$W/t.jsonl" > "$W/t.log" 2>&1
    rc=$?
    peak=$(smi_stop)
    cp "$W/t.log" "$OUTDIR/$m.$impl.log"
    if [ $rc != 0 ] || [ ! -s "$W/t.jsonl" ]; then
        [ $rc = 124 ] && error_row "$m" "$impl" "timeout after $cap s" ||
            error_row "$m" "$impl" "rc $rc: $(grep -v '^ *$' "$W/t.log" | tail -1)"
        return
    fi
    sed "s/^{/{\"smi_peak_mib\": ${peak:-\"\"}, /" "$W/t.jsonl" >> "$RES"
    tail -1 "$RES" | cut -c1-200
}

# ---- the runs, most important first ---------------------------------------
for m in $MODELS; do
    echo "== $m: moec"
    run_moec "$m"
done
for m in $MODELS; do
    case $m in gpt2_124m) run_torch "$m" dense ;; *) run_torch "$m" loop; run_torch "$m" grouped ;; esac
done
if [ $COMPILE = 1 ]; then
    for m in $MODELS; do
        case $m in gpt2_124m) run_torch "$m" dense --compile ;; *) run_torch "$m" grouped --compile ;; esac
    done
fi
echo
echo "== issue 7: $GPU, bf16, batch $BATCH, $STEPS timed steps after $WARMUP warm-up, $SECONDS s in all"
"$PY" "$ROOT/bench/torch_issue7.py" --table "$RES" | tee "$OUTDIR/issue7_table.md"
