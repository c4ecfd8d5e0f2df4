#!/usr/bin/env bash
# Every bad input under tests/golden/diag/NAME.moe must make moec exit 1 and
# print exactly NAME.err (paths relative to the repository root).
# UPDATE=1 bash tests/cli/test_diagnostics.sh rewrites the goldens.
source "$(dirname "$0")/../lib.sh"
cd "$ROOT" || exit 1
n=0
for src in tests/golden/diag/*.moe; do
    name=$(basename "$src" .moe)
    want=tests/golden/diag/$name.err
    "$MOEC" --stdlib stdlib -o "$TMP/plan.bin" "$src" 2>"$TMP/$name.err" >/dev/null
    rc=$?
    [ "${UPDATE:-0}" = 1 ] && cp "$TMP/$name.err" "$want"
    n=$((n + 1))
    if [ $rc -ne 1 ]; then fail "diag_$name" "exit $rc, want 1"; continue; fi
    if [ ! -f "$want" ]; then fail "diag_$name" "no golden $want"; continue; fi
    expect_same "diag_$name" "$want" "$TMP/$name.err"
done
if [ "$n" -ge 40 ]; then pass "diag_count_at_least_40"; else fail "diag_count_at_least_40" "only $n bad inputs"; fi
