#!/usr/bin/env bash
# A short libFuzzer run of the plan reader (tools/plan_fuzz.c), seeded with
# a valid plan; MOEC_FUZZ_SECONDS sets its length (default 20).
source "$(dirname "$0")/../lib.sh"
if ! command -v clang >/dev/null; then skip run.fuzz "clang not installed"; exit 0; fi
FIX=""
for b in ${MOEC_BUILD:-} build build-rt; do
    if [ -x "$ROOT/$b/tests/test_runtime_train" ]; then FIX="$ROOT/$b/tests/test_runtime_train"; break; fi
done
if ! clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -I"$ROOT/runtime" \
        "$ROOT/tools/plan_fuzz.c" "$ROOT/runtime/plan_load.c" "$ROOT/runtime/inspect.c" -lm \
        -o "$TMP/plan_fuzz" 2>"$TMP/cc.log"; then
    skip run.fuzz "clang cannot build a libFuzzer binary: $(head -3 "$TMP/cc.log")"; exit 0
fi
mkdir -p "$TMP/corpus" "$TMP/fix"
[ -n "$FIX" ] && "$FIX" --fixture "$TMP/fix" >/dev/null 2>&1 && cp "$TMP/fix/plan.bin" "$TMP/corpus/"
cd "$TMP"
if ./plan_fuzz -max_total_time="${MOEC_FUZZ_SECONDS:-20}" -rss_limit_mb=1024 corpus > fuzz.log 2>&1; then
    pass run.fuzz
else
    fail run.fuzz "$(grep -E 'ERROR|SUMMARY|runtime error' fuzz.log | head -5)"
fi
