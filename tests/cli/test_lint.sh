#!/usr/bin/env bash
# clang-tidy's bugprone checks (.clang-tidy) over lang/, compiler/, runtime/,
# kernels/cpu/ and tests/standin/: one PASS/FAIL line per directory, listing every warning
# whose file lies in that directory (a header's warning counts once, for the
# header's own directory).  SKIP when clang-tidy is missing.
source "$(dirname "$0")/../lib.sh"
cd "$ROOT" || exit 1
TIDY=${CLANG_TIDY:-clang-tidy}
if ! command -v "$TIDY" >/dev/null 2>&1; then
    skip lint "no $TIDY (scripts/setup installs clang-tidy)"
    exit 0
fi

# the lexer and parser headers are generated; lang/ and compiler/ include them
GEN=$ROOT/${MOEC_BUILD:-build}/lint
if ! make -s BUILD="$GEN" "$GEN/lang/parser.h" "$GEN/lang/lexer.h" >"$TMP/gen.log" 2>&1; then
    fail lint_generate "$(tail -5 "$TMP/gen.log")"
    exit 0
fi

DIRS="lang compiler runtime kernels/cpu"
# the stand-ins the tests run the CUDA paths on (tests/standin) need the
# CUDA headers, which every build machine of ours has
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
[ -f "$CUDA_INC/cuda_runtime.h" ] && DIRS="$DIRS tests/standin"
flags_for() {
    case $1 in
    lang/* | compiler/*) echo "-Ilang -I$GEN/lang" ;;
    kernels/cpu/*) echo "-fopenmp $(pkg-config --cflags openblas 2>/dev/null)" ;;
    tests/standin/*) echo "-I$CUDA_INC -Itests/standin" ;;
    *) echo "" ;;
    esac
}
# one clang-tidy per file, two at a time (the machine has two cores)
i=0
for d in $DIRS; do
    for f in "$d"/*.c; do
        [ -f "$f" ] || continue
        i=$((i + 1))
        printf '%s\t%s\t%s\n' "$TMP/tidy.$i" "$f" "$(flags_for "$f")"
    done
done >"$TMP/jobs"
# shellcheck disable=SC2016
xargs -P 2 -L 1 -d '\n' bash -c 'IFS=$'"'\t'"' read -r out f fl <<<"$0"
    # shellcheck disable=SC2086
    '"$TIDY"' -quiet "$f" -- -std=c11 -D_GNU_SOURCE $fl >"$out" 2>"$out.err"
    echo "$f" >"$out.src"' <"$TMP/jobs"

# "file:line:col: warning|error: message [check]" -> "dir<TAB>relpath:line:col: message [check]"
# clang-tidy 14 has no WarnOnSizeOfPointerToAggregate option (.clang-tidy sets
# it for newer versions): drop that one false positive on `sizeof *items` here.
for o in "$TMP"/tidy.*; do
    case $o in *.err | *.src) continue ;; esac
    src=$(cat "$o.src" 2>/dev/null)
    cat "$o" "$o.err" | grep -E '^[^ ].*:[0-9]+:[0-9]+: (warning|error): ' |
        grep -v "suspicious usage of 'sizeof(A\*)'; pointer to aggregate" |
        while IFS= read -r line; do
            file=${line%%:*}
            rel=$(realpath -m --relative-to="$ROOT" "$file")
            dir=$(dirname "$rel")
            # a system header or one outside our folders: blame the file being checked
            case " $DIRS " in *" $dir "*) ;; *) dir=$(dirname "$src") ;; esac
            printf '%s\t%s:%s\n' "$dir" "$rel" "${line#*:}"
        done
done | sort -u >"$TMP/all"

for d in $DIRS; do
    n=$(ls "$d"/*.c 2>/dev/null | wc -l)
    w=$(awk -F'\t' -v d="$d" '$1 == d { print $2 }' "$TMP/all")
    if [ -z "$w" ]; then
        pass "lint_${d//\//_}"
        echo "lint $d: $n files, no warnings"
    else
        fail "lint_${d//\//_}" "$(wc -l <<<"$w") clang-tidy warnings:
$(sed 's/^/    /' <<<"$w")"
    fi
done
