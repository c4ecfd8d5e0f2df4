#!/usr/bin/env bash
# Every kernel and device service kernels/moek.h declares is exported by
# both kernel libraries, so one plan runs on either device with no silent
# fallback: a symbol missing from libmoek_cuda.so would only show as a load
# error on a GPU machine (as moek_add_rmsnorm_*_f16 once did).  Nothing
# either library exports is left undeclared.  Needs no GPU.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
command -v nm >/dev/null || { skip kernel_exports "nm not found (binutils)"; exit 0; }
grep -oE '^(void|int|int64_t|double|float|const char) *\*? *moek_[a-z0-9_]+\(' "$ROOT/kernels/moek.h" |
    grep -oE 'moek_[a-z0-9_]+' | sort -u > "$TMP/declared"
n=$(wc -l < "$TMP/declared")
if [ "$n" -lt 150 ]; then fail kernel_exports.declared "only $n declarations parsed from kernels/moek.h"; exit 0; fi
check() {   # NAME LIBRARY OPTIONAL
    local lib=$ROOT/$B/$2
    if [ ! -f "$lib" ] && [ "$3" = optional ]; then
        skip "kernel_exports.$1" "no $B/$2 (make builds it where nvcc exists)"; return
    fi
    if [ ! -f "$lib" ]; then fail "kernel_exports.$1" "no $B/$2; run make"; return; fi
    nm -D --defined-only "$lib" | awk '$2 == "T" { print $3 }' | grep '^moek_' | sort -u > "$TMP/$1"
    local missing extra
    missing=$(comm -23 "$TMP/declared" "$TMP/$1" | tr '\n' ' ')
    extra=$(comm -13 "$TMP/declared" "$TMP/$1" | tr '\n' ' ')
    if [ -z "$missing" ] && [ -z "$extra" ]; then
        pass "kernel_exports.$1"; echo "  kernel_exports.$1: all $n declared symbols"
    else
        fail "kernel_exports.$1" "missing: ${missing:-none}; undeclared: ${extra:-none}"
    fi
}
check cpu libmoek_cpu.so required
check cuda libmoek_cuda.so optional
