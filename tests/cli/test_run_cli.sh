#!/usr/bin/env bash
# ./run end to end on a hand-built plan (written by test_runtime_train
# --fixture with its own kernel library): training output and metrics,
# --inspect, sampling, SIGINT, and the command-line errors.
source "$(dirname "$0")/../lib.sh"
FIX=""
for b in ${MOEC_BUILD:-} build build-rt; do
    if [ -x "$ROOT/$b/tests/test_runtime_train" ]; then FIX="$ROOT/$b/tests/test_runtime_train"; break; fi
done
if [ -z "$FIX" ] || [ ! -x "$RUN" ]; then
    skip run.cli "build ./run and tests/test_runtime_train first"; exit 0
fi
if ! "$FIX" --fixture "$TMP"; then skip run.cli "could not build the fixture (no C compiler?)"; exit 0; fi
export MOEC_KERNELS=$TMP
cd "$TMP"

out=$("$RUN" plan.bin --data data.txt --steps 12 2>&1); rc=$?
if [ $rc -eq 0 ]; then pass run.train; else fail run.train "exit $rc: $out"; fi
if echo "$out" | grep -Eq '^step 12/12 \| loss [0-9]+\.[0-9]{4} \| lr [0-9.]+e[-+][0-9]+ \| norm [0-9.]+ \| [0-9.]+k tok/s \| [0-9.]+ ms \| eta 0:00 \| half_loss [0-9.]+$'; then
    pass run.step_line; else fail run.step_line "$out"; fi
if echo "$out" | grep -q '^run: device cpu: loaded .*/libmoek_cpu.so$'; then pass run.loaded_line; else fail run.loaded_line "$out"; fi
if echo "$out" | grep -q '^run: allocated param 262144, grad 262144, optstate 524288, act 295108, input 196, buffer 0, total 1343880 bytes (exactly the plan.s pools)$'; then
    pass run.allocated_line; else fail run.allocated_line "$out"; fi
if echo "$out" | grep -Eq '^eval step 10 \| val loss [0-9.]+$'; then pass run.eval_line; else fail run.eval_line "$out"; fi
if [ "$(wc -l < metrics.jsonl)" -eq 12 ] && head -1 metrics.jsonl | grep -q '^{"step":1,"loss":'; then
    pass run.metrics; else fail run.metrics "$(head -3 metrics.jsonl)"; fi
if [ -f checkpoint.safetensors ] && [ ! -e checkpoint.safetensors.tmp ]; then pass run.checkpoint; else fail run.checkpoint "no checkpoint"; fi

out=$("$RUN" --sample plan.bin --checkpoint checkpoint.safetensors --prompt "ab" --tokens 6 --temperature 0 2>/dev/null)
if [ "$out" = "abcabcab" ]; then pass run.sample; else fail run.sample "got '$out'"; fi
out=$("$RUN" plan.bin --sample --resume checkpoint.safetensors --prompt "c" --tokens 3 --temperature 0 -q 2>&1)
if [ "$out" = "cabc" ]; then pass run.sample_resume_flag; else fail run.sample_resume_flag "got '$out'"; fi

out=$("$RUN" --inspect plan.bin); rc=$?
if [ $rc -eq 0 ] && echo "$out" | grep -q '^  2 backward  moek_cross_entropy_bwd(loss_seed, logits, targets, lse, logits.grad, 16, 256)  # cross_entropy (backward) at test.moe:5:3$'; then
    pass run.inspect; else fail run.inspect "$out"; fi

# resume continues from step 12 and appends to the metrics
"$RUN" plan.bin --data data.txt --steps 14 --resume checkpoint.safetensors -q >/dev/null 2>&1
if [ "$(wc -l < metrics.jsonl)" -eq 14 ] && tail -1 metrics.jsonl | grep -q '^{"step":14,'; then
    pass run.resume; else fail run.resume "$(tail -2 metrics.jsonl)"; fi

# Ctrl-C: finish the step, save, exit 0
"$RUN" plan.bin --data data.txt --steps 100000000 --checkpoint int.safetensors --metrics int.jsonl > int.out 2>&1 &
pid=$!
for i in $(seq 50); do [ -s int.jsonl ] && break; sleep 0.1; done
kill -INT $pid; wait $pid; rc=$?
if [ $rc -eq 0 ] && grep -q '^run: interrupted after step [0-9]*; saved int.safetensors (resume with --resume int.safetensors)$' int.out && [ -f int.safetensors ]; then
    pass run.sigint; else fail run.sigint "exit $rc: $(tail -3 int.out)"; fi

