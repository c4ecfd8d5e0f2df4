/* test_kernels_cuda_fused_mlp.c - the CUDA linear + bias (+ GELU) kernels
 * (kernels/cuda/fused.cu: moek_matmul_bias_gelu_*, moek_matmul_bias_*)
 * against their CPU twins (kernels/cpu/fused.c, linked in).
 *
 * The CUDA library is dlopened from $MOEC_BUILD/libmoek_cuda.so (default
 * build/); without it or without a GPU this prints one SKIP line.  Random
 * inputs, GPU outputs poisoned with NaN; relative L2 distance within 1e-4
 * in fp32 (cuBLAS and BLAS sum the K terms in different orders; GELU is the
 * tanh form on the GPU, the sigmoid form on the CPU) and 2e-2 in bf16 (one
 * moved rounding of the GEMM's output moves pre and y). */
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
    X(matmul_bias_gelu_fwd_bf16) X(matmul_bias_gelu_bwd_bf16) X(matmul_bias_fwd)               \
    X(matmul_bias_bwd) X(matmul_bias_fwd_bf16) X(matmul_bias_bwd_bf16)

typedef struct {
#define TM_FIELD(n) __typeof__(&moek_##n) n;
    TM_SYMS(TM_FIELD)
#undef TM_FIELD
} tm_lib;

typedef struct {
    tm_lib g;
    moek_ctx gctx, cctx;
    int gst, cst;
    char err[256];
    uint64_t rng;
} tm_env;

/* a device copy of host bytes (or NaN bytes when h is NULL) */
static void *tm_up(tm_env *t, const void *h, int64_t bytes)
{
    void *d = t->g.device_alloc(&t->gctx, bytes, t->err, sizeof t->err);
    void *nan = NULL;
    if (!h) {
        nan = malloc((size_t)bytes);
        memset(nan, 0xff, (size_t)bytes);
        h = nan;
    }
    if (!d || t->g.device_copy(&t->gctx, d, h, bytes, MOEK_COPY_H2D, t->err, sizeof t->err)) {
        fprintf(stderr, "test_kernels_cuda_fused_mlp: %s\n", t->err);
        exit(2);
    }
    free(nan);
    return d;
}

/* relative L2 distance of a device buffer from the CPU's (bf16 when half) */
static double tm_cmp(tm_env *t, const void *dev, const void *cpu, int64_t n, int half)
{
    void *got = malloc((size_t)(n * (half ? 2 : 4)));
    if (t->g.device_copy(&t->gctx, got, dev, n * (half ? 2 : 4), MOEK_COPY_D2H, t->err, sizeof t->err)) {
        fprintf(stderr, "test_kernels_cuda_fused_mlp: %s\n", t->err);
        exit(2);
    }
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        float g, w;
        if (half) {
            uint32_t ug = (uint32_t)((const uint16_t *)got)[i] << 16, uw = (uint32_t)((const uint16_t *)cpu)[i] << 16;
            memcpy(&g, &ug, 4);
            memcpy(&w, &uw, 4);
        } else {
            g = ((const float *)got)[i];
            w = ((const float *)cpu)[i];
        }
        if (!isfinite(g)) {
            free(got);
            return INFINITY;
        }
        num += ((double)g - w) * ((double)g - w);
        den += (double)w * w;
    }
    free(got);
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void *tm_rand(tm_env *t, int64_t n, float lo, float hi, int half)
{
    float *f = malloc((size_t)n * 4);
    for (int64_t j = 0; j < n; j++)
        f[j] = ch_unif(&t->rng, lo, hi);
    if (!half)
        return f;
    void *h = malloc((size_t)n * 2);
    moek_cast_f32_bf16(&t->cctx, f, h, n);
    free(f);
    return h;
}

