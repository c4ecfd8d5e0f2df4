/* cuda_harness.h - what the CUDA-vs-CPU test programs (test_kernels_cuda*.c)
 * share: loading the CUDA library by path, so the programs link no CUDA, with
 * one SKIP line when there is no library or no GPU; the xorshift generator
 * their random inputs come from; and the two half storage types (bf16, IEEE
 * fp16) as a descriptor, so one test body runs the _bf16 and the _f16
 * variants of a kernel.
 *
 * A program lists the symbols it needs as an X-macro over the names without
 * their moek_ prefix, keeps them in a struct of function pointers with those
 * field names, keeps a ch_side s (the two contexts, statuses, error text
 * and the running case's buffers) in its state t, and starts with
 *
 *     void *lib = ch_open("cuda_kernels");
 *     if (!lib)
 *         return 0;                       (SKIP printed)
 *     ... allocate its state t ...
 *     #define MY_SYM(n) CH_ENTRY(t->g, n)
 *     ch_sym syms[] = {MY_SYMS(MY_SYM)};
 *     int go = ch_start(lib, "cuda_kernels", syms, CH_NSYMS(syms), &t->s);
 *     if (go <= 0) { free(t); return go < 0; }
 *
 * go < 0: a FAIL was printed; go == 0: no GPU, one SKIP printed and the
 * library closed; else device 0 is initialised into t->s.gctx. */
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

#define CH_MAXBUF 64

/* The two sides of a program: the GPU and CPU contexts with their status
 * words, the last error text, the library's device services, and the
 * buffers of the running case (ch_host / ch_dev; ch_end_case frees them). */
typedef struct {
    const char *test;   /* the program's name in SKIP lines and fatal messages */
    moek_ctx gctx, cctx;
    int gstatus, cstatus;
    char err[256];
    __typeof__(&moek_device_alloc) alloc;
    __typeof__(&moek_device_free) free;
    __typeof__(&moek_device_copy) copy;
    __typeof__(&moek_device_fini) fini;
    __typeof__(&moek_device_sync) sync;
    void *dev[CH_MAXBUF], *host[CH_MAXBUF];
    int ndev, nhost;
} ch_side;

/* Fills every slot (one FAIL per missing symbol) and s's services, then
 * checks for a device and initialises device 0 into s->gctx, both contexts
 * reporting into s's status words.  1: go on; 0: no GPU, one SKIP line
 * named `test` printed and lib closed; -1: a FAIL printed. */
static int ch_start(void *lib, const char *test, const ch_sym *syms, int nsyms, ch_side *s)
{
    ch_sym services[] = {{"moek_device_alloc", (void **)&s->alloc},
                         {"moek_device_free", (void **)&s->free},
                         {"moek_device_copy", (void **)&s->copy},
                         {"moek_device_fini", (void **)&s->fini},
                         {"moek_device_sync", (void **)&s->sync}};
    int missing = 0;
    for (int k = 0; k < 2; k++) {
        const ch_sym *list = k ? services : syms;
        for (int i = 0; i < (k ? CH_NSYMS(services) : nsyms); i++) {
            *list[i].slot = dlsym(lib, list[i].name);
            if (!*list[i].slot) {
                char what[160];
                snprintf(what, sizeof what, "cuda library exports %s", list[i].name);
                CHECK(what, 0, "symbol missing");
                missing++;
            }
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
        dlclose(lib);
        return 0;
    }
    s->test = test;
    if (init(&s->gctx, 0, 1 << 20, s->err, sizeof s->err)) {
        CHECK("cuda device_init", 0, "%s", s->err);
        return -1;
    }
    s->gctx.status = &s->gstatus;
    s->cctx.status = &s->cstatus;
    return 1;
}

/* ---- the running case's buffers: fatal on failure (the harness itself
 * broke, not a kernel) ------------------------------------------------------ */
static inline void ch_die(const ch_side *s, const char *what, const char *why)
{
    fprintf(stderr, "%s: %s: %s\n", s->test, what, why);
    exit(2);
}

/* zeroed host memory, freed by ch_end_case */
static inline void *ch_host(ch_side *s, int64_t bytes)
{
    void *p = calloc(1, (size_t)(bytes > 0 ? bytes : 1));
    if (!p || s->nhost >= CH_MAXBUF)
        ch_die(s, "host buffers", "exhausted");
    return s->host[s->nhost++] = p;
}

/* device memory, freed by ch_end_case */
static inline void *ch_dev(ch_side *s, int64_t bytes)
{
    void *p = s->alloc(&s->gctx, bytes > 0 ? bytes : 4, s->err, sizeof s->err);
    if (!p || s->ndev >= CH_MAXBUF)
        ch_die(s, "device allocation", p ? "exhausted" : s->err);
    return s->dev[s->ndev++] = p;
}

/* bytes from src to dst, kind MOEK_COPY_H2D / D2H / D2D */
static inline void ch_copy(ch_side *s, void *dst, const void *src, int64_t bytes, int kind)
{
    if (bytes > 0 && s->copy(&s->gctx, dst, src, bytes, kind, s->err, sizeof s->err))
        ch_die(s, "copy", s->err);
}

/* waits for the GPU; false (with a FAIL line named `name`) when the sync or
 * either side's status failed */
static inline int ch_sync(ch_side *s, const char *name)
{
    int rc = s->sync(&s->gctx, s->err, sizeof s->err);
    if (rc || s->gstatus || s->cstatus) {
        CHECK(name, 0, "sync rc %d (%s), gpu status %d, cpu status %d", rc, rc ? s->err : "",
              s->gstatus, s->cstatus);
        return 0;
    }
    return 1;
}

/* frees the case's buffers and clears both status words */
static inline void ch_end_case(ch_side *s)
{
    for (int i = 0; i < s->ndev; i++)
        s->free(&s->gctx, s->dev[i]);
    for (int i = 0; i < s->nhost; i++)
        free(s->host[i]);
    s->ndev = s->nhost = 0;
    s->gstatus = s->cstatus = 0;
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
