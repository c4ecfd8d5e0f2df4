/* test_kernels_cuda_fused_mlp.c - the CUDA linear + bias (+ GELU) kernels
 * (kernels/cuda/fused.cu: moek_matmul_bias_gelu_*, moek_matmul_bias_*)
 * against their CPU twins (kernels/cpu/fused.c, linked in).
 *
 * The CUDA library is dlopened from $MOEC_BUILD/libmoek_cuda.so (default
 * build/); without it or without a GPU this prints one SKIP line.  Random
 * inputs, GPU outputs poisoned with NaN; relative L2 distance within 1e-4
 * in fp32 (cuBLAS and BLAS sum the K terms in different orders; GELU is the
 * tanh form on the GPU, the sigmoid form on the CPU) and 2e-2 in bf16 and
 * fp16 (one moved rounding of the GEMM's output moves pre and y).  Every
 * case runs in fp32, then bf16, then fp16 (one body: tm_half below), fp16 on
 * the bf16 cases' input ranges. */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"
#include "cuda_harness.h"

#define TM_SYMS(X)                                                                             \
    X(device_count) X(device_init) X(device_fini) X(device_alloc) X(device_free)               \
    X(device_copy) X(device_sync) X(matmul_bias_gelu_fwd) X(matmul_bias_gelu_bwd)              \
    X(matmul_bias_fwd) X(matmul_bias_bwd)

/* the half variants, by their names without the _bf16 / _f16 suffix */
#define TM_HALF(X)                                                                             \
    X(cast_f32) X(matmul_bias_gelu_fwd) X(matmul_bias_gelu_bwd) X(matmul_bias_fwd)             \
    X(matmul_bias_bwd)

typedef struct {
#define TM_FIELD(n) __typeof__(&moek_##n) n;
    TM_SYMS(TM_FIELD)
#undef TM_FIELD
} tm_lib;

/* one library's half variants, typed as the _bf16 ones (cuda_harness.h) */
typedef struct {
#define TM_HFIELD(n) __typeof__(&moek_##n##_bf16) n;
    TM_HALF(TM_HFIELD)
#undef TM_HFIELD
} tm_hlib;

/* a half type: its descriptor and its variants in the CPU and CUDA libraries;
 * a case given NULL runs fp32 */
typedef struct {
    const ch_half *ty;
    tm_hlib c, g;
} tm_half;

typedef struct {
    tm_lib g;
    tm_half halves[CH_NHALF];
    ch_side s;   /* contexts, statuses, error text */
    uint64_t rng;
} tm_env;

/* a device copy of host bytes (or NaN bytes when h is NULL) */
static void *tm_up(tm_env *t, const void *h, int64_t bytes)
{
    void *d = t->g.device_alloc(&t->s.gctx, bytes, t->s.err, sizeof t->s.err);
    void *nan = NULL;
    if (!h) {
        nan = malloc((size_t)bytes);
        memset(nan, 0xff, (size_t)bytes);
        h = nan;
    }
    if (!d || t->g.device_copy(&t->s.gctx, d, h, bytes, MOEK_COPY_H2D, t->s.err, sizeof t->s.err)) {
        fprintf(stderr, "test_kernels_cuda_fused_mlp: %s\n", t->s.err);
        exit(2);
    }
    free(nan);
    return d;
}

/* relative L2 distance of a device buffer from the CPU's (fp32 when hk is
 * NULL) */
static double tm_cmp(tm_env *t, const void *dev, const void *cpu, int64_t n, const tm_half *hk)
{
    void *got = malloc((size_t)(n * (hk ? 2 : 4)));
    if (t->g.device_copy(&t->s.gctx, got, dev, n * (hk ? 2 : 4), MOEK_COPY_D2H, t->s.err, sizeof t->s.err)) {
        fprintf(stderr, "test_kernels_cuda_fused_mlp: %s\n", t->s.err);
        exit(2);
    }
    double e = ch_rel(got, cpu, n, hk ? hk->ty : NULL);
    free(got);
    return e;
}