/* pre (the output when gelu is 0), y, dx, dw, db against the CPU */
static void tm_case(tm_env *t, int gelu, int64_t N, int64_t K, int64_t M, int half)
{
    int64_t es = half ? 2 : 4, nk = N * K, mk = M * K, nm = N * M;
    void *x = tm_rand(t, nk, -1, 1, half), *w = tm_rand(t, mk, -0.3f, 0.3f, half), *b = tm_rand(t, M, -1, 1, half),
         *dy = tm_rand(t, nm, -1, 1, half);
    void *pre = malloc((size_t)(nm * es)), *y = malloc((size_t)(nm * es)), *dx = malloc((size_t)(nk * es)),
         *dw = malloc((size_t)(mk * es)), *db = malloc((size_t)(M * es));
    void *gx = tm_up(t, x, nk * es), *gw = tm_up(t, w, mk * es), *gb = tm_up(t, b, M * es), *gdy = tm_up(t, dy, nm * es);
    void *gpre = tm_up(t, NULL, nm * es), *gy = tm_up(t, NULL, nm * es), *gdx = tm_up(t, NULL, nk * es),
         *gdw = tm_up(t, NULL, mk * es), *gdb = tm_up(t, NULL, M * es);
    if (gelu && half) {
        moek_matmul_bias_gelu_fwd_bf16(&t->cctx, x, w, b, pre, y, N, K, M);
        moek_matmul_bias_gelu_bwd_bf16(&t->cctx, dy, x, w, pre, dx, dw, db, N, K, M);
        t->g.matmul_bias_gelu_fwd_bf16(&t->gctx, gx, gw, gb, gpre, gy, N, K, M);
        t->g.matmul_bias_gelu_bwd_bf16(&t->gctx, gdy, gx, gw, gpre, gdx, gdw, gdb, N, K, M);
    } else if (gelu) {
        moek_matmul_bias_gelu_fwd(&t->cctx, x, w, b, pre, y, N, K, M);
        moek_matmul_bias_gelu_bwd(&t->cctx, dy, x, w, pre, dx, dw, db, N, K, M);
        t->g.matmul_bias_gelu_fwd(&t->gctx, gx, gw, gb, gpre, gy, N, K, M);
        t->g.matmul_bias_gelu_bwd(&t->gctx, gdy, gx, gw, gpre, gdx, gdw, gdb, N, K, M);
    } else if (half) {
        moek_matmul_bias_fwd_bf16(&t->cctx, x, w, b, pre, N, K, M);
        moek_matmul_bias_bwd_bf16(&t->cctx, dy, x, w, dx, dw, db, N, K, M);
        t->g.matmul_bias_fwd_bf16(&t->gctx, gx, gw, gb, gpre, N, K, M);
        t->g.matmul_bias_bwd_bf16(&t->gctx, gdy, gx, gw, gdx, gdw, gdb, N, K, M);
    } else {
        moek_matmul_bias_fwd(&t->cctx, x, w, b, pre, N, K, M);
        moek_matmul_bias_bwd(&t->cctx, dy, x, w, dx, dw, db, N, K, M);
        t->g.matmul_bias_fwd(&t->gctx, gx, gw, gb, gpre, N, K, M);
        t->g.matmul_bias_bwd(&t->gctx, gdy, gx, gw, gdx, gdw, gdb, N, K, M);
    }
    int rc = t->g.device_sync(&t->gctx, t->err, sizeof t->err);
    double e[5] = {tm_cmp(t, gpre, pre, nm, half), gelu ? tm_cmp(t, gy, y, nm, half) : 0,
                   tm_cmp(t, gdx, dx, nk, half), tm_cmp(t, gdw, dw, mk, half), tm_cmp(t, gdb, db, M, half)};
    double tol = half ? 2e-2 : 1e-4, worst = 0;
    for (int i = 0; i < 5; i++)
        worst = e[i] > worst || isnan(e[i]) ? e[i] : worst;
    char name[112];
    snprintf(name, sizeof name, "cuda %s%s == cpu %lldx%lldx%lld", gelu ? "matmul_bias_gelu" : "matmul_bias",
             half ? "_bf16" : "", (long long)N, (long long)K, (long long)M);
    CHECK(name, rc == 0 && t->gst == 0 && t->cst == 0 && worst <= tol,
          "sync %d (%s) gpu %d cpu %d; pre %.3g y %.3g dx %.3g dw %.3g db %.3g (tolerance %.3g)", rc, t->err, t->gst,
          t->cst, e[0], e[1], e[2], e[3], e[4], tol);
    printf("# %s: worst relative error %.3g\n", name, worst);
    void *host[9] = {x, w, b, dy, pre, y, dx, dw, db};
    void *dev[9] = {gx, gw, gb, gdy, gpre, gy, gdx, gdw, gdb};
    for (int i = 0; i < 9; i++) {
        free(host[i]);
        t->g.device_free(&t->gctx, dev[i]);
    }
}

int main(void)
{
    void *lib = ch_open("cuda_fused_mlp_kernels");
    if (!lib)
        return 0;
    tm_env *t = calloc(1, sizeof *t);
#define TM_SYM(n) CH_ENTRY(t->g, n)
    ch_sym syms[] = {TM_SYMS(TM_SYM)};
#undef TM_SYM
    int go = ch_start(lib, "cuda_fused_mlp_kernels", syms, CH_NSYMS(syms), &t->gctx, t->err, sizeof t->err);
    if (go < 0)
        return 1;
    if (go == 0) {
        free(t);
        dlclose(lib);
        return 0;
    }
    t->gctx.status = &t->gst;
    t->cctx.status = &t->cst;
    t->cctx.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(8 << 20);
    t->cctx.workspace = malloc((size_t)t->cctx.workspace_bytes);
    t->rng = 0x2545f4914f6cdd1dull;
    for (int half = 0; half < 2; half++)
        for (int gelu = 0; gelu < 2; gelu++) {
            tm_case(t, gelu, 3, 5, 7, half);
            tm_case(t, gelu, 128, 64, 192, half);   /* dpre: 24 576 values, within the 1 MiB workspace */
        }
    free(t->cctx.workspace);
    t->g.device_fini(&t->gctx);
    free(t);
    CHECK_DONE();
}
