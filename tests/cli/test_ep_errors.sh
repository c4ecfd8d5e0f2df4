#!/usr/bin/env bash
# Expert parallelism's compile errors (compiler/parallel_ep.c), each shown
# located at the .moe line that causes it; the same model without the
# misuse compiles (so each failure is the misuse, not the template).
source "$(dirname "$0")/../lib.sh"
SRC=$ROOT/tests/cli/ep_errors/bad_moe.moe.in
cd "$TMP"
variant() { sed "s/VARIANT/$1/" "$SRC" > "v$1.moe"; echo "v$1.moe"; }
# expect_error NAME ERROR_LINE HINT_LINE CMD...: both lines (grep -E) in the output
expect_error() {
    local name=$1 e=$2 h=$3; shift 3
    expect_fail "$name" "$e" "$@"
    expect_fail "$name.hint" "$h" "$@"
}

expect_ok ep_errors.valid_template "$MOEC" --stdlib "$ROOT/stdlib" "$(variant 0)" -o v0.bin
expect_error ep_errors.non_rowwise_op \
    "v1.moe:19:9: error: expert parallelism: op 'add' mixes expert rows with other tensors" \
    "hint: keep the expert computation between dispatch and combine elementwise" \
    "$MOEC" --stdlib "$ROOT/stdlib" "$(variant 1)" -o v1.bin
expect_error ep_errors.dense_weight_in_grouped_matmul \
    "v2.moe:22:9: error: expert parallelism: a grouped matmul's weight is not an expert param" \
    "hint: declare the weight .expert. in its param line" \
    "$MOEC" --stdlib "$ROOT/stdlib" "$(variant 2)" -o v2.bin
expect_error ep_errors.expert_weight_outside_grouped_matmul \
    "v3.moe:25:14: error: expert parallelism: op 'topk_biased' reads the expert weight 'moe.eb', but each rank holds only its own experts" \
    "hint: use expert weights only in grouped_matmul" \
    "$MOEC" --stdlib "$ROOT/stdlib" "$(variant 3)" -o v3.bin
# one rank: the same misuses are legal (nothing is split)
sed 's/ranks = 2  expert = 2/ranks = 1  expert = 1/' "$(variant 3)" > v3one.moe
expect_ok ep_errors.one_rank_allows_it "$MOEC" --stdlib "$ROOT/stdlib" v3one.moe -o v3one.bin