static void *tm_rand(tm_env *t, int64_t n, float lo, float hi, const tm_half *hk)
{
    float *f = malloc((size_t)n * 4);
    for (int64_t j = 0; j < n; j++)
        f[j] = ch_unif(&t->rng, lo, hi);
    if (!hk)
        return f;
    void *h = malloc((size_t)n * 2);
    hk->c.cast_f32(&t->s.cctx, f, h, n);
    free(f);
    return h;
}

/* pre (the output when gelu is 0), y, dx, dw, db against the CPU */
static void tm_case(tm_env *t, int gelu, int64_t N, int64_t K, int64_t M, const tm_half *hk)
{
    int64_t es = hk ? 2 : 4, nk = N * K, mk = M * K, nm = N * M;
    void *x = tm_rand(t, nk, -1, 1, hk), *w = tm_rand(t, mk, -0.3f, 0.3f, hk), *b = tm_rand(t, M, -1, 1, hk),
         *dy = tm_rand(t, nm, -1, 1, hk);
    void *pre = malloc((size_t)(nm * es)), *y = malloc((size_t)(nm * es)), *dx = malloc((size_t)(nk * es)),
         *dw = malloc((size_t)(mk * es)), *db = malloc((size_t)(M * es));
    void *gx = tm_up(t, x, nk * es), *gw = tm_up(t, w, mk * es), *gb = tm_up(t, b, M * es), *gdy = tm_up(t, dy, nm * es);
    void *gpre = tm_up(t, NULL, nm * es), *gy = tm_up(t, NULL, nm * es), *gdx = tm_up(t, NULL, nk * es),
         *gdw = tm_up(t, NULL, mk * es), *gdb = tm_up(t, NULL, M * es);
    if (gelu && hk) {
        hk->c.matmul_bias_gelu_fwd(&t->s.cctx, x, w, b, pre, y, N, K, M);
        hk->c.matmul_bias_gelu_bwd(&t->s.cctx, dy, x, w, pre, dx, dw, db, N, K, M);
        hk->g.matmul_bias_gelu_fwd(&t->s.gctx, gx, gw, gb, gpre, gy, N, K, M);
        hk->g.matmul_bias_gelu_bwd(&t->s.gctx, gdy, gx, gw, gpre, gdx, gdw, gdb, N, K, M);
    } else if (gelu) {
        moek_matmul_bias_gelu_fwd(&t->s.cctx, x, w, b, pre, y, N, K, M);
        moek_matmul_bias_gelu_bwd(&t->s.cctx, dy, x, w, pre, dx, dw, db, N, K, M);
        t->g.matmul_bias_gelu_fwd(&t->s.gctx, gx, gw, gb, gpre, gy, N, K, M);
        t->g.matmul_bias_gelu_bwd(&t->s.gctx, gdy, gx, gw, gpre, gdx, gdw, gdb, N, K, M);
    } else if (hk) {
        hk->c.matmul_bias_fwd(&t->s.cctx, x, w, b, pre, N, K, M);
        hk->c.matmul_bias_bwd(&t->s.cctx, dy, x, w, dx, dw, db, N, K, M);
        hk->g.matmul_bias_fwd(&t->s.gctx, gx, gw, gb, gpre, N, K, M);
        hk->g.matmul_bias_bwd(&t->s.gctx, gdy, gx, gw, gdx, gdw, gdb, N, K, M);
    } else {
        moek_matmul_bias_fwd(&t->s.cctx, x, w, b, pre, N, K, M);
        moek_matmul_bias_bwd(&t->s.cctx, dy, x, w, dx, dw, db, N, K, M);
        t->g.matmul_bias_fwd(&t->s.gctx, gx, gw, gb, gpre, N, K, M);
        t->g.matmul_bias_bwd(&t->s.gctx, gdy, gx, gw, gdx, gdw, gdb, N, K, M);
    }
    int rc = t->g.device_sync(&t->s.gctx, t->s.err, sizeof t->s.err);
    double e[5] = {tm_cmp(t, gpre, pre, nm, hk), gelu ? tm_cmp(t, gy, y, nm, hk) : 0,
                   tm_cmp(t, gdx, dx, nk, hk), tm_cmp(t, gdw, dw, mk, hk), tm_cmp(t, gdb, db, M, hk)};
    double tol = hk ? 2e-2 : 1e-4, worst = 0;
    for (int i = 0; i < 5; i++)
        worst = e[i] > worst || isnan(e[i]) ? e[i] : worst;
    char name[112];
    snprintf(name, sizeof name, "cuda %s%s == cpu %lldx%lldx%lld", gelu ? "matmul_bias_gelu" : "matmul_bias",
             hk ? hk->ty->suffix : "", (long long)N, (long long)K, (long long)M);
    CHECK(name, rc == 0 && t->s.gstatus == 0 && t->s.cstatus == 0 && worst <= tol,
          "sync %d (%s) gpu %d cpu %d; pre %.3g y %.3g dx %.3g dw %.3g db %.3g (tolerance %.3g)", rc, t->s.err, t->s.gstatus,
          t->s.cstatus, e[0], e[1], e[2], e[3], e[4], tol);
    printf("# %s: worst relative error %.3g\n", name, worst);
    void *host[9] = {x, w, b, dy, pre, y, dx, dw, db};
    void *dev[9] = {gx, gw, gb, gdy, gpre, gy, gdx, gdw, gdb};
    for (int i = 0; i < 9; i++) {
        free(host[i]);
        t->g.device_free(&t->s.gctx, dev[i]);
    }
}

