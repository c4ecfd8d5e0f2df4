/* test_kernels_cuda.c - every CUDA kernel against its CPU twin.
 *
 * The CUDA library is dlopened by path ($MOEC_BUILD/libmoek_cuda.so, default
 * build/) so this program links no CUDA; the CPU kernels are linked in
 * (libmoek_cpu.a).  Without the library or a GPU it prints one SKIP line.
 *
 * Each case: fresh random inputs, the GPU outputs poisoned with NaN, both
 * kernels run, then ||gpu - cpu|| / ||cpu|| <= tol (NaN never passes;
 * an all-zero reference needs an all-zero result) and integer outputs equal.
 * tol is 1e-5 (fp32) everywhere, attention and the scalar losses included:
 * on an H100 the worst case seen was 6e-7; the program prints its worst.
 * The bf16 variants are compared with the CPU library's (see tc_bf16). */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"
#include "cuda_harness.h"

/* every kernel and device service, looked up in the CUDA library */
#define TC_KERNELS(X)                                                                          \
    X(fill) X(copy) X(add_fwd) X(accumulate) X(scale_fwd) X(scale_bwd) X(gelu_fwd) X(gelu_bwd)  \
    X(swiglu_fwd) X(swiglu_bwd) X(embedding_fwd) X(embedding_bwd) X(matmul_fwd) X(matmul_bwd)   \
    X(rmsnorm_fwd) X(rmsnorm_bwd) X(rope_fwd) X(rope_bwd) X(attention_fwd) X(attention_bwd)     \
    X(cross_entropy_fwd) X(cross_entropy_bwd) X(softmax_fwd) X(softmax_bwd) X(topk_fwd)         \
    X(topk_bwd) X(balance_loss_fwd) X(balance_loss_bwd) X(zloss_fwd) X(zloss_bwd)               \
    X(dispatch_fwd) X(dispatch_bwd) X(grouped_matmul_fwd) X(grouped_matmul_bwd) X(combine_fwd)  \
    X(combine_bwd) X(sumsq_accum) X(adamw) X(sgd) X(device_count) X(device_init)                \
    X(device_fini) X(device_alloc) X(device_free) X(device_copy) X(device_sync) X(graph_begin)  \
    X(graph_end) X(graph_launch) X(graph_free) TC_BF16_KERNELS(X)

/* the bf16 storage variants */
#define TC_BF16_KERNELS(X)                                                                     \
    X(cast_f32_bf16) X(cast_bf16_f32) X(fill_bf16) X(copy_bf16) X(add_fwd_bf16)                 \
    X(accumulate_bf16) X(scale_fwd_bf16) X(scale_bwd_bf16) X(gelu_fwd_bf16) X(gelu_bwd_bf16)    \
    X(swiglu_fwd_bf16) X(swiglu_bwd_bf16) X(embedding_fwd_bf16) X(embedding_bwd_bf16)           \
    X(matmul_fwd_bf16) X(matmul_bwd_bf16) X(rmsnorm_fwd_bf16) X(rmsnorm_bwd_bf16)               \
    X(rope_fwd_bf16) X(rope_bwd_bf16) X(attention_fwd_bf16) X(attention_bwd_bf16)               \
    X(cross_entropy_fwd_bf16) X(cross_entropy_bwd_bf16) X(softmax_fwd_bf16)                     \
    X(softmax_bwd_bf16) X(zloss_fwd_bf16) X(zloss_bwd_bf16) X(dispatch_fwd_bf16)                \
    X(dispatch_bwd_bf16) X(grouped_matmul_fwd_bf16) X(grouped_matmul_bwd_bf16)                  \
    X(combine_fwd_bf16) X(combine_bwd_bf16) X(adamw_bf16) X(sgd_bf16)

typedef struct {
#define TC_FIELD(n) __typeof__(&moek_##n) n;
    TC_KERNELS(TC_FIELD)
#undef TC_FIELD
} tc_lib;

#define TC_MAXBUF 64

typedef struct {
    tc_lib g;             /* the CUDA library */
    moek_ctx gctx, cctx;  /* GPU and CPU contexts */
    int gstatus, cstatus;
    uint64_t rng;
    void *dev[TC_MAXBUF]; /* this case's device buffers */
    void *host[TC_MAXBUF];
    int ndev, nhost;
    char err[256];
    double worst;         /* largest relative error seen, and where */
    char worst_name[200];
    int bf16;             /* running the bf16 cases: tc_cmp records into worst_side */
    double worst_b, worst_side;   /* bf16 outputs; fp32 outputs of bf16 kernels */
    char worst_b_name[200], worst_side_name[200];
} tc_env;

/* ---- small helpers ------------------------------------------------------ */
static void *tc_hmalloc(tc_env *t, int64_t bytes)
{
    void *p = calloc(1, (size_t)(bytes > 0 ? bytes : 1));
    if (!p || t->nhost >= TC_MAXBUF) {
        fprintf(stderr, "test_kernels_cuda: out of host buffers\n");
        exit(2);
    }
    t->host[t->nhost++] = p;
    return p;
}

static void *tc_dmalloc(tc_env *t, int64_t bytes)
{
    void *p = t->g.device_alloc(&t->gctx, bytes, t->err, sizeof t->err);
    if (!p || t->ndev >= TC_MAXBUF) {
        fprintf(stderr, "test_kernels_cuda: device allocation failed: %s\n", t->err);
        exit(2);
    }
    t->dev[t->ndev++] = p;
    return p;
}

static void tc_h2d(tc_env *t, void *d, const void *h, int64_t bytes)
{
    if (t->g.device_copy(&t->gctx, d, h, bytes, MOEK_COPY_H2D, t->err, sizeof t->err)) {
        fprintf(stderr, "test_kernels_cuda: %s\n", t->err);
        exit(2);
    }
}

static void tc_d2h(tc_env *t, void *h, const void *d, int64_t bytes)
{
    if (t->g.device_copy(&t->gctx, h, d, bytes, MOEK_COPY_D2H, t->err, sizeof t->err)) {
        fprintf(stderr, "test_kernels_cuda: %s\n", t->err);
        exit(2);
    }
}

/* frees this case's buffers */
static void tc_reset(tc_env *t)
{
    for (int i = 0; i < t->ndev; i++)
        t->g.device_free(&t->gctx, t->dev[i]);
    for (int i = 0; i < t->nhost; i++)
        free(t->host[i]);
    t->ndev = t->nhost = 0;
    t->gstatus = t->cstatus = 0;
}

/* a float tensor: h is the CPU side, d the GPU side */
typedef struct {
    float *h, *d;
    int64_t n;
} tc_f;

typedef struct {
    int32_t *h, *d;
    int64_t n;
} tc_i;