# errors
expect_fail run.no_plan '^run: no plan given' "$RUN"
expect_fail run.bad_option '^run: unknown option --bogus' "$RUN" --bogus plan.bin
"$RUN" 2>/dev/null; [ $? -eq 2 ] && pass run.usage_exit2 || fail run.usage_exit2 "not exit 2"
expect_fail run.bad_value "^run: bad value 'x' for --steps" "$RUN" plan.bin --steps x
expect_fail run.missing_value '^run: --data needs a value' "$RUN" plan.bin --data
cp plan.bin bad.bin; printf 'X' | dd of=bad.bin bs=1 seek=300 conv=notrunc 2>/dev/null
expect_fail run.corrupt '^run: bad.bin: corrupt: checksum mismatch; recompile the model with moec$' "$RUN" bad.bin
head -c 100 plan.bin > short.bin
expect_fail run.truncated '^run: short.bin: truncated: 100 bytes, the header needs' "$RUN" short.bin
echo "hello" > foreign.bin
expect_fail run.foreign '^run: foreign.bin: not a moec plan' "$RUN" --inspect foreign.bin
expect_fail run.nofile '^run: nope.bin: cannot open: No such file' "$RUN" nope.bin
expect_fail run.cuda '^run: plan.bin: cannot use device cuda' "$RUN" plan.bin --device cuda
expect_fail run.data_missing '^run: nothere.txt: cannot open data file' "$RUN" plan.bin --data nothere.txt
expect_fail run.resume_missing '^run: x.safetensors: cannot open checkpoint' "$RUN" plan.bin --data data.txt --resume x.safetensors
head -c 5000 checkpoint.safetensors > cut.safetensors
expect_fail run.resume_truncated "cut.safetensors: tensor 'bigram.weight' data .* does not fit" "$RUN" plan.bin --data data.txt --resume cut.safetensors
# the plan names no data file: the default corpus next to ./run
rundir=$(dirname "$RUN")   # where run looks: runtime/train.c default_corpus
if [ -f "$rundir/build/data/default.txt" ] || [ -f "$rundir/data/default.txt" ] ||
   [ -f "$rundir/../share/moec/default.txt" ]; then
    expect_ok run.default_corpus "$RUN" plan.bin --steps 1 --metrics "" --checkpoint "$TMP/d.safetensors"
else
    expect_fail run.default_corpus 'the default corpus is missing .*; run make, or pass --data FILE' "$RUN" plan.bin --steps 1
fi
# --checkpoint "" trains without writing a checkpoint (like --metrics "")
mkdir -p nockpt && (cd nockpt && "$RUN" ../plan.bin --data ../data.txt --steps 2 --metrics "" --checkpoint "" > out.txt 2>&1)
if [ $? -eq 0 ] && [ -z "$(ls nockpt | grep -v out.txt)" ] && ! grep -q "saved" nockpt/out.txt; then
    pass run.checkpoint_none
else
    fail run.checkpoint_none "rc or files: $(ls nockpt) $(tail -3 nockpt/out.txt)"
fi
# --memory-report: the kernel's count of what the run made resident covers
# the plan's pools (zeroed, so resident) and not much more: no 64 MiB default
# workspace on the CPU, no cuBLAS loaded to learn there is no GPU driver
out=$("$RUN" plan.bin --data data.txt --steps 2 --metrics "" --checkpoint "" -q --memory-report 2>&1)
line=$(echo "$out" | grep -E '^run: rank 0 memory: peak resident [0-9.]+ MiB = [0-9.]+ MiB before the plan \+ [0-9.]+ MiB after; the plan.s pools [0-9.]+ MiB$')
if [ -z "$line" ]; then
    fail run.memory_report "no report line: $out"
else
    after=$(echo "$line" | sed -E 's/.* \+ ([0-9.]+) MiB after.*/\1/')
    pools=$(echo "$line" | sed -E 's/.*pools ([0-9.]+) MiB$/\1/')
    if awk -v a="$after" -v p="$pools" 'BEGIN { exit !(a >= p && a <= p + 24) }'; then
        pass run.memory_report
    else
        fail run.memory_report "resident growth $after MiB for pools of $pools MiB: $line"
    fi
fi
