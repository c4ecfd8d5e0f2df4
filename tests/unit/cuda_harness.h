/* cuda_harness.h - what the CUDA-vs-CPU test programs (test_kernels_cuda*.c)
 * share: loading the CUDA library by path, so the programs link no CUDA, with
 * one SKIP line when there is no library or no GPU; the xorshift generator
 * their random inputs come from; and the two half storage types (bf16, IEEE
 * fp16) as a descriptor, so one test body runs the _bf16 and the _f16
 * variants of a kernel.
 *
 * A program lists the symbols it needs as an X-macro over the names without
 * their moek_ prefix, keeps them in a struct of function pointers with those
 * field names, and starts with
 *
 *     void *lib = ch_open("cuda_kernels");
 *     if (!lib)
 *         return 0;                       (SKIP printed)
 *     ... allocate its state t ...
 *     #define MY_SYM(n) CH_ENTRY(t->g, n)
 *     ch_sym syms[] = {MY_SYMS(MY_SYM)};
 *     int go = ch_start(lib, "cuda_kernels", syms, CH_NSYMS(syms), &t->gctx, t->err,
 *                       sizeof t->err);
 *     go < 0: return 1 (a FAIL printed); go == 0: free t, dlclose, return 0
 *     (SKIP printed); else device 0 is initialised into t->gctx. */
#ifndef MOEC_CUDA_HARNESS_H
#define MOEC_CUDA_HARNESS_H

#include <dlfcn.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"

/* one symbol to look up: its name in the library and where its address goes */
typedef struct {
    const char *name;
    void **slot;
} ch_sym;

/* the entry for moek_<n>, whose address goes to lib.n */
#define CH_ENTRY(lib, n) {"moek_" #n, (void **)&(lib).n},
/* the entry for moek_<n><sfx> (sfx "_bf16" or "_f16"), whose address goes to
 * tab.n: a half-kernel table (see ch_half below) filled from the library */
#define CH_HENTRY(tab, n, sfx) {"moek_" #n sfx, (void **)&(tab).n},
#define CH_NSYMS(a) ((int)(sizeof(a) / sizeof(a)[0]))

/* dlopens $MOEC_BUILD/libmoek_cuda.so (default build/); NULL after one SKIP
 * line named `test` when it cannot be loaded. */
static void *ch_open(const char *test)
{
    const char *dir = getenv("MOEC_BUILD");
    char path[1024];
    snprintf(path, sizeof path, "%s/libmoek_cuda.so", dir && *dir ? dir : "build");
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib)
        SKIP(test, "no GPU (cannot load %s: %s)", path, dlerror());
    return lib;
}

/* Fills every slot (one FAIL per missing symbol), then checks for a device
 * and initialises device 0 into gctx.  1: go on; 0: no GPU, one SKIP line
 * named `test` printed; -1: a FAIL printed. */
static int ch_start(void *lib, const char *test, const ch_sym *syms, int nsyms, moek_ctx *gctx,
                    char *err, size_t errsz)
{
    int missing = 0;
    for (int i = 0; i < nsyms; i++) {
        *syms[i].slot = dlsym(lib, syms[i].name);
        if (!*syms[i].slot) {
            char what[160];
            snprintf(what, sizeof what, "cuda library exports %s", syms[i].name);
            CHECK(what, 0, "symbol missing");
            missing++;
        }
    }
    if (missing)
        return -1;
    __typeof__(&moek_device_count) count;
    __typeof__(&moek_device_init) init;
    *(void **)&count = dlsym(lib, "moek_device_count");
    *(void **)&init = dlsym(lib, "moek_device_init");
    if (!count || !init) {
        CHECK("cuda library exports moek_device_count and moek_device_init", 0, "symbol missing");
        return -1;
    }
    int ndev = count();
    if (ndev <= 0) {
        SKIP(test, "no GPU (moek_device_count() = %d)", ndev);
        return 0;
    }
    if (init(gctx, 0, 1 << 20, err, errsz)) {
        CHECK("cuda device_init", 0, "%s", err);
        return -1;
    }
    return 1;
}

/* the inputs' generator: xorshift64*, and a uniform float in [lo, hi) from
 * its top 24 bits */
static inline uint64_t ch_next(uint64_t *rng)
{
    *rng ^= *rng >> 12;
    *rng ^= *rng << 25;
    *rng ^= *rng >> 27;
    return *rng * 2685821657736338717ull;
}

static inline float ch_unif(uint64_t *rng, float lo, float hi)
{
    return lo + (hi - lo) * (float)((ch_next(rng) >> 40) / (double)(1ull << 24));
}

/* ---- half storage: bf16 and IEEE fp16 -------------------------------------
 * moek_bf16 and moek_f16 are both uint16_t, so a _f16 kernel has exactly the
 * type of its _bf16 twin: a program keeps its half kernels in one struct of
 * pointers typed as the _bf16 variants and fills one copy per type.  Inputs
 * are made and results read with the format's conversions in kernels/moek.h
 * (RNE, NaN stays NaN); the kernels' casts are what is tested. */
_Static_assert(__builtin_types_compatible_p(moek_bf16, moek_f16),
               "moek_bf16 and moek_f16 must be the same type for the shared half tables");

/* a half storage type */
typedef struct {
    const char *name;           /* "bf16", "f16": the type as check names spell it */
    const char *suffix;         /* "_bf16", "_f16": its kernels' suffix */
    uint16_t nan;               /* a quiet NaN: what half outputs are poisoned with */
    uint16_t (*round)(float);   /* fp32 -> half, to nearest even */
    float (*widen)(uint16_t);   /* half -> fp32, exact */
} ch_half;

enum { CH_BF16, CH_F16, CH_NHALF };

static inline const ch_half *ch_half_type(int which)
{
    static const ch_half types[CH_NHALF] = {
        {"bf16", "_bf16", 0x7fc0, moek_bf16_from_f32, moek_bf16_to_f32},
        {"f16", "_f16", 0x7e00, moek_f16_from_f32, moek_f16_to_f32},
    };
    return &types[which];
}

/* ||got - want|| / ||want|| over n values, fp32 when ty is NULL, else of
 * half type ty (an all-zero want: ||got||); INFINITY when got holds a
 * non-finite value */
static inline double ch_rel(const void *got, const void *want, int64_t n, const ch_half *ty)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        float g, w;
        if (ty) {
            g = ty->widen(((const uint16_t *)got)[i]);
            w = ty->widen(((const uint16_t *)want)[i]);
        } else {
            g = ((const float *)got)[i];
            w = ((const float *)want)[i];
        }
        if (!isfinite(g))
            return INFINITY;
        num += ((double)g - w) * ((double)g - w);
        den += (double)w * w;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

#endif