/* random input, the same values on both sides */
static tc_f tc_in(tc_env *t, int64_t n, float lo, float hi)
{
    tc_f b = {tc_hmalloc(t, n * 4), tc_dmalloc(t, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = ch_unif(&t->rng, lo, hi);
    tc_h2d(t, b.d, b.h, n * 4);
    return b;
}

/* output: NaN on both sides, so anything left unwritten fails */
static tc_f tc_out(tc_env *t, int64_t n)
{
    tc_f b = {tc_hmalloc(t, n * 4), tc_dmalloc(t, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = NAN;
    tc_h2d(t, b.d, b.h, n * 4);
    return b;
}

static tc_i tc_iin(tc_env *t, int64_t n, int64_t lo, int64_t hi)
{
    tc_i b = {tc_hmalloc(t, n * 4), tc_dmalloc(t, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = (int32_t)(lo + (int64_t)(ch_next(&t->rng) % (uint64_t)(hi - lo)));
    tc_h2d(t, b.d, b.h, n * 4);
    return b;
}

static void tc_iup(tc_env *t, tc_i b) { tc_h2d(t, b.d, b.h, b.n * 4); }

static tc_i tc_iout(tc_env *t, int64_t n)
{
    tc_i b = {tc_hmalloc(t, n * 4), tc_dmalloc(t, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = -12345;
    tc_h2d(t, b.d, b.h, n * 4);
    return b;
}

/* waits for the GPU; false (with a FAIL line) when it or either status failed */
static int tc_sync(tc_env *t, const char *name)
{
    int rc = t->g.device_sync(&t->gctx, t->err, sizeof t->err);
    if (rc || t->gstatus || t->cstatus) {
        CHECK(name, 0, "sync rc %d (%s), gpu status %d, cpu status %d", rc, rc ? t->err : "",
              t->gstatus, t->cstatus);
        return 0;
    }
    return 1;
}

static void tc_cmp(tc_env *t, const char *name, tc_f b, double tol)
{
    float *g = tc_hmalloc(t, b.n * 4);
    tc_d2h(t, g, b.d, b.n * 4);
    double num = 0.0, den = 0.0;
    int64_t bad = -1;
    for (int64_t i = 0; i < b.n; i++) {
        double d = (double)g[i] - b.h[i];
        if (!isfinite(g[i]) && bad < 0)
            bad = i;
        num += d * d;
        den += (double)b.h[i] * b.h[i];
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    double *worst = t->bf16 ? &t->worst_side : &t->worst;
    char *worst_name = t->bf16 ? t->worst_side_name : t->worst_name;
    if (isfinite(rel) && rel > *worst) {
        *worst = rel;
        snprintf(worst_name, sizeof t->worst_name, "%s", name);
    }
    if (bad >= 0)
        CHECK(name, 0, "gpu[%lld] = %g (cpu %g)", (long long)bad, g[bad], b.h[bad]);
    else
        CHECK(name, isfinite(rel) && rel <= tol, "relative error %.3g > %.1g over %lld values",
              rel, tol, (long long)b.n);
}

static void tc_icmp(tc_env *t, const char *name, tc_i b)
{
    int32_t *g = tc_hmalloc(t, b.n * 4);
    tc_d2h(t, g, b.d, b.n * 4);
    int64_t bad = -1;
    for (int64_t i = 0; i < b.n && bad < 0; i++)
        if (g[i] != b.h[i])
            bad = i;
    CHECK(name, bad < 0, "gpu[%lld] = %d, cpu %d", (long long)bad, bad >= 0 ? g[bad] : 0,
          bad >= 0 ? b.h[bad] : 0);
}

#define TOL 1e-5
#define NM(...) (snprintf(name, sizeof name, __VA_ARGS__), name)
#define G (&t->gctx)
#define C (&t->cctx)

/* ---- elementwise -------------------------------------------------------- */
static void tc_elementwise(tc_env *t)
{
    static const int64_t sizes[] = {1, 37, 1000, 65537};
    char name[160];
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int64_t n = sizes[s];
        tc_f a = tc_in(t, n, -3, 3), b = tc_in(t, n, -3, 3), y = tc_out(t, n), z = tc_out(t, n);
        moek_fill(C, y.h, n, 2.5f);
        t->g.fill(G, y.d, n, 2.5f);
        if (tc_sync(t, NM("cuda fill n=%lld", (long long)n)))
            tc_cmp(t, name, y, 0.0);
        moek_copy(C, a.h, y.h, n);
        t->g.copy(G, a.d, y.d, n);
        if (tc_sync(t, NM("cuda copy n=%lld", (long long)n)))
            tc_cmp(t, name, y, 0.0);
        moek_add_fwd(C, a.h, b.h, y.h, n);
        t->g.add_fwd(G, a.d, b.d, y.d, n);
        if (tc_sync(t, NM("cuda add_fwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_accumulate(C, y.h, a.h, n);
        t->g.accumulate(G, y.d, a.d, n);
        if (tc_sync(t, NM("cuda accumulate n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_scale_fwd(C, a.h, y.h, n, -0.37f);
        t->g.scale_fwd(G, a.d, y.d, n, -0.37f);
        if (tc_sync(t, NM("cuda scale_fwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_scale_bwd(C, b.h, y.h, n, 1.7f);
        t->g.scale_bwd(G, b.d, y.d, n, 1.7f);
        if (tc_sync(t, NM("cuda scale_bwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_gelu_fwd(C, a.h, y.h, n);
        t->g.gelu_fwd(G, a.d, y.d, n);
        if (tc_sync(t, NM("cuda gelu_fwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_gelu_bwd(C, b.h, a.h, y.h, n);
        t->g.gelu_bwd(G, b.d, a.d, y.d, n);
        if (tc_sync(t, NM("cuda gelu_bwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_swiglu_fwd(C, a.h, b.h, y.h, n);
        t->g.swiglu_fwd(G, a.d, b.d, y.d, n);
        if (tc_sync(t, NM("cuda swiglu_fwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        tc_f dy = tc_in(t, n, -1, 1);
        moek_swiglu_bwd(C, dy.h, a.h, b.h, y.h, z.h, n);
        t->g.swiglu_bwd(G, dy.d, a.d, b.d, y.d, z.d, n);
        if (tc_sync(t, NM("cuda swiglu_bwd n=%lld", (long long)n))) {
            tc_cmp(t, NM("cuda swiglu_bwd dgate n=%lld", (long long)n), y, TOL);
            tc_cmp(t, NM("cuda swiglu_bwd dup n=%lld", (long long)n), z, TOL);
        }
        tc_reset(t);
    }
}

static void tc_embedding(tc_env *t)
{
    static const int64_t shapes[][3] = {{1, 5, 1}, {37, 5, 13}, {300, 50, 64}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], V = shapes[s][1], D = shapes[s][2];
        tc_i ids = tc_iin(t, N, 0, V);
        tc_f tab = tc_in(t, V * D, -1, 1), out = tc_out(t, N * D), dout = tc_in(t, N * D, -1, 1);
        tc_f dtab = tc_out(t, V * D);
        moek_embedding_fwd(C, ids.h, tab.h, out.h, N, V, D);
        t->g.embedding_fwd(G, ids.d, tab.d, out.d, N, V, D);
        if (tc_sync(t, NM("cuda embedding_fwd N=%lld V=%lld D=%lld", (long long)N, (long long)V,
                          (long long)D)))
            tc_cmp(t, name, out, 0.0);
        moek_embedding_bwd(C, dout.h, ids.h, dtab.h, N, V, D);
        t->g.embedding_bwd(G, dout.d, ids.d, dtab.d, N, V, D);
        if (tc_sync(t, NM("cuda embedding_bwd N=%lld V=%lld D=%lld", (long long)N, (long long)V,
                          (long long)D)))
            tc_cmp(t, name, dtab, TOL);
        tc_reset(t);
    }
}

static void tc_matmul(tc_env *t)
{
    static const int64_t shapes[][3] = {{1, 1, 1}, {37, 19, 23}, {128, 64, 96}, {300, 257, 129},
                                        {4, 7, 0}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], K = shapes[s][1], M = shapes[s][2];
        tc_f x = tc_in(t, N * K, -1, 1), w = tc_in(t, M * K, -1, 1), y = tc_out(t, N * M);
        tc_f dy = tc_in(t, N * M, -1, 1), dx = tc_out(t, N * K), dw = tc_out(t, M * K);
        moek_matmul_fwd(C, x.h, w.h, y.h, N, K, M);
        t->g.matmul_fwd(G, x.d, w.d, y.d, N, K, M);
        if (tc_sync(t, NM("cuda matmul_fwd N=%lld K=%lld M=%lld", (long long)N, (long long)K,
                          (long long)M)))
            tc_cmp(t, name, y, TOL);
        moek_matmul_bwd(C, dy.h, x.h, w.h, dx.h, dw.h, N, K, M);
        t->g.matmul_bwd(G, dy.d, x.d, w.d, dx.d, dw.d, N, K, M);
        if (tc_sync(t, NM("cuda matmul_bwd N=%lld K=%lld M=%lld", (long long)N, (long long)K,
                          (long long)M))) {
            tc_cmp(t, NM("cuda matmul_bwd dx N=%lld K=%lld M=%lld", (long long)N, (long long)K,
                         (long long)M), dx, TOL);
            tc_cmp(t, NM("cuda matmul_bwd dw N=%lld K=%lld M=%lld", (long long)N, (long long)K,
                         (long long)M), dw, TOL);
        }
        tc_reset(t);
    }
}

static void tc_norm(tc_env *t)
{
    static const int64_t shapes[][2] = {{1, 1}, {37, 19}, {64, 1000}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], D = shapes[s][1];
        tc_f x = tc_in(t, N * D, -2, 2), w = tc_in(t, D, 0.5f, 1.5f), y = tc_out(t, N * D);
        tc_f r = tc_out(t, N), dy = tc_in(t, N * D, -1, 1), dx = tc_out(t, N * D), dw = tc_out(t, D);
        moek_rmsnorm_fwd(C, x.h, w.h, y.h, r.h, N, D, 1e-5f);
        t->g.rmsnorm_fwd(G, x.d, w.d, y.d, r.d, N, D, 1e-5f);
        if (tc_sync(t, NM("cuda rmsnorm_fwd N=%lld D=%lld", (long long)N, (long long)D))) {
            tc_cmp(t, name, y, TOL);
            tc_cmp(t, NM("cuda rmsnorm_fwd rstd N=%lld D=%lld", (long long)N, (long long)D), r, TOL);
        }
        moek_rmsnorm_bwd(C, dy.h, x.h, w.h, r.h, dx.h, dw.h, N, D);
        tc_h2d(t, r.d, r.h, N * 4);   /* the same rstd on both sides */
        t->g.rmsnorm_bwd(G, dy.d, x.d, w.d, r.d, dx.d, dw.d, N, D);
        if (tc_sync(t, NM("cuda rmsnorm_bwd N=%lld D=%lld", (long long)N, (long long)D))) {
            tc_cmp(t, NM("cuda rmsnorm_bwd dx N=%lld D=%lld", (long long)N, (long long)D), dx, TOL);
            tc_cmp(t, NM("cuda rmsnorm_bwd dw N=%lld D=%lld", (long long)N, (long long)D), dw, TOL);
        }
        tc_reset(t);
    }
}

static void tc_rope(tc_env *t)
{
    static const int64_t shapes[][4] = {{1, 1, 1, 2}, {2, 37, 3, 10}, {1, 300, 2, 7}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t B = shapes[s][0], T = shapes[s][1], H = shapes[s][2], Dh = shapes[s][3];
        int64_t n = B * T * H * Dh;
        tc_f x = tc_in(t, n, -1, 1), y = tc_out(t, n), dx = tc_out(t, n);
        moek_rope_fwd(C, x.h, y.h, B, T, H, Dh, 10000.0f);
        t->g.rope_fwd(G, x.d, y.d, B, T, H, Dh, 10000.0f);
        if (tc_sync(t, NM("cuda rope_fwd B=%lld T=%lld H=%lld Dh=%lld", (long long)B, (long long)T,
                          (long long)H, (long long)Dh)))
            tc_cmp(t, name, y, TOL);
        moek_rope_bwd(C, x.h, dx.h, B, T, H, Dh, 10000.0f);
        t->g.rope_bwd(G, x.d, dx.d, B, T, H, Dh, 10000.0f);
        if (tc_sync(t, NM("cuda rope_bwd B=%lld T=%lld H=%lld Dh=%lld", (long long)B, (long long)T,
                          (long long)H, (long long)Dh)))
            tc_cmp(t, name, dx, TOL);
        tc_reset(t);
    }
}

static void tc_attention(tc_env *t)
{
    static const int64_t shapes[][4] = {{1, 1, 1, 4}, {2, 37, 3, 16}, {1, 130, 2, 33}, {1, 64, 4, 64}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t B = shapes[s][0], T = shapes[s][1], H = shapes[s][2], Dh = shapes[s][3];
        int64_t n = B * T * H * Dh;
        tc_f q = tc_in(t, n, -1, 1), k = tc_in(t, n, -1, 1), v = tc_in(t, n, -1, 1);
        tc_f o = tc_out(t, n), lse = tc_out(t, B * H * T), dout = tc_in(t, n, -1, 1);
        tc_f dq = tc_out(t, n), dk = tc_out(t, n), dv = tc_out(t, n);
#define SH (long long)B, (long long)T, (long long)H, (long long)Dh
        moek_attention_fwd(C, q.h, k.h, v.h, o.h, lse.h, B, T, H, Dh);
        t->g.attention_fwd(G, q.d, k.d, v.d, o.d, lse.d, B, T, H, Dh);
        if (tc_sync(t, NM("cuda attention_fwd B=%lld T=%lld H=%lld Dh=%lld", SH))) {
            tc_cmp(t, name, o, TOL);
            tc_cmp(t, NM("cuda attention_fwd lse B=%lld T=%lld H=%lld Dh=%lld", SH), lse, TOL);
        }
        /* backward from the CPU's o and lse on both sides */
        tc_h2d(t, o.d, o.h, n * 4);
        tc_h2d(t, lse.d, lse.h, B * H * T * 4);
        moek_attention_bwd(C, dout.h, q.h, k.h, v.h, o.h, lse.h, dq.h, dk.h, dv.h, B, T, H, Dh);
        t->g.attention_bwd(G, dout.d, q.d, k.d, v.d, o.d, lse.d, dq.d, dk.d, dv.d, B, T, H, Dh);
        if (tc_sync(t, NM("cuda attention_bwd B=%lld T=%lld H=%lld Dh=%lld", SH))) {
            tc_cmp(t, NM("cuda attention_bwd dq B=%lld T=%lld H=%lld Dh=%lld", SH), dq, TOL);
            tc_cmp(t, NM("cuda attention_bwd dk B=%lld T=%lld H=%lld Dh=%lld", SH), dk, TOL);
            tc_cmp(t, NM("cuda attention_bwd dv B=%lld T=%lld H=%lld Dh=%lld", SH), dv, TOL);
        }
#undef SH
        tc_reset(t);
    }
}

static void tc_losses(tc_env *t)
{
    static const int64_t shapes[][2] = {{1, 5}, {37, 1000}, {16, 5003}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], V = shapes[s][1];
        tc_f x = tc_in(t, N * V, -4, 4), loss = tc_out(t, 1), lse = tc_out(t, N);
        tc_i y = tc_iin(t, N, 0, V);
        tc_f dl = tc_in(t, 1, 0.5f, 2.0f), dx = tc_out(t, N * V);
        moek_cross_entropy_fwd(C, x.h, y.h, loss.h, lse.h, N, V);
        t->g.cross_entropy_fwd(G, x.d, y.d, loss.d, lse.d, N, V);
        if (tc_sync(t, NM("cuda cross_entropy_fwd N=%lld V=%lld", (long long)N, (long long)V))) {
            tc_cmp(t, name, loss, TOL);
            tc_cmp(t, NM("cuda cross_entropy_fwd lse N=%lld V=%lld", (long long)N, (long long)V),
                   lse, TOL);
        }
        tc_h2d(t, lse.d, lse.h, N * 4);
        moek_cross_entropy_bwd(C, dl.h, x.h, y.h, lse.h, dx.h, N, V);
        t->g.cross_entropy_bwd(G, dl.d, x.d, y.d, lse.d, dx.d, N, V);
        if (tc_sync(t, NM("cuda cross_entropy_bwd N=%lld V=%lld", (long long)N, (long long)V)))
            tc_cmp(t, name, dx, TOL);
        /* z-loss on the same rows */
        moek_zloss_fwd(C, x.h, loss.h, N, V);
        t->g.zloss_fwd(G, x.d, loss.d, N, V);
        if (tc_sync(t, NM("cuda zloss_fwd N=%lld E=%lld", (long long)N, (long long)V)))
            tc_cmp(t, name, loss, TOL);
        moek_zloss_bwd(C, dl.h, x.h, dx.h, N, V);
        t->g.zloss_bwd(G, dl.d, x.d, dx.d, N, V);
        if (tc_sync(t, NM("cuda zloss_bwd N=%lld E=%lld", (long long)N, (long long)V)))
            tc_cmp(t, name, dx, TOL);
        tc_reset(t);
    }
}

/* ---- router --------------------------------------------------------------- */
static void tc_router(tc_env *t)
{
    static const int64_t shapes[][3] = {{1, 1, 1}, {37, 8, 2}, {100, 64, 6}, {5, 300, 300}, {50, 7, 3}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], E = shapes[s][1], k = shapes[s][2];
        tc_f x = tc_in(t, N * E, -3, 3), p = tc_out(t, N * E), dp = tc_in(t, N * E, -1, 1);
        tc_f dx = tc_out(t, N * E);
#define SH (long long)N, (long long)E, (long long)k
        moek_softmax_fwd(C, x.h, p.h, N, E);
        t->g.softmax_fwd(G, x.d, p.d, N, E);
        if (tc_sync(t, NM("cuda softmax_fwd N=%lld E=%lld (k=%lld)", SH)))
            tc_cmp(t, name, p, TOL);
        tc_h2d(t, p.d, p.h, N * E * 4);
        moek_softmax_bwd(C, dp.h, p.h, dx.h, N, E);
        t->g.softmax_bwd(G, dp.d, p.d, dx.d, N, E);
        if (tc_sync(t, NM("cuda softmax_bwd N=%lld E=%lld (k=%lld)", SH)))
            tc_cmp(t, name, dx, TOL);
        /* scores on a coarse grid so that ties are common */
        for (int64_t i = 0; i < N * E; i++)
            x.h[i] = (float)(ch_next(&t->rng) % 5) * 0.25f + 0.1f;
        tc_h2d(t, x.d, x.h, N * E * 4);
        for (int renorm = 0; renorm < 2; renorm++) {
            tc_i idx = tc_iout(t, N * k);
            tc_f gates = tc_out(t, N * k), dg = tc_in(t, N * k, -1, 1), ds = tc_out(t, N * E);
            moek_topk_fwd(C, x.h, idx.h, gates.h, N, E, k, renorm);
            t->g.topk_fwd(G, x.d, idx.d, gates.d, N, E, k, renorm);
            if (tc_sync(t, NM("cuda topk_fwd N=%lld E=%lld k=%lld renorm=%d", SH, renorm))) {
                tc_icmp(t, NM("cuda topk_fwd idx N=%lld E=%lld k=%lld renorm=%d", SH, renorm), idx);
                tc_cmp(t, NM("cuda topk_fwd gates N=%lld E=%lld k=%lld renorm=%d", SH, renorm),
                       gates, TOL);
            }
            tc_iup(t, idx);
            moek_topk_bwd(C, dg.h, x.h, idx.h, ds.h, N, E, k, renorm);
            t->g.topk_bwd(G, dg.d, x.d, idx.d, ds.d, N, E, k, renorm);
            if (tc_sync(t, NM("cuda topk_bwd N=%lld E=%lld k=%lld renorm=%d", SH, renorm)))
                tc_cmp(t, name, ds, TOL);
            if (renorm)
                continue;
            /* balance loss on these choices and the softmax probabilities */
            tc_f loss = tc_out(t, 1), dl = tc_in(t, 1, 0.5f, 2.0f), dpr = tc_out(t, N * E);
            moek_balance_loss_fwd(C, p.h, idx.h, loss.h, N, E, k);
            t->g.balance_loss_fwd(G, p.d, idx.d, loss.d, N, E, k);
            if (tc_sync(t, NM("cuda balance_loss_fwd N=%lld E=%lld k=%lld", SH)))
                tc_cmp(t, name, loss, TOL);
            moek_balance_loss_bwd(C, dl.h, p.h, idx.h, dpr.h, N, E, k);
            t->g.balance_loss_bwd(G, dl.d, p.d, idx.d, dpr.d, N, E, k);
            if (tc_sync(t, NM("cuda balance_loss_bwd N=%lld E=%lld k=%lld", SH)))
                tc_cmp(t, name, dpr, TOL);
        }
#undef SH
        tc_reset(t);
    }
}

/* ---- dispatch, grouped matmul, combine ------------------------------------
 * idx patterns: 0 random distinct choices, 1 expert 0 never used, 2 every
 * token to expert E-1 (k = 1) */
static void tc_moe_case(tc_env *t, int64_t N, int64_t D, int64_t E, int64_t k, int64_t C_,
                        int64_t M, int pattern)
{
    char name[200], sh[120];
    snprintf(sh, sizeof sh, "N=%lld D=%lld E=%lld k=%lld C=%lld M=%lld idx=%d", (long long)N,
             (long long)D, (long long)E, (long long)k, (long long)C_, (long long)M, pattern);
    int64_t S = N * k, R = C_ > 0 ? E * C_ : S;
    tc_i idx = tc_iout(t, S);
    for (int64_t n = 0; n < N; n++) {
        for (int64_t j = 0; j < k; j++) {
            int64_t e;
            int dup;
            do {
                e = pattern == 2 ? E - 1 : pattern == 1 ? 1 + (int64_t)(ch_next(&t->rng) % (uint64_t)(E - 1))
                                                        : (int64_t)(ch_next(&t->rng) % (uint64_t)E);
                dup = 0;
                for (int64_t i = 0; i < j; i++)
                    dup |= idx.h[n * k + i] == e;
            } while (dup);
            idx.h[n * k + j] = (int32_t)e;
        }
    }
    tc_iup(t, idx);
    tc_f x = tc_in(t, N * D, -1, 1), xs = tc_out(t, R * D);
    tc_i slot = tc_iout(t, S), er = tc_iout(t, 2 * E);
    moek_dispatch_fwd(C, x.h, idx.h, xs.h, slot.h, er.h, N, D, E, k, C_);
    t->g.dispatch_fwd(G, x.d, idx.d, xs.d, slot.d, er.d, N, D, E, k, C_);
    if (tc_sync(t, NM("cuda dispatch_fwd %s", sh))) {
        tc_cmp(t, NM("cuda dispatch_fwd xs %s", sh), xs, 0.0);
        tc_icmp(t, NM("cuda dispatch_fwd slot_row %s", sh), slot);
        tc_icmp(t, NM("cuda dispatch_fwd expert_rows %s", sh), er);
    }
    /* the rest runs from the CPU's routing on both sides */
    tc_iup(t, slot);
    tc_iup(t, er);
    tc_h2d(t, xs.d, xs.h, R * D * 4);
    tc_f dxs = tc_in(t, R * D, -1, 1), dx = tc_out(t, N * D);
    moek_dispatch_bwd(C, dxs.h, slot.h, dx.h, N, D, k, R);
    t->g.dispatch_bwd(G, dxs.d, slot.d, dx.d, N, D, k, R);
    if (tc_sync(t, NM("cuda dispatch_bwd %s", sh)))
        tc_cmp(t, name, dx, TOL);
    tc_f w = tc_in(t, E * M * D, -1, 1), ys = tc_out(t, R * M);
    moek_grouped_matmul_fwd(C, xs.h, w.h, er.h, ys.h, R, D, M, E);
    t->g.grouped_matmul_fwd(G, xs.d, w.d, er.d, ys.d, R, D, M, E);
    if (tc_sync(t, NM("cuda grouped_matmul_fwd %s", sh)))
        tc_cmp(t, name, ys, TOL);
    tc_f dys = tc_in(t, R * M, -1, 1), dxs2 = tc_out(t, R * D), dw = tc_out(t, E * M * D);
    moek_grouped_matmul_bwd(C, dys.h, xs.h, w.h, er.h, dxs2.h, dw.h, R, D, M, E);
    t->g.grouped_matmul_bwd(G, dys.d, xs.d, w.d, er.d, dxs2.d, dw.d, R, D, M, E);
    if (tc_sync(t, NM("cuda grouped_matmul_bwd %s", sh))) {
        tc_cmp(t, NM("cuda grouped_matmul_bwd dxs %s", sh), dxs2, TOL);
        tc_cmp(t, NM("cuda grouped_matmul_bwd dw %s", sh), dw, TOL);
    }
    tc_f gates = tc_in(t, S, 0, 1), out = tc_out(t, N * M), dout = tc_in(t, N * M, -1, 1);
    tc_h2d(t, ys.d, ys.h, R * M * 4);
    moek_combine_fwd(C, ys.h, slot.h, gates.h, out.h, N, M, k, R);
    t->g.combine_fwd(G, ys.d, slot.d, gates.d, out.d, N, M, k, R);
    if (tc_sync(t, NM("cuda combine_fwd %s", sh)))
        tc_cmp(t, name, out, TOL);
    tc_f dys2 = tc_out(t, R * M), dg = tc_out(t, S);
    moek_combine_bwd(C, dout.h, ys.h, slot.h, gates.h, dys2.h, dg.h, N, M, k, R);
    t->g.combine_bwd(G, dout.d, ys.d, slot.d, gates.d, dys2.d, dg.d, N, M, k, R);
    if (tc_sync(t, NM("cuda combine_bwd %s", sh))) {
        tc_cmp(t, NM("cuda combine_bwd dys %s", sh), dys2, TOL);
        tc_cmp(t, NM("cuda combine_bwd dgates %s", sh), dg, TOL);
    }
    tc_reset(t);
}

static void tc_moe(tc_env *t)
{
    tc_moe_case(t, 37, 13, 8, 2, 0, 23, 0);     /* dropless */
    tc_moe_case(t, 37, 13, 8, 2, 5, 23, 0);     /* capacity 5: drops */
    tc_moe_case(t, 37, 13, 8, 2, 12, 23, 1);    /* expert 0 gets nothing */
    tc_moe_case(t, 37, 13, 8, 2, 0, 23, 1);
    tc_moe_case(t, 50, 19, 4, 1, 0, 9, 2);      /* all tokens to one expert */
    tc_moe_case(t, 50, 19, 4, 1, 20, 9, 2);     /* ... over capacity */
    tc_moe_case(t, 1, 7, 3, 1, 0, 5, 0);        /* a single token */
    tc_moe_case(t, 1, 7, 3, 2, 1, 5, 0);
    tc_moe_case(t, 300, 64, 16, 4, 0, 96, 0);   /* blocks over several tiles */
    tc_moe_case(t, 300, 64, 16, 4, 70, 96, 0);
}

/* ---- optimizer ------------------------------------------------------------ */
static void tc_optim(tc_env *t)
{
    static const int64_t sizes[] = {1, 37, 100003};
    char name[160];
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int64_t n = sizes[s];
        tc_f x = tc_in(t, n, -2, 2), acc = tc_in(t, 1, 1.0f, 2.0f);
        moek_sumsq_accum(C, x.h, acc.h, n);
        t->g.sumsq_accum(G, x.d, acc.d, n);
        if (tc_sync(t, NM("cuda sumsq_accum n=%lld", (long long)n)))
            tc_cmp(t, name, acc, TOL);
        for (int clip = 0; clip < 2; clip++) {
            float hyper[MOEK_HYPER_COUNT] = {0};
            hyper[MOEK_HYPER_LR] = 1e-2f;
            hyper[MOEK_HYPER_BETA1] = 0.9f;
            hyper[MOEK_HYPER_BETA2] = 0.95f;
            hyper[MOEK_HYPER_EPS] = 1e-8f;
            hyper[MOEK_HYPER_BC1] = 1.0f - 0.9f * 0.9f * 0.9f;
            hyper[MOEK_HYPER_BC2] = 1.0f - 0.95f * 0.95f * 0.95f;
            hyper[MOEK_HYPER_MAX_NORM] = clip ? 0.5f : 0.0f;
            hyper[MOEK_HYPER_MOMENTUM] = 0.9f;
            tc_f hy = tc_in(t, MOEK_HYPER_COUNT, 0, 1);
            memcpy(hy.h, hyper, sizeof hyper);
            tc_h2d(t, hy.d, hy.h, sizeof hyper);
            tc_f p = tc_in(t, n, -1, 1), g = tc_in(t, n, -1, 1), m = tc_in(t, n, -0.1f, 0.1f);
            tc_f v = tc_in(t, n, 0, 0.1f), ns = tc_in(t, 1, 4.0f, 9.0f);
            moek_adamw(C, p.h, g.h, m.h, v.h, n, hy.h, ns.h, 0.1f);
            t->g.adamw(G, p.d, g.d, m.d, v.d, n, hy.d, ns.d, 0.1f);
            if (tc_sync(t, NM("cuda adamw n=%lld clip=%d", (long long)n, clip))) {
                tc_cmp(t, NM("cuda adamw p n=%lld clip=%d", (long long)n, clip), p, TOL);
                tc_cmp(t, NM("cuda adamw m n=%lld clip=%d", (long long)n, clip), m, TOL);
                tc_cmp(t, NM("cuda adamw v n=%lld clip=%d", (long long)n, clip), v, TOL);
            }
            moek_sgd(C, p.h, g.h, m.h, n, hy.h, clip ? ns.h : NULL, 0.01f);
            t->g.sgd(G, p.d, g.d, m.d, n, hy.d, clip ? ns.d : NULL, 0.01f);
            if (tc_sync(t, NM("cuda sgd n=%lld clip=%d", (long long)n, clip))) {
                tc_cmp(t, NM("cuda sgd p n=%lld clip=%d", (long long)n, clip), p, TOL);
                tc_cmp(t, NM("cuda sgd buf n=%lld clip=%d", (long long)n, clip), m, TOL);
            }
        }
        tc_reset(t);
    }
}

/* ---- device services, graphs, error paths --------------------------------- */
static void tc_services(tc_env *t)
{
    int64_t n = 1000;
    float *a = tc_hmalloc(t, n * 4), *b = tc_hmalloc(t, n * 4);
    for (int64_t i = 0; i < n; i++)
        a[i] = (float)i * 0.5f;
    float *d1 = tc_dmalloc(t, n * 4), *d2 = tc_dmalloc(t, n * 4);
    tc_d2h(t, b, d1, n * 4);
    int zero = 1;
    for (int64_t i = 0; i < n; i++)
        zero &= b[i] == 0.0f;
    CHECK("cuda device_alloc returns zeroed memory", zero, "non-zero byte in a fresh buffer");
    int rc = t->g.device_copy(&t->gctx, d1, a, n * 4, MOEK_COPY_H2D, t->err, sizeof t->err);
    rc |= t->g.device_copy(&t->gctx, d2, d1, n * 4, MOEK_COPY_D2D, t->err, sizeof t->err);
    rc |= t->g.device_copy(&t->gctx, b, d2, n * 4, MOEK_COPY_D2H, t->err, sizeof t->err);
    CHECK("cuda device_copy H2D, D2D, D2H roundtrip", rc == 0 && !memcmp(a, b, (size_t)n * 4),
          "rc %d (%s)", rc, t->err);
    rc = t->g.device_copy(&t->gctx, b, d2, n * 4, 7, t->err, sizeof t->err);
    printf("# bad copy kind: %s\n", t->err);
    CHECK("cuda device_copy rejects an unknown kind", rc == -1 && strstr(t->err, "unknown copy kind"),
          "rc %d", rc);
    moek_ctx bad = {0};
    rc = t->g.device_init(&bad, 999, 0, t->err, sizeof t->err);
    printf("# bad device index: %s\n", t->err);
    CHECK("cuda device_init rejects a bad index", rc == -1 && strstr(t->err, "out of range"), "rc %d", rc);
    tc_reset(t);

    /* a bad token id: reported at sync as MOEK_E_INDEX, output row zero */
    tc_i ids = tc_iin(t, 4, 0, 3);
    ids.h[2] = 99;
    tc_iup(t, ids);
    tc_f tab = tc_in(t, 3 * 5, -1, 1), out = tc_out(t, 4 * 5);
    t->g.embedding_fwd(G, ids.d, tab.d, out.d, 4, 3, 5);
    rc = t->g.device_sync(G, t->err, sizeof t->err);
    printf("# bad token id: %s\n", t->err);
    CHECK("cuda a bad index is reported at sync", rc == -1 && t->gstatus == MOEK_E_INDEX &&
          strstr(t->err, "MOEK_E_INDEX"), "rc %d status %d (%s)", rc, t->gstatus, t->err);
    t->gstatus = 0;
    rc = t->g.device_sync(G, t->err, sizeof t->err);
    CHECK("cuda the device status flag is reported once", rc == 0 && t->gstatus == 0, "rc %d", rc);
    /* a bad size: MOEK_E_SHAPE straight away */
    t->g.fill(G, out.d, -1, 0.0f);
    CHECK("cuda a negative size sets MOEK_E_SHAPE", t->gstatus == MOEK_E_SHAPE, "status %d",
          t->gstatus);
    tc_reset(t);

    /* graph: capture matmul + rmsnorm + attention, replay twice, compare
     * bit for bit with the same ops run one by one */
    int64_t N = 64, K = 48, M = 64, H = 2, T = 32, Dh = 32;
    tc_f x = tc_in(t, N * K, -1, 1), w = tc_in(t, M * K, -1, 1), nw = tc_in(t, M, 0.5f, 1.5f);
    tc_f y = tc_out(t, N * M), yn = tc_out(t, N * M), r = tc_out(t, N), o = tc_out(t, N * M);
    tc_f lse = tc_out(t, 2 * H * T);
    float *eager = tc_hmalloc(t, N * M * 4), *replay = tc_hmalloc(t, N * M * 4);
#define TC_STEP()                                                                         \
    do {                                                                                  \
        t->g.matmul_fwd(G, x.d, w.d, y.d, N, K, M);                                       \
        t->g.rmsnorm_fwd(G, y.d, nw.d, yn.d, r.d, N, M, 1e-5f);                           \
        t->g.attention_fwd(G, yn.d, yn.d, y.d, o.d, lse.d, 2, T, H, Dh);                  \
    } while (0)
    TC_STEP();
    if (!tc_sync(t, "cuda graph: eager run"))
        goto out;
    tc_d2h(t, eager, o.d, N * M * 4);
    tc_h2d(t, o.d, o.h, N * M * 4);   /* poison again */
    void *graph = NULL;
    rc = t->g.graph_begin(G, t->err, sizeof t->err);
    if (rc == 0) {
        TC_STEP();
        rc = t->g.graph_end(G, &graph, t->err, sizeof t->err);
    }
    CHECK("cuda graph capture", rc == 0 && graph, "%s", t->err);
    if (rc == 0 && graph) {
        int same = 1;
        for (int rep = 0; rep < 2; rep++) {
            rc = t->g.graph_launch(G, graph, t->err, sizeof t->err);
            rc |= t->g.device_sync(G, t->err, sizeof t->err);
            tc_d2h(t, replay, o.d, N * M * 4);
            same &= rc == 0 && !memcmp(eager, replay, (size_t)(N * M * 4));
        }
        CHECK("cuda graph replay matches the eager run bit for bit", same, "rc %d (%s)", rc, t->err);
        t->g.graph_free(graph);
    }
#undef TC_STEP
out:
    tc_reset(t);
}

/* ---- bf16 storage -----------------------------------------------------------
 * Every _bf16 variant against the CPU library's (widen, fp32 kernel, round
 * once), on the same bf16 inputs.  bf16 outputs: ||gpu - cpu|| / ||cpu|| <=
 * 1e-2 (a few elements may round the other way when the fp32 results differ
 * by an ulp; cuBLAS sums in another order); fp32 side outputs (lse, rstd,
 * probabilities, losses, dgates, master weights, moments) <= 1e-3. */
#define TOL_B 1e-2
#define TOL_SIDE 1e-3

static uint16_t tc_round(float f)   /* RNE, NaN kept NaN (as the ABI says) */
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float tc_widen(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* a bf16 tensor: h the CPU side, d the GPU side */
typedef struct {
    moek_bf16 *h, *d;
    int64_t n;
} tc_b;

static tc_b tc_bin(tc_env *t, int64_t n, float lo, float hi)
{
    tc_b b = {tc_hmalloc(t, n * 2), tc_dmalloc(t, n * 2), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = tc_round(ch_unif(&t->rng, lo, hi));
    tc_h2d(t, b.d, b.h, n * 2);
    return b;
}

/* poisoned with NaN on both sides */
static tc_b tc_bout(tc_env *t, int64_t n)
{
    tc_b b = {tc_hmalloc(t, n * 2), tc_dmalloc(t, n * 2), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = 0x7fc0;
    tc_h2d(t, b.d, b.h, n * 2);
    return b;
}

static void tc_bup(tc_env *t, tc_b b) { tc_h2d(t, b.d, b.h, b.n * 2); }

static void tc_bcmp(tc_env *t, const char *name, tc_b b, double tol)
{
    moek_bf16 *g = tc_hmalloc(t, b.n * 2);
    tc_d2h(t, g, b.d, b.n * 2);
    double num = 0.0, den = 0.0;
    int64_t bad = -1;
    for (int64_t i = 0; i < b.n; i++) {
        double gv = tc_widen(g[i]), cv = tc_widen(b.h[i]);
        if (!isfinite(gv) && bad < 0)
            bad = i;
        num += (gv - cv) * (gv - cv);
        den += cv * cv;
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (isfinite(rel) && rel > t->worst_b) {
        t->worst_b = rel;
        snprintf(t->worst_b_name, sizeof t->worst_b_name, "%s", name);
    }
    if (bad >= 0)
        CHECK(name, 0, "gpu[%lld] = %g (cpu %g)", (long long)bad, tc_widen(g[bad]),
              tc_widen(b.h[bad]));
    else
        CHECK(name, isfinite(rel) && rel <= tol, "relative error %.3g > %.1g over %lld values",
              rel, tol, (long long)b.n);
}

static void tc_b_elementwise(tc_env *t)
{
    static const int64_t sizes[] = {1, 37, 1000, 65537};
    char name[160];
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int64_t n = sizes[s];
        /* casts: fp32 values between bf16 neighbours, exact ties included */
        tc_f xf = tc_in(t, n, -3, 3), yf = tc_out(t, n);
        static const float ties[] = {1.00390625f, 1.01171875f, -1.00390625f, 3.0e38f, 1e-40f};
        for (size_t i = 0; i < sizeof ties / sizeof *ties && (int64_t)i < n; i++)
            xf.h[i] = ties[i];
        tc_h2d(t, xf.d, xf.h, n * 4);
        tc_b yb = tc_bout(t, n);
        moek_cast_f32_bf16(C, xf.h, yb.h, n);
        t->g.cast_f32_bf16(G, xf.d, yb.d, n);
        if (tc_sync(t, NM("cuda cast_f32_bf16 n=%lld", (long long)n)))
            tc_bcmp(t, name, yb, 0.0);
        tc_bup(t, yb);
        moek_cast_bf16_f32(C, yb.h, yf.h, n);
        t->g.cast_bf16_f32(G, yb.d, yf.d, n);
        if (tc_sync(t, NM("cuda cast_bf16_f32 n=%lld", (long long)n)))
            tc_cmp(t, name, yf, 0.0);

        tc_b a = tc_bin(t, n, -3, 3), b = tc_bin(t, n, -3, 3), y = tc_bout(t, n), z = tc_bout(t, n);
        moek_fill_bf16(C, y.h, n, 2.5f);
        t->g.fill_bf16(G, y.d, n, 2.5f);
        if (tc_sync(t, NM("cuda fill_bf16 n=%lld", (long long)n)))
            tc_bcmp(t, name, y, 0.0);
        moek_copy_bf16(C, a.h, y.h, n);
        t->g.copy_bf16(G, a.d, y.d, n);
        if (tc_sync(t, NM("cuda copy_bf16 n=%lld", (long long)n)))
            tc_bcmp(t, name, y, 0.0);
        moek_add_fwd_bf16(C, a.h, b.h, y.h, n);
        t->g.add_fwd_bf16(G, a.d, b.d, y.d, n);
        if (tc_sync(t, NM("cuda add_fwd_bf16 n=%lld", (long long)n)))
            tc_bcmp(t, name, y, TOL_B);
        tc_f acc = tc_in(t, n, -1, 1);
        moek_accumulate_bf16(C, acc.h, a.h, n);
        t->g.accumulate_bf16(G, acc.d, a.d, n);
        if (tc_sync(t, NM("cuda accumulate_bf16 n=%lld", (long long)n)))
            tc_cmp(t, name, acc, TOL_SIDE);
        moek_scale_fwd_bf16(C, a.h, y.h, n, -0.37f);
        t->g.scale_fwd_bf16(G, a.d, y.d, n, -0.37f);
        if (tc_sync(t, NM("cuda scale_fwd_bf16 n=%lld", (long long)n)))
            tc_bcmp(t, name, y, TOL_B);
        moek_scale_bwd_bf16(C, b.h, y.h, n, 1.7f);
        t->g.scale_bwd_bf16(G, b.d, y.d, n, 1.7f);
        if (tc_sync(t, NM("cuda scale_bwd_bf16 n=%lld", (long long)n)))
            tc_bcmp(t, name, y, TOL_B);
        moek_gelu_fwd_bf16(C, a.h, y.h, n);
        t->g.gelu_fwd_bf16(G, a.d, y.d, n);
        if (tc_sync(t, NM("cuda gelu_fwd_bf16 n=%lld", (long long)n)))
            tc_bcmp(t, name, y, TOL_B);
        moek_gelu_bwd_bf16(C, b.h, a.h, y.h, n);
        t->g.gelu_bwd_bf16(G, b.d, a.d, y.d, n);
        if (tc_sync(t, NM("cuda gelu_bwd_bf16 n=%lld", (long long)n)))
            tc_bcmp(t, name, y, TOL_B);
        moek_swiglu_fwd_bf16(C, a.h, b.h, y.h, n);
        t->g.swiglu_fwd_bf16(G, a.d, b.d, y.d, n);
        if (tc_sync(t, NM("cuda swiglu_fwd_bf16 n=%lld", (long long)n)))
            tc_bcmp(t, name, y, TOL_B);
        tc_b dy = tc_bin(t, n, -1, 1);
        moek_swiglu_bwd_bf16(C, dy.h, a.h, b.h, y.h, z.h, n);
        t->g.swiglu_bwd_bf16(G, dy.d, a.d, b.d, y.d, z.d, n);
        if (tc_sync(t, NM("cuda swiglu_bwd_bf16 n=%lld", (long long)n))) {
            tc_bcmp(t, NM("cuda swiglu_bwd_bf16 dgate n=%lld", (long long)n), y, TOL_B);
            tc_bcmp(t, NM("cuda swiglu_bwd_bf16 dup n=%lld", (long long)n), z, TOL_B);
        }
        tc_reset(t);
    }
}

static void tc_b_embedding(tc_env *t)
{
    /* the last: several id tiles of the bf16 backward, ids 300.. unused */
    static const int64_t shapes[][3] = {{1, 5, 1}, {37, 5, 13}, {300, 50, 64}, {500, 700, 45}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], V = shapes[s][1], D = shapes[s][2];
        tc_i ids = tc_iin(t, N, 0, V < 300 ? V : 300);
        tc_b tab = tc_bin(t, V * D, -1, 1), out = tc_bout(t, N * D), dout = tc_bin(t, N * D, -1, 1);
        tc_b dtab = tc_bout(t, V * D);
#define SH (long long)N, (long long)V, (long long)D
        moek_embedding_fwd_bf16(C, ids.h, tab.h, out.h, N, V, D);
        t->g.embedding_fwd_bf16(G, ids.d, tab.d, out.d, N, V, D);
        if (tc_sync(t, NM("cuda embedding_fwd_bf16 N=%lld V=%lld D=%lld", SH)))
            tc_bcmp(t, name, out, 0.0);
        moek_embedding_bwd_bf16(C, dout.h, ids.h, dtab.h, N, V, D);
        t->g.embedding_bwd_bf16(G, dout.d, ids.d, dtab.d, N, V, D);
        if (tc_sync(t, NM("cuda embedding_bwd_bf16 N=%lld V=%lld D=%lld", SH)))
            tc_bcmp(t, name, dtab, TOL_B);
#undef SH
        tc_reset(t);
    }
    /* errors of the tiled bf16 backward: a bad id at sync, a vocabulary too
     * big for its grid at once (nothing is touched before the check) */
    tc_i ids = tc_iin(t, 4, 0, 3);
    ids.h[1] = -2;
    tc_iup(t, ids);
    tc_b dout = tc_bin(t, 4 * 5, -1, 1), dtab = tc_bout(t, 3 * 5);
    t->g.embedding_bwd_bf16(G, dout.d, ids.d, dtab.d, 4, 3, 5);
    int rc = t->g.device_sync(G, t->err, sizeof t->err);
    printf("# bad token id (embedding_bwd_bf16): %s\n", t->err);
    CHECK("cuda embedding_bwd_bf16 reports a bad id at sync",
          rc == -1 && t->gstatus == MOEK_E_INDEX && strstr(t->err, "MOEK_E_INDEX"),
          "rc %d status %d", rc, t->gstatus);
    t->gstatus = 0;
    t->g.embedding_bwd_bf16(G, dout.d, ids.d, dtab.d, 4, (int64_t)1 << 25, 5);
    CHECK("cuda embedding_bwd_bf16 rejects a vocabulary over 2^24 ids",
          t->gstatus == MOEK_E_SHAPE, "status %d", t->gstatus);
    tc_reset(t);
}

static void tc_b_matmul(tc_env *t)
{
    static const int64_t shapes[][3] = {{1, 1, 1}, {37, 19, 23}, {128, 64, 96}, {300, 257, 129},
                                        {4, 7, 0}, {3, 0, 5}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], K = shapes[s][1], M = shapes[s][2];
        tc_b x = tc_bin(t, N * K, -1, 1), w = tc_bin(t, M * K, -1, 1), y = tc_bout(t, N * M);
        tc_b dy = tc_bin(t, N * M, -1, 1), dx = tc_bout(t, N * K), dw = tc_bout(t, M * K);
#define SH (long long)N, (long long)K, (long long)M
        moek_matmul_fwd_bf16(C, x.h, w.h, y.h, N, K, M);
        t->g.matmul_fwd_bf16(G, x.d, w.d, y.d, N, K, M);
        if (tc_sync(t, NM("cuda matmul_fwd_bf16 N=%lld K=%lld M=%lld", SH)))
            tc_bcmp(t, name, y, TOL_B);
        moek_matmul_bwd_bf16(C, dy.h, x.h, w.h, dx.h, dw.h, N, K, M);
        t->g.matmul_bwd_bf16(G, dy.d, x.d, w.d, dx.d, dw.d, N, K, M);
        if (tc_sync(t, NM("cuda matmul_bwd_bf16 N=%lld K=%lld M=%lld", SH))) {
            tc_bcmp(t, NM("cuda matmul_bwd_bf16 dx N=%lld K=%lld M=%lld", SH), dx, TOL_B);
            tc_bcmp(t, NM("cuda matmul_bwd_bf16 dw N=%lld K=%lld M=%lld", SH), dw, TOL_B);
        }
#undef SH
        tc_reset(t);
    }
}

static void tc_b_norm_rope(tc_env *t)
{
    static const int64_t shapes[][2] = {{1, 1}, {37, 19}, {64, 1000}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], D = shapes[s][1];
        tc_b x = tc_bin(t, N * D, -2, 2), w = tc_bin(t, D, 0.5f, 1.5f), y = tc_bout(t, N * D);
        tc_f r = tc_out(t, N);
        tc_b dy = tc_bin(t, N * D, -1, 1), dx = tc_bout(t, N * D), dw = tc_bout(t, D);
        moek_rmsnorm_fwd_bf16(C, x.h, w.h, y.h, r.h, N, D, 1e-5f);
        t->g.rmsnorm_fwd_bf16(G, x.d, w.d, y.d, r.d, N, D, 1e-5f);
        if (tc_sync(t, NM("cuda rmsnorm_fwd_bf16 N=%lld D=%lld", (long long)N, (long long)D))) {
            tc_bcmp(t, name, y, TOL_B);
            tc_cmp(t, NM("cuda rmsnorm_fwd_bf16 rstd N=%lld D=%lld", (long long)N, (long long)D), r,
                   TOL_SIDE);
        }
        tc_h2d(t, r.d, r.h, N * 4);
        moek_rmsnorm_bwd_bf16(C, dy.h, x.h, w.h, r.h, dx.h, dw.h, N, D);
        t->g.rmsnorm_bwd_bf16(G, dy.d, x.d, w.d, r.d, dx.d, dw.d, N, D);
        if (tc_sync(t, NM("cuda rmsnorm_bwd_bf16 N=%lld D=%lld", (long long)N, (long long)D))) {
            tc_bcmp(t, NM("cuda rmsnorm_bwd_bf16 dx N=%lld D=%lld", (long long)N, (long long)D), dx,
                    TOL_B);
            tc_bcmp(t, NM("cuda rmsnorm_bwd_bf16 dw N=%lld D=%lld", (long long)N, (long long)D), dw,
                    TOL_B);
        }
        tc_reset(t);
    }
    static const int64_t rshapes[][4] = {{1, 1, 1, 2}, {2, 37, 3, 10}, {1, 300, 2, 7}};
    for (size_t s = 0; s < sizeof rshapes / sizeof *rshapes; s++) {
        int64_t B = rshapes[s][0], T = rshapes[s][1], H = rshapes[s][2], Dh = rshapes[s][3];
        int64_t n = B * T * H * Dh;
        tc_b x = tc_bin(t, n, -1, 1), y = tc_bout(t, n), dx = tc_bout(t, n);
#define SH (long long)B, (long long)T, (long long)H, (long long)Dh
        moek_rope_fwd_bf16(C, x.h, y.h, B, T, H, Dh, 10000.0f);
        t->g.rope_fwd_bf16(G, x.d, y.d, B, T, H, Dh, 10000.0f);
        if (tc_sync(t, NM("cuda rope_fwd_bf16 B=%lld T=%lld H=%lld Dh=%lld", SH)))
            tc_bcmp(t, name, y, TOL_B);
        moek_rope_bwd_bf16(C, x.h, dx.h, B, T, H, Dh, 10000.0f);
        t->g.rope_bwd_bf16(G, x.d, dx.d, B, T, H, Dh, 10000.0f);
        if (tc_sync(t, NM("cuda rope_bwd_bf16 B=%lld T=%lld H=%lld Dh=%lld", SH)))
            tc_bcmp(t, name, dx, TOL_B);
#undef SH
        tc_reset(t);
    }
}

static void tc_b_attention(tc_env *t)
{
    static const int64_t shapes[][4] = {{1, 1, 1, 4}, {2, 37, 3, 16}, {1, 130, 2, 33}, {1, 64, 4, 64}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t B = shapes[s][0], T = shapes[s][1], H = shapes[s][2], Dh = shapes[s][3];
        int64_t n = B * T * H * Dh;
        tc_b q = tc_bin(t, n, -1, 1), k = tc_bin(t, n, -1, 1), v = tc_bin(t, n, -1, 1);
        tc_b o = tc_bout(t, n), dout = tc_bin(t, n, -1, 1);
        tc_f lse = tc_out(t, B * H * T);
        tc_b dq = tc_bout(t, n), dk = tc_bout(t, n), dv = tc_bout(t, n);
#define SH (long long)B, (long long)T, (long long)H, (long long)Dh
        moek_attention_fwd_bf16(C, q.h, k.h, v.h, o.h, lse.h, B, T, H, Dh);
        t->g.attention_fwd_bf16(G, q.d, k.d, v.d, o.d, lse.d, B, T, H, Dh);
        if (tc_sync(t, NM("cuda attention_fwd_bf16 B=%lld T=%lld H=%lld Dh=%lld", SH))) {
            tc_bcmp(t, name, o, TOL_B);
            tc_cmp(t, NM("cuda attention_fwd_bf16 lse B=%lld T=%lld H=%lld Dh=%lld", SH), lse,
                   TOL_SIDE);
        }
        tc_bup(t, o);   /* backward from the CPU's o and lse on both sides */
        tc_h2d(t, lse.d, lse.h, B * H * T * 4);
        moek_attention_bwd_bf16(C, dout.h, q.h, k.h, v.h, o.h, lse.h, dq.h, dk.h, dv.h, B, T, H, Dh);
        t->g.attention_bwd_bf16(G, dout.d, q.d, k.d, v.d, o.d, lse.d, dq.d, dk.d, dv.d, B, T, H,
                                Dh);
        if (tc_sync(t, NM("cuda attention_bwd_bf16 B=%lld T=%lld H=%lld Dh=%lld", SH))) {
            tc_bcmp(t, NM("cuda attention_bwd_bf16 dq B=%lld T=%lld H=%lld Dh=%lld", SH), dq, TOL_B);
            tc_bcmp(t, NM("cuda attention_bwd_bf16 dk B=%lld T=%lld H=%lld Dh=%lld", SH), dk, TOL_B);
            tc_bcmp(t, NM("cuda attention_bwd_bf16 dv B=%lld T=%lld H=%lld Dh=%lld", SH), dv, TOL_B);
        }
#undef SH
        tc_reset(t);
    }
}

static void tc_b_losses(tc_env *t)
{
    static const int64_t shapes[][2] = {{1, 5}, {37, 1000}, {16, 5003}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], V = shapes[s][1];
        tc_b x = tc_bin(t, N * V, -4, 4), dx = tc_bout(t, N * V);
        tc_f loss = tc_out(t, 1), lse = tc_out(t, N), dl = tc_in(t, 1, 0.5f, 2.0f);
        tc_i y = tc_iin(t, N, 0, V);
#define SH (long long)N, (long long)V
        moek_cross_entropy_fwd_bf16(C, x.h, y.h, loss.h, lse.h, N, V);
        t->g.cross_entropy_fwd_bf16(G, x.d, y.d, loss.d, lse.d, N, V);
        if (tc_sync(t, NM("cuda cross_entropy_fwd_bf16 N=%lld V=%lld", SH))) {
            tc_cmp(t, name, loss, TOL_SIDE);
            tc_cmp(t, NM("cuda cross_entropy_fwd_bf16 lse N=%lld V=%lld", SH), lse, TOL_SIDE);
        }
        tc_h2d(t, lse.d, lse.h, N * 4);
        moek_cross_entropy_bwd_bf16(C, dl.h, x.h, y.h, lse.h, dx.h, N, V);
        t->g.cross_entropy_bwd_bf16(G, dl.d, x.d, y.d, lse.d, dx.d, N, V);
        if (tc_sync(t, NM("cuda cross_entropy_bwd_bf16 N=%lld V=%lld", SH)))
            tc_bcmp(t, name, dx, TOL_B);
        moek_zloss_fwd_bf16(C, x.h, loss.h, N, V);
        t->g.zloss_fwd_bf16(G, x.d, loss.d, N, V);
        if (tc_sync(t, NM("cuda zloss_fwd_bf16 N=%lld E=%lld", SH)))
            tc_cmp(t, name, loss, TOL_SIDE);
        moek_zloss_bwd_bf16(C, dl.h, x.h, dx.h, N, V);
        t->g.zloss_bwd_bf16(G, dl.d, x.d, dx.d, N, V);
        if (tc_sync(t, NM("cuda zloss_bwd_bf16 N=%lld E=%lld", SH)))
            tc_bcmp(t, name, dx, TOL_B);
        /* router softmax on the same logits: fp32 probabilities */
        tc_f p = tc_out(t, N * V), dp = tc_in(t, N * V, -1, 1);
        moek_softmax_fwd_bf16(C, x.h, p.h, N, V);
        t->g.softmax_fwd_bf16(G, x.d, p.d, N, V);
        if (tc_sync(t, NM("cuda softmax_fwd_bf16 N=%lld E=%lld", SH)))
            tc_cmp(t, name, p, TOL_SIDE);
        tc_h2d(t, p.d, p.h, N * V * 4);
        moek_softmax_bwd_bf16(C, dp.h, p.h, dx.h, N, V);
        t->g.softmax_bwd_bf16(G, dp.d, p.d, dx.d, N, V);
        if (tc_sync(t, NM("cuda softmax_bwd_bf16 N=%lld E=%lld", SH)))
            tc_bcmp(t, name, dx, TOL_B);
#undef SH
        tc_reset(t);
    }
}

/* idx patterns as in tc_moe_case */
static void tc_b_moe_case(tc_env *t, int64_t N, int64_t D, int64_t E, int64_t k, int64_t C_,
                          int64_t M, int pattern)
{
    char name[200], sh[120];
    snprintf(sh, sizeof sh, "N=%lld D=%lld E=%lld k=%lld C=%lld M=%lld idx=%d", (long long)N,
             (long long)D, (long long)E, (long long)k, (long long)C_, (long long)M, pattern);
    int64_t S = N * k, R = C_ > 0 ? E * C_ : S;
    tc_i idx = tc_iout(t, S);
    for (int64_t n = 0; n < N; n++) {
        for (int64_t j = 0; j < k; j++) {
            int64_t e;
            int dup;
            do {
                e = pattern == 2 ? E - 1 : pattern == 1 ? 1 + (int64_t)(ch_next(&t->rng) % (uint64_t)(E - 1))
                                                        : (int64_t)(ch_next(&t->rng) % (uint64_t)E);
                dup = 0;
                for (int64_t i = 0; i < j; i++)
                    dup |= idx.h[n * k + i] == e;
            } while (dup);
            idx.h[n * k + j] = (int32_t)e;
        }
    }
    tc_iup(t, idx);
    tc_b x = tc_bin(t, N * D, -1, 1), xs = tc_bout(t, R * D);
    tc_i slot = tc_iout(t, S), er = tc_iout(t, 2 * E);
    moek_dispatch_fwd_bf16(C, x.h, idx.h, xs.h, slot.h, er.h, N, D, E, k, C_);
    t->g.dispatch_fwd_bf16(G, x.d, idx.d, xs.d, slot.d, er.d, N, D, E, k, C_);
    if (tc_sync(t, NM("cuda dispatch_fwd_bf16 %s", sh))) {
        tc_bcmp(t, NM("cuda dispatch_fwd_bf16 xs %s", sh), xs, 0.0);
        tc_icmp(t, NM("cuda dispatch_fwd_bf16 slot_row %s", sh), slot);
        tc_icmp(t, NM("cuda dispatch_fwd_bf16 expert_rows %s", sh), er);
    }
    tc_iup(t, slot);
    tc_iup(t, er);
    tc_bup(t, xs);
    tc_b dxs = tc_bin(t, R * D, -1, 1), dx = tc_bout(t, N * D);
    moek_dispatch_bwd_bf16(C, dxs.h, slot.h, dx.h, N, D, k, R);
    t->g.dispatch_bwd_bf16(G, dxs.d, slot.d, dx.d, N, D, k, R);
    if (tc_sync(t, NM("cuda dispatch_bwd_bf16 %s", sh)))
        tc_bcmp(t, name, dx, TOL_B);
    tc_b w = tc_bin(t, E * M * D, -1, 1), ys = tc_bout(t, R * M);
    moek_grouped_matmul_fwd_bf16(C, xs.h, w.h, er.h, ys.h, R, D, M, E);
    t->g.grouped_matmul_fwd_bf16(G, xs.d, w.d, er.d, ys.d, R, D, M, E);
    if (tc_sync(t, NM("cuda grouped_matmul_fwd_bf16 %s", sh)))
        tc_bcmp(t, name, ys, TOL_B);
    tc_b dys = tc_bin(t, R * M, -1, 1), dxs2 = tc_bout(t, R * D), dw = tc_bout(t, E * M * D);
    moek_grouped_matmul_bwd_bf16(C, dys.h, xs.h, w.h, er.h, dxs2.h, dw.h, R, D, M, E);
    t->g.grouped_matmul_bwd_bf16(G, dys.d, xs.d, w.d, er.d, dxs2.d, dw.d, R, D, M, E);
    if (tc_sync(t, NM("cuda grouped_matmul_bwd_bf16 %s", sh))) {
        tc_bcmp(t, NM("cuda grouped_matmul_bwd_bf16 dxs %s", sh), dxs2, TOL_B);
        tc_bcmp(t, NM("cuda grouped_matmul_bwd_bf16 dw %s", sh), dw, TOL_B);
    }
    tc_f gates = tc_in(t, S, 0, 1), dg = tc_out(t, S);
    tc_b out = tc_bout(t, N * M), dout = tc_bin(t, N * M, -1, 1), dys2 = tc_bout(t, R * M);
    tc_bup(t, ys);
    moek_combine_fwd_bf16(C, ys.h, slot.h, gates.h, out.h, N, M, k, R);
    t->g.combine_fwd_bf16(G, ys.d, slot.d, gates.d, out.d, N, M, k, R);
    if (tc_sync(t, NM("cuda combine_fwd_bf16 %s", sh)))
        tc_bcmp(t, name, out, TOL_B);
    moek_combine_bwd_bf16(C, dout.h, ys.h, slot.h, gates.h, dys2.h, dg.h, N, M, k, R);
    t->g.combine_bwd_bf16(G, dout.d, ys.d, slot.d, gates.d, dys2.d, dg.d, N, M, k, R);
    if (tc_sync(t, NM("cuda combine_bwd_bf16 %s", sh))) {
        tc_bcmp(t, NM("cuda combine_bwd_bf16 dys %s", sh), dys2, TOL_B);
        tc_cmp(t, NM("cuda combine_bwd_bf16 dgates %s", sh), dg, TOL_SIDE);
    }
    tc_reset(t);
}

static void tc_b_moe(tc_env *t)
{
    tc_b_moe_case(t, 37, 13, 8, 2, 0, 23, 0);     /* dropless */
    tc_b_moe_case(t, 37, 13, 8, 2, 5, 23, 0);     /* capacity 5: drops */
    tc_b_moe_case(t, 37, 13, 8, 2, 12, 23, 1);    /* expert 0 gets nothing */
    tc_b_moe_case(t, 37, 13, 8, 2, 0, 23, 1);
    tc_b_moe_case(t, 50, 19, 4, 1, 0, 9, 2);      /* all tokens to one expert */
    tc_b_moe_case(t, 1, 7, 3, 1, 0, 5, 0);        /* a single token */
    tc_b_moe_case(t, 1, 7, 3, 2, 1, 5, 0);
    tc_b_moe_case(t, 300, 64, 16, 4, 0, 96, 0);   /* blocks over several tiles */
    tc_b_moe_case(t, 300, 64, 16, 4, 70, 96, 0);
}

static void tc_b_optim(tc_env *t)
{
    static const int64_t sizes[] = {1, 37, 100003};
    char name[160];
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int64_t n = sizes[s];
        for (int clip = 0; clip < 2; clip++) {
            float hyper[MOEK_HYPER_COUNT] = {0};
            hyper[MOEK_HYPER_LR] = 1e-2f;
            hyper[MOEK_HYPER_BETA1] = 0.9f;
            hyper[MOEK_HYPER_BETA2] = 0.95f;
            hyper[MOEK_HYPER_EPS] = 1e-8f;
            hyper[MOEK_HYPER_BC1] = 1.0f - 0.9f * 0.9f * 0.9f;
            hyper[MOEK_HYPER_BC2] = 1.0f - 0.95f * 0.95f * 0.95f;
            hyper[MOEK_HYPER_MAX_NORM] = clip ? 0.5f : 0.0f;
            hyper[MOEK_HYPER_MOMENTUM] = 0.9f;
            tc_f hy = tc_in(t, MOEK_HYPER_COUNT, 0, 1);
            memcpy(hy.h, hyper, sizeof hyper);
            tc_h2d(t, hy.d, hy.h, sizeof hyper);
            tc_f master = tc_in(t, n, -1, 1), g = tc_in(t, n, -1, 1), m = tc_in(t, n, -0.1f, 0.1f);
            tc_f v = tc_in(t, n, 0, 0.1f), ns = tc_in(t, 1, 4.0f, 9.0f);
            tc_b p = tc_bout(t, n);
            moek_adamw_bf16(C, p.h, master.h, g.h, m.h, v.h, n, hy.h, ns.h, 0.1f);
            t->g.adamw_bf16(G, p.d, master.d, g.d, m.d, v.d, n, hy.d, ns.d, 0.1f);
            if (tc_sync(t, NM("cuda adamw_bf16 n=%lld clip=%d", (long long)n, clip))) {
                tc_bcmp(t, NM("cuda adamw_bf16 p n=%lld clip=%d", (long long)n, clip), p, TOL_B);
                tc_cmp(t, NM("cuda adamw_bf16 master n=%lld clip=%d", (long long)n, clip), master,
                       TOL_SIDE);
                tc_cmp(t, NM("cuda adamw_bf16 m n=%lld clip=%d", (long long)n, clip), m, TOL_SIDE);
                tc_cmp(t, NM("cuda adamw_bf16 v n=%lld clip=%d", (long long)n, clip), v, TOL_SIDE);
            }
            /* poison again: sgd must write every element */
            for (int64_t i = 0; i < n; i++)
                p.h[i] = 0x7fc0;
            tc_bup(t, p);
            moek_sgd_bf16(C, p.h, master.h, g.h, m.h, n, hy.h, clip ? ns.h : NULL, 0.01f);
            t->g.sgd_bf16(G, p.d, master.d, g.d, m.d, n, hy.d, clip ? ns.d : NULL, 0.01f);
            if (tc_sync(t, NM("cuda sgd_bf16 n=%lld clip=%d", (long long)n, clip))) {
                tc_bcmp(t, NM("cuda sgd_bf16 p n=%lld clip=%d", (long long)n, clip), p, TOL_B);
                tc_cmp(t, NM("cuda sgd_bf16 master n=%lld clip=%d", (long long)n, clip), master,
                       TOL_SIDE);
                tc_cmp(t, NM("cuda sgd_bf16 buf n=%lld clip=%d", (long long)n, clip), m, TOL_SIDE);
            }
        }
        tc_reset(t);
    }
}

static void tc_bf16(tc_env *t)
{
    t->bf16 = 1;
    tc_b_elementwise(t);
    tc_b_embedding(t);
    tc_b_matmul(t);
    tc_b_norm_rope(t);
    tc_b_attention(t);
    tc_b_losses(t);
    tc_b_moe(t);
    tc_b_optim(t);
    t->bf16 = 0;
}

int main(void)
{
    void *lib = ch_open("cuda_kernels");
    if (!lib)
        return 0;
    tc_env *t = calloc(1, sizeof *t);
    if (!t)
        return 2;
#define TC_SYM(n) CH_ENTRY(t->g, n)
    ch_sym syms[] = {TC_KERNELS(TC_SYM)};
#undef TC_SYM
    int go = ch_start(lib, "cuda_kernels", syms, CH_NSYMS(syms), &t->gctx, t->err, sizeof t->err);
    if (go < 0)
        return 1;
    if (go == 0) {
        free(t);
        dlclose(lib);
        return 0;
    }
    t->gctx.status = &t->gstatus;
    t->cctx.status = &t->cstatus;
    t->rng = 0x9e3779b97f4a7c15ull;
    tc_services(t);
    tc_elementwise(t);
    tc_embedding(t);
    tc_matmul(t);
    tc_norm(t);
    tc_rope(t);
    tc_attention(t);
    tc_losses(t);
    tc_router(t);
    tc_moe(t);
    tc_optim(t);
    /* the CPU bf16 variants widen into a workspace; every case here fits */
    t->cctx.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(4 << 20);
    t->cctx.workspace = malloc((size_t)t->cctx.workspace_bytes);
    if (!t->cctx.workspace)
        return 2;
    tc_bf16(t);
    free(t->cctx.workspace);
    t->g.device_fini(&t->gctx);
    /* how much room the tolerances leave */
    printf("# worst relative error: %.3g (%s)\n", t->worst, t->worst_name);
    printf("# worst bf16 output error: %.3g (%s)\n", t->worst_b, t->worst_b_name);
    printf("# worst fp32 output error of a bf16 kernel: %.3g (%s)\n", t->worst_side,
           t->worst_side_name);
    free(t);
    CHECK_DONE();
}
