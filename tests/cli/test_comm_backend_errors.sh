#!/usr/bin/env bash
# What run says about a backend library that lacks parts of the ABI
# (runtime/comm.c).  A stand-in libmoec_comm_mpi.so, compiled here, exports
# only the base table: it claims rank 0 of a world of FAKE_WORLD ranks and
# every collective is a no-op, so one process reaches the extension checks
# without mpirun:
#   - a ZeRO plan stops at its first all-gather: "has no ZeRO collectives";
#   - an expert-parallel plan stops at its first exchange: "has no all-to-all";
#   - a library without the table at all, or of another ABI, is refused.
source "$(dirname "$0")/../lib.sh"
B=${MOEC_BUILD:-build}
DATA=$ROOT/$B/data/default.txt
if [ ! -x "$RUN" ] || [ ! -x "$MOEC" ] || [ ! -f "$DATA" ]; then skip comm.fake "build moec, run and $DATA first"; exit 0; fi
if ! command -v "${CC:-cc}" > /dev/null; then skip comm.fake "no C compiler"; exit 0; fi
export OMP_NUM_THREADS=1
cd "$TMP"

mkdir -p fake noabi notable
cat > fake.c <<'EOF'
/* base table only: no moec_comm_backend_ep, no moec_comm_zero_backend */
#include <stdio.h>
#include <stdlib.h>
#include "runtime/comm.h"
#ifndef FAKE_ABI
#define FAKE_ABI COMM_BACKEND_ABI
#endif
static int f_init(void **impl, const comm_init_args *a, int *rank, int *world, char *err,
                  size_t errlen)
{
    (void)a; (void)err; (void)errlen;
    const char *w = getenv("FAKE_WORLD");
    *impl = NULL;
    *rank = 0;
    *world = w ? atoi(w) : 2;
    return 0;
}
static int f_ar(void *impl, float *const *b, const int64_t *n, int count, int group,
                const char *what, char *err, size_t errlen)
{
    (void)impl; (void)b; (void)group; (void)err; (void)errlen;
    const char *log = getenv("FAKE_LOG");   /* what the runtime hands the backend */
    FILE *f = log ? fopen(log, "a") : NULL;
    if (f) {
        long long total = 0;
        for (int i = 0; i < count; i++)
            total += n[i];
        fprintf(f, "%s: %d buffer(s), %lld floats\n", what, count, total);
        fclose(f);
    }
    return 0;
}
static int f_arh(void *impl, double *b, int64_t n, int group, const char *what, char *err,
                 size_t errlen)
{
    (void)impl; (void)b; (void)n; (void)group; (void)what; (void)err; (void)errlen;
    return 0;
}
static void f_abort(void *impl, int code) { (void)impl; (void)code; }
static void f_fini(void *impl) { (void)impl; }
static const comm_backend fake = {FAKE_ABI, "fake", f_init, f_ar, f_arh, f_abort, f_fini};
const comm_backend *moec_comm_backend(void);
const comm_backend *moec_comm_backend(void) { return &fake; }
EOF
CCF=(-std=c11 -Wall -Wextra -Werror -shared -fPIC -I"$ROOT")
if ! "${CC:-cc}" "${CCF[@]}" -o fake/libmoec_comm_mpi.so fake.c 2> cc.log ||
   ! "${CC:-cc}" "${CCF[@]}" -DFAKE_ABI=99 -o noabi/libmoec_comm_mpi.so fake.c 2>> cc.log ||
   ! echo 'int moec_something_else;' | "${CC:-cc}" -shared -fPIC -x c -o notable/libmoec_comm_mpi.so - 2>> cc.log; then
    fail comm.fake_build "$(head -5 cc.log)"; exit 0
fi

NOPAR='s/^parallel {.*}$//'
mk() {   # NAME SED-EXPR SOURCE
    sed "$2" "$ROOT/examples/$3" > "$1.moe"
    "$MOEC" --stdlib "$ROOT/stdlib" "$1.moe" -o "$1.bin" > "$1.log" 2>&1 ||
        { fail "comm.compile_$1" "$(tail -3 "$1.log")"; exit 0; }
}
mk zero1 "$NOPAR;\$a parallel { ranks = 2  zero = 1 }" tiny_dense.moe
mk ep2 "$NOPAR;\$a parallel { ranks = 2  expert = 2 }" tiny_moe.moe

# the kernels still come from the build (run falls back to its own directory)
fake() { env -u OMPI_COMM_WORLD_SIZE -u PMI_SIZE -u PMIX_RANK -u MPI_LOCALNRANKS MOEC_KERNELS=$TMP/$1 "${@:2}"; }

expect_fail comm.no_zero_collectives \
    '^run: rank 0: the fake backend has no ZeRO collectives \(moec_comm_zero_backend\); rebuild it from this source tree$' \
    fake fake "$RUN" zero1.bin --data "$DATA" --comm mpi --steps 2 -q --metrics ""
expect_fail comm.no_alltoall \
    'rank 0: all-to-all of expert token counts: the fake backend has no all-to-all; use --comm mpi' \
    fake fake "$RUN" ep2.bin --data "$DATA" --comm mpi --steps 2 -q --metrics ""
expect_fail comm.wrong_abi \
    'libmoec_comm_mpi.so is not a moec communication backend of ABI 1; rebuild it from this source tree' \
    fake noabi "$RUN" zero1.bin --data "$DATA" --comm mpi --steps 1 -q --metrics ""
expect_fail comm.no_table \
    'libmoec_comm_mpi.so is not a moec communication backend of ABI 1' \
    fake notable "$RUN" zero1.bin --data "$DATA" --comm mpi --steps 1 -q --metrics ""

# A gradient bucket whose tensors tile one range of the grad pool (the
# multi-tensor pass's flat buffers, or grads laid out back to back) reaches
# the backend as ONE buffer reduced in place, not packed into a staging copy.
mk dp2 "$NOPAR;\$a parallel { ranks = 2 }" tiny_dense.moe
buckets=$("$RUN" --inspect dp2.bin | grep -c 'moec_comm_allreduce_f32_multi(1, [0-9]*, [2-8],')
rm -f ar.log
fake fake env FAKE_LOG=$TMP/ar.log "$RUN" dp2.bin --data "$DATA" --comm mpi --steps 1 -q --metrics "" \
    --checkpoint "" > dp2.out 2>&1
packed=$(grep -c 'gradient bucket .*: [2-8] buffer' ar.log 2>/dev/null)
inplace=$(grep -c 'gradient bucket .*: 1 buffer' ar.log 2>/dev/null)
if [ "${buckets:-0}" -gt 0 ] && [ "${packed:-0}" -eq 0 ] && [ "${inplace:-0}" -ge "$buckets" ]; then
    pass comm.bucket_in_place
else
    fail comm.bucket_in_place "plan has ${buckets:-0} multi-tensor buckets; backend saw ${inplace:-0} single-buffer and ${packed:-0} packed bucket calls: $(head -5 ar.log 2>/dev/null) $(tail -3 dp2.out)"
fi
