#!/usr/bin/env bash
# moec's command line: examples compile, --dump=ast goldens, usage errors
# exit 2, parameter and FLOP counts equal hand counts.
source "$(dirname "$0")/../lib.sh"
cd "$ROOT" || exit 1
M() { "$MOEC" --stdlib stdlib "$@"; }

for ex in tiny_dense tiny_moe; do
    expect_ok "compile_$ex" M -o "$TMP/$ex.bin" examples/$ex.moe
    if [ -s "$TMP/$ex.bin" ]; then pass "plan_written_$ex"; else fail "plan_written_$ex" "no plan"; fi
    M --dump=ast examples/$ex.moe >"$TMP/$ex.ast" 2>&1
    [ "${UPDATE:-0}" = 1 ] && cp "$TMP/$ex.ast" tests/golden/ast/$ex.ast
    expect_same "dump_ast_$ex" tests/golden/ast/$ex.ast "$TMP/$ex.ast"
done
M --dump=ast stdlib/nn.moe >"$TMP/nn.ast" 2>&1
[ "${UPDATE:-0}" = 1 ] && cp "$TMP/nn.ast" tests/golden/ast/nn.ast
expect_same "dump_ast_stdlib_nn" tests/golden/ast/nn.ast "$TMP/nn.ast"

# hand counts (see tests/unit/test_elab.c for the arithmetic)
out=$(M --explain examples/tiny_moe.moe 2>&1)
if echo "$out" | grep -Eq 'total +262976'; then pass "explain_moe_params"; else fail "explain_moe_params" "$out"; fi
if echo "$out" | grep -Eq 'active per token +164672'; then pass "explain_moe_active"; else fail "explain_moe_active" "$out"; fi

# bad usage: exit 2
usage_rc() {
    local name=$1; shift
    "$@" >/dev/null 2>"$TMP/u.err"; local rc=$?
    if [ $rc -eq 2 ] && grep -q 'moec: error:' "$TMP/u.err"; then pass "$name"; else fail "$name" "exit $rc: $(cat "$TMP/u.err")"; fi
}
usage_rc usage_no_input "$MOEC"
usage_rc usage_bad_option "$MOEC" --frobnicate examples/tiny_dense.moe
usage_rc usage_two_inputs "$MOEC" examples/tiny_dense.moe examples/tiny_moe.moe
usage_rc usage_missing_file "$MOEC" does/not/exist.moe
usage_rc usage_bad_max_errors "$MOEC" --max-errors 0 examples/tiny_dense.moe
expect_ok version "$MOEC" --version
expect_ok help "$MOEC" --help

# the default stdlib is found next to the moec executable
if [ -d "$(dirname "$MOEC")/stdlib" ]; then
    expect_ok default_stdlib "$MOEC" -o "$TMP/d.bin" examples/tiny_dense.moe
fi
# -I and MOEC_PATH find imports; the error lists the searched paths
mkdir -p "$TMP/inc"
printf 'block twice(x) { return x + x }\n' >"$TMP/inc/mylib.moe"
sed 's/import "nn"/import "nn"\nimport "mylib"/' examples/tiny_dense.moe >"$TMP/with_import.moe"
expect_ok import_via_I M -I "$TMP/inc" -o "$TMP/i.bin" "$TMP/with_import.moe"
expect_ok import_via_MOEC_PATH env MOEC_PATH="$TMP/nope:$TMP/inc" "$MOEC" --stdlib stdlib -o "$TMP/i.bin" "$TMP/with_import.moe"
expect_fail import_missing "not found \(searched .*with_import|not found \(searched" M -o "$TMP/i.bin" "$TMP/with_import.moe"
# an import cycle is harmless: each file is read once
printf 'import "b"\nblock fa(x) { return x }\n' >"$TMP/inc/a.moe"
printf 'import "a"\nblock fb(x) { return x }\n' >"$TMP/inc/b.moe"
sed 's/import "nn"/import "nn"\nimport "a"/' examples/tiny_dense.moe >"$TMP/cycle.moe"
expect_ok import_cycle M -I "$TMP/inc" -o "$TMP/c.bin" "$TMP/cycle.moe"
