#!/usr/bin/env bash
# Short libFuzzer runs (20 s each) of the parser+elaborator harness and the
# plan reader harness, built with ASan and UBSan.  PASS when neither crashes;
# FAIL names the crash file (rerun it: build/fuzz/fuzz_parser FILE).  SKIP
# when clang or its libFuzzer runtime (libclang-rt-14-dev) is missing.
# Longer runs: docs/fuzzing.md.
source "$(dirname "$0")/../lib.sh"
cd "$ROOT" || exit 1
CLANG=${CLANG:-clang}
FUZZ_DIR=${FUZZ_DIR:-$ROOT/${MOEC_BUILD:-build}/fuzz}
SECS=${FUZZ_SECONDS:-20}

if ! command -v "$CLANG" >/dev/null 2>&1; then
    skip fuzz "no $CLANG (scripts/setup installs clang and libclang-rt-14-dev)"
    exit 0
fi
printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' >"$TMP/probe.c"
if ! "$CLANG" -fsanitize=fuzzer,address,undefined -o "$TMP/probe" "$TMP/probe.c" >"$TMP/probe.log" 2>&1; then
    skip fuzz "$CLANG cannot link -fsanitize=fuzzer (install libclang-rt-14-dev): $(head -1 "$TMP/probe.log")"
    exit 0
fi

if ! bash tests/fuzz/fuzz.sh -b "$FUZZ_DIR" -t 0 >"$TMP/build.log" 2>&1; then
    fail fuzz_build "$(tail -15 "$TMP/build.log")"
    exit 0
fi
pass fuzz_build

# the plan harness's own seed must validate (it exits 1 if plan_parse rejects it)
if MOEC_FUZZ_WRITE_SEED="$TMP/seed.bin" "$FUZZ_DIR/fuzz_plan" >"$TMP/seed.log" 2>&1 && [ -s "$TMP/seed.bin" ]; then
    pass fuzz_plan_builtin_seed_validates
else
    fail fuzz_plan_builtin_seed_validates "$(cat "$TMP/seed.log")"
fi

for t in parser plan; do
    out=$(bash tests/fuzz/fuzz.sh -b "$FUZZ_DIR" -t "$SECS" "$t" 2>&1)
    if grep -q '^CRASH ' <<<"$out"; then
        fail "fuzz_$t" "$(grep '^CRASH ' <<<"$out") - reproduce with: $FUZZ_DIR/fuzz_$t FILE; $(grep -v '^CRASH' <<<"$out" | grep -E 'ERROR|runtime error|SUMMARY' | head -3)"
        continue
    fi
    # a run that executed (almost) nothing proves nothing
    execs=$(grep -Eo 'stat::number_of_executed_units: [0-9]+' "$FUZZ_DIR/fuzz_$t.log" | grep -Eo '[0-9]+$')
    if [ "${execs:-0}" -lt 1000 ]; then
        fail "fuzz_$t" "only ${execs:-0} inputs ran in ${SECS}s: $(tail -5 "$FUZZ_DIR/fuzz_$t.log")"
    else
        pass "fuzz_$t"
        echo "fuzz_$t: $execs inputs, no crash"
    fi
done
