#!/usr/bin/env bash
# tests/fuzz/fuzz.sh - build and run the libFuzzer harnesses.
#
#   tests/fuzz/fuzz.sh [-b DIR] [-t SECONDS] [-j JOBS] [TARGET...]
#
# TARGET is parser and/or plan (default both).  Binaries, corpora and crash
# files go under DIR (default build/fuzz): DIR/fuzz_TARGET, DIR/corpus/TARGET
# (grows from run to run), DIR/crashes/TARGET-*.  -t 0 only builds.
# Exit status: 0 no crash, 1 a harness crashed (its file is printed on a line
# "CRASH target file"), 2 the harnesses cannot be built, 3 bad usage.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=$ROOT/build/fuzz
SECS=20
JOBS=1
while getopts "b:t:j:" o; do
    case $o in
    b) DIR=$OPTARG ;;
    t) SECS=$OPTARG ;;
    j) JOBS=$OPTARG ;;
    *) echo "usage: $0 [-b DIR] [-t SECONDS] [-j JOBS] [parser|plan...]" >&2; exit 3 ;;
    esac
done
shift $((OPTIND - 1))
TARGETS=${*:-parser plan}
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac
CLANG=${CLANG:-clang}
mkdir -p "$DIR"

say() { echo "fuzz: $*" >&2; }

# --- build --------------------------------------------------------------
FLAGS=(-std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined)
# the whole front end but moec's main(), so new compiler files need no edit here
PARSER_SRC=(tests/fuzz/fuzz_parser.c lang/ast.c lang/diag.c $(ls compiler/*.c | grep -v '^compiler/main.c$'))
PLAN_SRC=(tests/fuzz/fuzz_plan.c runtime/plan_load.c runtime/inspect.c)

# newer IN... than OUT?
stale() {
    local out=$1; shift
    [ -e "$out" ] || return 0
    local f
    for f in "$@"; do [ "$f" -nt "$out" ] && return 0; done
    return 1
}

build() {   # build TARGET
    cd "$ROOT" || return 1
    local t=$1 out=$DIR/fuzz_$1
    case $t in
    parser)
        # the generated scanner and parser come from the project's Makefile
        make -s BUILD="$DIR/gen" "$DIR/gen/lang/parser.c" "$DIR/gen/lang/lexer.c" >&2 || return 1
        local gen=("$DIR/gen/lang/parser.c" "$DIR/gen/lang/lexer.c")
        stale "$out" "${PARSER_SRC[@]}" "${gen[@]}" lang/*.h compiler/*.h runtime/plan.h || return 0
        say "building $out"
        $CLANG "${FLAGS[@]}" -Ilang -Icompiler -I"$DIR/gen/lang" -DFUZZ_STDLIB="\"$ROOT/stdlib\"" \
            -Wno-unused-function -Wno-sign-compare -Wno-unused-parameter \
            -o "$out" "${PARSER_SRC[@]}" "${gen[@]}" -lm ;;
    plan)
        stale "$out" "${PLAN_SRC[@]}" runtime/*.h kernels/moek.h || return 0
        say "building $out"
        $CLANG "${FLAGS[@]}" -Wall -Wextra -Iruntime -o "$out" "${PLAN_SRC[@]}" -lm ;;
    *) say "unknown target $t (parser or plan)"; return 3 ;;
    esac
}

# --- seed corpora -------------------------------------------------------
seeds() {   # seeds TARGET: fills DIR/seeds/TARGET, prints nothing
    local t=$1 s=$DIR/seeds/$1
    mkdir -p "$s"
    # reproducers of past findings (tests/fuzz/crashes/TARGET_*) stay in the corpus
    cp "$ROOT"/tests/fuzz/crashes/"$t"_* "$s"/ 2>/dev/null
    case $t in
    parser)
        cp "$ROOT"/examples/*.moe "$ROOT"/stdlib/*.moe "$s"/ 2>/dev/null
        local f
        for f in "$ROOT"/tests/golden/diag/*.moe; do cp "$f" "$s/diag_$(basename "$f")"; done ;;
    plan)
        # plans compiled from the examples when a moec is at hand; the
        # harness's own small plan always
        local moec=${MOEC:-$ROOT/moec} ex
        if [ -x "$moec" ]; then
            for ex in "$ROOT"/examples/*.moe; do
                "$moec" --stdlib "$ROOT/stdlib" -o "$s/$(basename "$ex" .moe).bin" "$ex" \
                    >/dev/null 2>&1 || say "note: $moec could not compile $ex (seed skipped)"
            done
        fi
        MOEC_FUZZ_WRITE_SEED="$s/builtin.bin" "$DIR/fuzz_plan" >/dev/null 2>&1 ||
            say "note: the built-in seed plan was not written" ;;
    esac
}

# --- run ----------------------------------------------------------------
rc=0
for t in $TARGETS; do
    build "$t" || { say "cannot build fuzz_$t"; exit 2; }
done
[ "$SECS" = 0 ] && exit 0
for t in $TARGETS; do
    seeds "$t"
    mkdir -p "$DIR/corpus/$t" "$DIR/crashes"
    rm -f "$DIR/crashes/$t-"*
    log=$DIR/fuzz_$t.log
    say "running fuzz_$t for ${SECS}s (log: $log)"
    # per-input limits: 10 s and 2 GiB; a slower or bigger input is a finding
    par=()
    [ "$JOBS" -gt 1 ] && par=(-fork="$JOBS")
    [ "$t" = parser ] && par+=(-dict="$ROOT/tests/fuzz/moe.dict")
    "$DIR/fuzz_$t" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 "${par[@]}" \
        -print_final_stats=1 \
        -artifact_prefix="$DIR/crashes/$t-" "$DIR/corpus/$t" "$DIR/seeds/$t" >"$log" 2>&1
    frc=$?
    crash=$(ls "$DIR/crashes/$t-"* 2>/dev/null | head -1)
    if [ $frc -ne 0 ] || [ -n "$crash" ]; then
        echo "CRASH $t ${crash:-none} (exit $frc; log $log)"
        grep -m3 -E 'ERROR: |runtime error|SUMMARY' "$log" >&2
        rc=1
    else
        grep -E '^#[0-9]+ +DONE|stat::number_of_executed_units|cov:' "$log" | tail -2 | sed "s/^/fuzz: $t: /" >&2
    fi
done
exit $rc