int main(void)
{
    void *lib = ch_open("cuda_fused_mlp_kernels");
    if (!lib)
        return 0;
    tm_env *t = calloc(1, sizeof *t);
#define TM_SYM(n) CH_ENTRY(t->g, n)
#define TM_SYM_BF16(n) CH_HENTRY(t->halves[CH_BF16].g, n, "_bf16")
#define TM_SYM_F16(n) CH_HENTRY(t->halves[CH_F16].g, n, "_f16")
    ch_sym syms[] = {TM_SYMS(TM_SYM) TM_HALF(TM_SYM_BF16) TM_HALF(TM_SYM_F16)};
#undef TM_SYM
#undef TM_SYM_BF16
#undef TM_SYM_F16
    int go = ch_start(lib, "cuda_fused_mlp_kernels", syms, CH_NSYMS(syms), &t->s);
    if (go <= 0) {
        free(t);
        return go < 0;
    }
    t->s.cctx.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(8 << 20);
    t->s.cctx.workspace = malloc((size_t)t->s.cctx.workspace_bytes);
    t->rng = 0x2545f4914f6cdd1dull;
    tm_half *bf = &t->halves[CH_BF16], *hf = &t->halves[CH_F16];
#define TM_CPU_BF16(n) bf->c.n = moek_##n##_bf16;
#define TM_CPU_F16(n) hf->c.n = moek_##n##_f16;
    TM_HALF(TM_CPU_BF16)
    TM_HALF(TM_CPU_F16)
#undef TM_CPU_BF16
#undef TM_CPU_F16
    bf->ty = ch_half_type(CH_BF16);
    hf->ty = ch_half_type(CH_F16);
    /* fp32, bf16, fp16 in that order: the fp32 and bf16 cases draw the
     * inputs they drew before fp16 was tested */
    tm_half *types[] = {NULL, bf, hf};
    for (int i = 0; i < 3; i++)
        for (int gelu = 0; gelu < 2; gelu++) {
            tm_case(t, gelu, 3, 5, 7, types[i]);
            tm_case(t, gelu, 128, 64, 192, types[i]);   /* dpre: 24 576 values, within the 1 MiB workspace */
        }
    free(t->s.cctx.workspace);
    t->g.device_fini(&t->s.gctx);
    free(t);
    CHECK_DONE();
}
