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
 * The bf16 and fp16 variants are compared with the CPU library's by one body
 * run once per half type (see tc_half_cases). */
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
    X(graph_end) X(graph_launch) X(graph_free)

/* the half-storage variants, by their names without the _bf16 / _f16 suffix
 * (cast_f32 is moek_cast_f32_bf16 / _f16); the cast back to fp32,
 * moek_cast_bf16_f32 / moek_cast_f16_f32, is the table's cast_to_f32 */
#define TC_HALF_KERNELS(X)                                                                     \
    X(cast_f32) X(fill) X(copy) X(add_fwd) X(accumulate) X(scale_fwd) X(scale_bwd) X(gelu_fwd)  \
    X(gelu_bwd) X(swiglu_fwd) X(swiglu_bwd) X(embedding_fwd) X(embedding_bwd) X(matmul_fwd)     \
    X(matmul_bwd) X(rmsnorm_fwd) X(rmsnorm_bwd) X(rope_fwd) X(rope_bwd) X(attention_fwd)        \
    X(attention_bwd) X(cross_entropy_fwd) X(cross_entropy_bwd) X(softmax_fwd) X(softmax_bwd)    \
    X(zloss_fwd) X(zloss_bwd) X(dispatch_fwd) X(dispatch_bwd) X(grouped_matmul_fwd)             \
    X(grouped_matmul_bwd) X(combine_fwd) X(combine_bwd) X(adamw) X(sgd)

typedef struct {
#define TC_FIELD(n) __typeof__(&moek_##n) n;
    TC_KERNELS(TC_FIELD)
#undef TC_FIELD
} tc_lib;

/* one library's half variants, typed as the _bf16 ones (cuda_harness.h) */
typedef struct {
#define TC_HFIELD(n) __typeof__(&moek_##n##_bf16) n;
    TC_HALF_KERNELS(TC_HFIELD)
#undef TC_HFIELD
    __typeof__(&moek_cast_bf16_f32) cast_to_f32;
} tc_hlib;

/* a half type's cases: the type, its variants in both libraries, the values
 * its cast test starts with, and the worst errors seen */
typedef struct {
    const ch_half *ty;
    tc_hlib c, g;                   /* the CPU library's, the CUDA library's */
    const float *ties;
    size_t nties;
    double worst, worst_side;       /* half outputs; fp32 outputs of half kernels */
    char worst_name[200], worst_side_name[200];
} tc_half;

typedef struct {
    tc_lib g;             /* the CUDA library */
    ch_side s;            /* contexts, statuses, this case's buffers */
    uint64_t rng;
    double worst;         /* largest relative error seen, and where */
    char worst_name[200];
    tc_half halves[CH_NHALF];     /* bf16, f16 */
    tc_half *half;        /* the half type whose cases run (tc_cmp records into its
                           * worst_side), NULL in the fp32 cases */
} tc_env;

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
    tc_f b = {ch_host(&t->s, n * 4), ch_dev(&t->s, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = ch_unif(&t->rng, lo, hi);
    ch_copy(&t->s, b.d, b.h, n * 4, MOEK_COPY_H2D);
    return b;
}

/* output: NaN on both sides, so anything left unwritten fails */
static tc_f tc_out(tc_env *t, int64_t n)
{
    tc_f b = {ch_host(&t->s, n * 4), ch_dev(&t->s, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = NAN;
    ch_copy(&t->s, b.d, b.h, n * 4, MOEK_COPY_H2D);
    return b;
}

static tc_i tc_iin(tc_env *t, int64_t n, int64_t lo, int64_t hi)
{
    tc_i b = {ch_host(&t->s, n * 4), ch_dev(&t->s, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = (int32_t)(lo + (int64_t)(ch_next(&t->rng) % (uint64_t)(hi - lo)));
    ch_copy(&t->s, b.d, b.h, n * 4, MOEK_COPY_H2D);
    return b;
}

static void tc_iup(tc_env *t, tc_i b) { ch_copy(&t->s, b.d, b.h, b.n * 4, MOEK_COPY_H2D); }

static tc_i tc_iout(tc_env *t, int64_t n)
{
    tc_i b = {ch_host(&t->s, n * 4), ch_dev(&t->s, n * 4), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = -12345;
    ch_copy(&t->s, b.d, b.h, n * 4, MOEK_COPY_H2D);
    return b;
}

static void tc_cmp(tc_env *t, const char *name, tc_f b, double tol)
{
    float *g = ch_host(&t->s, b.n * 4);
    ch_copy(&t->s, g, b.d, b.n * 4, MOEK_COPY_D2H);
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
    double *worst = t->half ? &t->half->worst_side : &t->worst;
    char *worst_name = t->half ? t->half->worst_side_name : t->worst_name;
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
    int32_t *g = ch_host(&t->s, b.n * 4);
    ch_copy(&t->s, g, b.d, b.n * 4, MOEK_COPY_D2H);
    int64_t bad = -1;
    for (int64_t i = 0; i < b.n && bad < 0; i++)
        if (g[i] != b.h[i])
            bad = i;
    CHECK(name, bad < 0, "gpu[%lld] = %d, cpu %d", (long long)bad, bad >= 0 ? g[bad] : 0,
          bad >= 0 ? b.h[bad] : 0);
}

#define TOL 1e-5
#define NM(...) (snprintf(name, sizeof name, __VA_ARGS__), name)
#define G (&t->s.gctx)
#define C (&t->s.cctx)

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
        if (ch_sync(&t->s, NM("cuda fill n=%lld", (long long)n)))
            tc_cmp(t, name, y, 0.0);
        moek_copy(C, a.h, y.h, n);
        t->g.copy(G, a.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda copy n=%lld", (long long)n)))
            tc_cmp(t, name, y, 0.0);
        moek_add_fwd(C, a.h, b.h, y.h, n);
        t->g.add_fwd(G, a.d, b.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda add_fwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_accumulate(C, y.h, a.h, n);
        t->g.accumulate(G, y.d, a.d, n);
        if (ch_sync(&t->s, NM("cuda accumulate n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_scale_fwd(C, a.h, y.h, n, -0.37f);
        t->g.scale_fwd(G, a.d, y.d, n, -0.37f);
        if (ch_sync(&t->s, NM("cuda scale_fwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_scale_bwd(C, b.h, y.h, n, 1.7f);
        t->g.scale_bwd(G, b.d, y.d, n, 1.7f);
        if (ch_sync(&t->s, NM("cuda scale_bwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_gelu_fwd(C, a.h, y.h, n);
        t->g.gelu_fwd(G, a.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda gelu_fwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_gelu_bwd(C, b.h, a.h, y.h, n);
        t->g.gelu_bwd(G, b.d, a.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda gelu_bwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        moek_swiglu_fwd(C, a.h, b.h, y.h, n);
        t->g.swiglu_fwd(G, a.d, b.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda swiglu_fwd n=%lld", (long long)n)))
            tc_cmp(t, name, y, TOL);
        tc_f dy = tc_in(t, n, -1, 1);
        moek_swiglu_bwd(C, dy.h, a.h, b.h, y.h, z.h, n);
        t->g.swiglu_bwd(G, dy.d, a.d, b.d, y.d, z.d, n);
        if (ch_sync(&t->s, NM("cuda swiglu_bwd n=%lld", (long long)n))) {
            tc_cmp(t, NM("cuda swiglu_bwd dgate n=%lld", (long long)n), y, TOL);
            tc_cmp(t, NM("cuda swiglu_bwd dup n=%lld", (long long)n), z, TOL);
        }
        ch_end_case(&t->s);
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
        if (ch_sync(&t->s, NM("cuda embedding_fwd N=%lld V=%lld D=%lld", (long long)N, (long long)V,
                          (long long)D)))
            tc_cmp(t, name, out, 0.0);
        moek_embedding_bwd(C, dout.h, ids.h, dtab.h, N, V, D);
        t->g.embedding_bwd(G, dout.d, ids.d, dtab.d, N, V, D);
        if (ch_sync(&t->s, NM("cuda embedding_bwd N=%lld V=%lld D=%lld", (long long)N, (long long)V,
                          (long long)D)))
            tc_cmp(t, name, dtab, TOL);
        ch_end_case(&t->s);
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
        if (ch_sync(&t->s, NM("cuda matmul_fwd N=%lld K=%lld M=%lld", (long long)N, (long long)K,
                          (long long)M)))
            tc_cmp(t, name, y, TOL);
        moek_matmul_bwd(C, dy.h, x.h, w.h, dx.h, dw.h, N, K, M);
        t->g.matmul_bwd(G, dy.d, x.d, w.d, dx.d, dw.d, N, K, M);
        if (ch_sync(&t->s, NM("cuda matmul_bwd N=%lld K=%lld M=%lld", (long long)N, (long long)K,
                          (long long)M))) {
            tc_cmp(t, NM("cuda matmul_bwd dx N=%lld K=%lld M=%lld", (long long)N, (long long)K,
                         (long long)M), dx, TOL);
            tc_cmp(t, NM("cuda matmul_bwd dw N=%lld K=%lld M=%lld", (long long)N, (long long)K,
                         (long long)M), dw, TOL);
        }
        ch_end_case(&t->s);
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
        if (ch_sync(&t->s, NM("cuda rmsnorm_fwd N=%lld D=%lld", (long long)N, (long long)D))) {
            tc_cmp(t, name, y, TOL);
            tc_cmp(t, NM("cuda rmsnorm_fwd rstd N=%lld D=%lld", (long long)N, (long long)D), r, TOL);
        }
        moek_rmsnorm_bwd(C, dy.h, x.h, w.h, r.h, dx.h, dw.h, N, D);
        ch_copy(&t->s, r.d, r.h, N * 4, MOEK_COPY_H2D);   /* the same rstd on both sides */
        t->g.rmsnorm_bwd(G, dy.d, x.d, w.d, r.d, dx.d, dw.d, N, D);
        if (ch_sync(&t->s, NM("cuda rmsnorm_bwd N=%lld D=%lld", (long long)N, (long long)D))) {
            tc_cmp(t, NM("cuda rmsnorm_bwd dx N=%lld D=%lld", (long long)N, (long long)D), dx, TOL);
            tc_cmp(t, NM("cuda rmsnorm_bwd dw N=%lld D=%lld", (long long)N, (long long)D), dw, TOL);
        }
        ch_end_case(&t->s);
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
        if (ch_sync(&t->s, NM("cuda rope_fwd B=%lld T=%lld H=%lld Dh=%lld", (long long)B, (long long)T,
                          (long long)H, (long long)Dh)))
            tc_cmp(t, name, y, TOL);
        moek_rope_bwd(C, x.h, dx.h, B, T, H, Dh, 10000.0f);
        t->g.rope_bwd(G, x.d, dx.d, B, T, H, Dh, 10000.0f);
        if (ch_sync(&t->s, NM("cuda rope_bwd B=%lld T=%lld H=%lld Dh=%lld", (long long)B, (long long)T,
                          (long long)H, (long long)Dh)))
            tc_cmp(t, name, dx, TOL);
        ch_end_case(&t->s);
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
        if (ch_sync(&t->s, NM("cuda attention_fwd B=%lld T=%lld H=%lld Dh=%lld", SH))) {
            tc_cmp(t, name, o, TOL);
            tc_cmp(t, NM("cuda attention_fwd lse B=%lld T=%lld H=%lld Dh=%lld", SH), lse, TOL);
        }
        /* backward from the CPU's o and lse on both sides */
        ch_copy(&t->s, o.d, o.h, n * 4, MOEK_COPY_H2D);
        ch_copy(&t->s, lse.d, lse.h, B * H * T * 4, MOEK_COPY_H2D);
        moek_attention_bwd(C, dout.h, q.h, k.h, v.h, o.h, lse.h, dq.h, dk.h, dv.h, B, T, H, Dh);
        t->g.attention_bwd(G, dout.d, q.d, k.d, v.d, o.d, lse.d, dq.d, dk.d, dv.d, B, T, H, Dh);
        if (ch_sync(&t->s, NM("cuda attention_bwd B=%lld T=%lld H=%lld Dh=%lld", SH))) {
            tc_cmp(t, NM("cuda attention_bwd dq B=%lld T=%lld H=%lld Dh=%lld", SH), dq, TOL);
            tc_cmp(t, NM("cuda attention_bwd dk B=%lld T=%lld H=%lld Dh=%lld", SH), dk, TOL);
            tc_cmp(t, NM("cuda attention_bwd dv B=%lld T=%lld H=%lld Dh=%lld", SH), dv, TOL);
        }
#undef SH
        ch_end_case(&t->s);
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
        if (ch_sync(&t->s, NM("cuda cross_entropy_fwd N=%lld V=%lld", (long long)N, (long long)V))) {
            tc_cmp(t, name, loss, TOL);
            tc_cmp(t, NM("cuda cross_entropy_fwd lse N=%lld V=%lld", (long long)N, (long long)V),
                   lse, TOL);
        }
        ch_copy(&t->s, lse.d, lse.h, N * 4, MOEK_COPY_H2D);
        moek_cross_entropy_bwd(C, dl.h, x.h, y.h, lse.h, dx.h, N, V);
        t->g.cross_entropy_bwd(G, dl.d, x.d, y.d, lse.d, dx.d, N, V);
        if (ch_sync(&t->s, NM("cuda cross_entropy_bwd N=%lld V=%lld", (long long)N, (long long)V)))
            tc_cmp(t, name, dx, TOL);
        /* z-loss on the same rows */
        moek_zloss_fwd(C, x.h, loss.h, N, V);
        t->g.zloss_fwd(G, x.d, loss.d, N, V);
        if (ch_sync(&t->s, NM("cuda zloss_fwd N=%lld E=%lld", (long long)N, (long long)V)))
            tc_cmp(t, name, loss, TOL);
        moek_zloss_bwd(C, dl.h, x.h, dx.h, N, V);
        t->g.zloss_bwd(G, dl.d, x.d, dx.d, N, V);
        if (ch_sync(&t->s, NM("cuda zloss_bwd N=%lld E=%lld", (long long)N, (long long)V)))
            tc_cmp(t, name, dx, TOL);
        ch_end_case(&t->s);
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
        if (ch_sync(&t->s, NM("cuda softmax_fwd N=%lld E=%lld (k=%lld)", SH)))
            tc_cmp(t, name, p, TOL);
        ch_copy(&t->s, p.d, p.h, N * E * 4, MOEK_COPY_H2D);
        moek_softmax_bwd(C, dp.h, p.h, dx.h, N, E);
        t->g.softmax_bwd(G, dp.d, p.d, dx.d, N, E);
        if (ch_sync(&t->s, NM("cuda softmax_bwd N=%lld E=%lld (k=%lld)", SH)))
            tc_cmp(t, name, dx, TOL);
        /* scores on a coarse grid so that ties are common */
        for (int64_t i = 0; i < N * E; i++)
            x.h[i] = (float)(ch_next(&t->rng) % 5) * 0.25f + 0.1f;
        ch_copy(&t->s, x.d, x.h, N * E * 4, MOEK_COPY_H2D);
        for (int renorm = 0; renorm < 2; renorm++) {
            tc_i idx = tc_iout(t, N * k);
            tc_f gates = tc_out(t, N * k), dg = tc_in(t, N * k, -1, 1), ds = tc_out(t, N * E);
            moek_topk_fwd(C, x.h, idx.h, gates.h, N, E, k, renorm);
            t->g.topk_fwd(G, x.d, idx.d, gates.d, N, E, k, renorm);
            if (ch_sync(&t->s, NM("cuda topk_fwd N=%lld E=%lld k=%lld renorm=%d", SH, renorm))) {
                tc_icmp(t, NM("cuda topk_fwd idx N=%lld E=%lld k=%lld renorm=%d", SH, renorm), idx);
                tc_cmp(t, NM("cuda topk_fwd gates N=%lld E=%lld k=%lld renorm=%d", SH, renorm),
                       gates, TOL);
            }
            tc_iup(t, idx);
            moek_topk_bwd(C, dg.h, x.h, idx.h, ds.h, N, E, k, renorm);
            t->g.topk_bwd(G, dg.d, x.d, idx.d, ds.d, N, E, k, renorm);
            if (ch_sync(&t->s, NM("cuda topk_bwd N=%lld E=%lld k=%lld renorm=%d", SH, renorm)))
                tc_cmp(t, name, ds, TOL);
            if (renorm)
                continue;
            /* balance loss on these choices and the softmax probabilities */
            tc_f loss = tc_out(t, 1), dl = tc_in(t, 1, 0.5f, 2.0f), dpr = tc_out(t, N * E);
            moek_balance_loss_fwd(C, p.h, idx.h, loss.h, N, E, k);
            t->g.balance_loss_fwd(G, p.d, idx.d, loss.d, N, E, k);
            if (ch_sync(&t->s, NM("cuda balance_loss_fwd N=%lld E=%lld k=%lld", SH)))
                tc_cmp(t, name, loss, TOL);
            moek_balance_loss_bwd(C, dl.h, p.h, idx.h, dpr.h, N, E, k);
            t->g.balance_loss_bwd(G, dl.d, p.d, idx.d, dpr.d, N, E, k);
            if (ch_sync(&t->s, NM("cuda balance_loss_bwd N=%lld E=%lld k=%lld", SH)))
                tc_cmp(t, name, dpr, TOL);
        }
#undef SH
        ch_end_case(&t->s);
    }
}

/* ---- dispatch, grouped matmul, combine ------------------------------------
 * idx patterns: 0 random distinct choices, 1 expert 0 never used, 2 every
 * token to expert E-1 (k = 1) */
/* idx <- k distinct experts per token in the pattern above (the fp32 and
 * half cases draw the same routing from t->rng) */
static void tc_route(tc_env *t, int32_t *idx, int64_t N, int64_t E, int64_t k, int pattern)
{
    for (int64_t n = 0; n < N; n++) {
        for (int64_t j = 0; j < k; j++) {
            int64_t e;
            int dup;
            do {
                e = pattern == 2 ? E - 1 : pattern == 1 ? 1 + (int64_t)(ch_next(&t->rng) % (uint64_t)(E - 1))
                                                        : (int64_t)(ch_next(&t->rng) % (uint64_t)E);
                dup = 0;
                for (int64_t i = 0; i < j; i++)
                    dup |= idx[n * k + i] == e;
            } while (dup);
            idx[n * k + j] = (int32_t)e;
        }
    }
}

static void tc_moe_case(tc_env *t, int64_t N, int64_t D, int64_t E, int64_t k, int64_t C_,
                        int64_t M, int pattern)
{
    char name[200], sh[120];
    snprintf(sh, sizeof sh, "N=%lld D=%lld E=%lld k=%lld C=%lld M=%lld idx=%d", (long long)N,
             (long long)D, (long long)E, (long long)k, (long long)C_, (long long)M, pattern);
    int64_t S = N * k, R = C_ > 0 ? E * C_ : S;
    tc_i idx = tc_iout(t, S);
    tc_route(t, idx.h, N, E, k, pattern);
    tc_iup(t, idx);
    tc_f x = tc_in(t, N * D, -1, 1), xs = tc_out(t, R * D);
    tc_i slot = tc_iout(t, S), er = tc_iout(t, 2 * E);
    moek_dispatch_fwd(C, x.h, idx.h, xs.h, slot.h, er.h, N, D, E, k, C_);
    t->g.dispatch_fwd(G, x.d, idx.d, xs.d, slot.d, er.d, N, D, E, k, C_);
    if (ch_sync(&t->s, NM("cuda dispatch_fwd %s", sh))) {
        tc_cmp(t, NM("cuda dispatch_fwd xs %s", sh), xs, 0.0);
        tc_icmp(t, NM("cuda dispatch_fwd slot_row %s", sh), slot);
        tc_icmp(t, NM("cuda dispatch_fwd expert_rows %s", sh), er);
    }
    /* the rest runs from the CPU's routing on both sides */
    tc_iup(t, slot);
    tc_iup(t, er);
    ch_copy(&t->s, xs.d, xs.h, R * D * 4, MOEK_COPY_H2D);
    tc_f dxs = tc_in(t, R * D, -1, 1), dx = tc_out(t, N * D);
    moek_dispatch_bwd(C, dxs.h, slot.h, dx.h, N, D, k, R);
    t->g.dispatch_bwd(G, dxs.d, slot.d, dx.d, N, D, k, R);
    if (ch_sync(&t->s, NM("cuda dispatch_bwd %s", sh)))
        tc_cmp(t, name, dx, TOL);
    tc_f w = tc_in(t, E * M * D, -1, 1), ys = tc_out(t, R * M);
    moek_grouped_matmul_fwd(C, xs.h, w.h, er.h, ys.h, R, D, M, E);
    t->g.grouped_matmul_fwd(G, xs.d, w.d, er.d, ys.d, R, D, M, E);
    if (ch_sync(&t->s, NM("cuda grouped_matmul_fwd %s", sh)))
        tc_cmp(t, name, ys, TOL);
    tc_f dys = tc_in(t, R * M, -1, 1), dxs2 = tc_out(t, R * D), dw = tc_out(t, E * M * D);
    moek_grouped_matmul_bwd(C, dys.h, xs.h, w.h, er.h, dxs2.h, dw.h, R, D, M, E);
    t->g.grouped_matmul_bwd(G, dys.d, xs.d, w.d, er.d, dxs2.d, dw.d, R, D, M, E);
    if (ch_sync(&t->s, NM("cuda grouped_matmul_bwd %s", sh))) {
        tc_cmp(t, NM("cuda grouped_matmul_bwd dxs %s", sh), dxs2, TOL);
        tc_cmp(t, NM("cuda grouped_matmul_bwd dw %s", sh), dw, TOL);
    }
    tc_f gates = tc_in(t, S, 0, 1), out = tc_out(t, N * M), dout = tc_in(t, N * M, -1, 1);
    ch_copy(&t->s, ys.d, ys.h, R * M * 4, MOEK_COPY_H2D);
    moek_combine_fwd(C, ys.h, slot.h, gates.h, out.h, N, M, k, R);
    t->g.combine_fwd(G, ys.d, slot.d, gates.d, out.d, N, M, k, R);
    if (ch_sync(&t->s, NM("cuda combine_fwd %s", sh)))
        tc_cmp(t, name, out, TOL);
    tc_f dys2 = tc_out(t, R * M), dg = tc_out(t, S);
    moek_combine_bwd(C, dout.h, ys.h, slot.h, gates.h, dys2.h, dg.h, N, M, k, R);
    t->g.combine_bwd(G, dout.d, ys.d, slot.d, gates.d, dys2.d, dg.d, N, M, k, R);
    if (ch_sync(&t->s, NM("cuda combine_bwd %s", sh))) {
        tc_cmp(t, NM("cuda combine_bwd dys %s", sh), dys2, TOL);
        tc_cmp(t, NM("cuda combine_bwd dgates %s", sh), dg, TOL);
    }
    ch_end_case(&t->s);
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
        if (ch_sync(&t->s, NM("cuda sumsq_accum n=%lld", (long long)n)))
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
            ch_copy(&t->s, hy.d, hy.h, sizeof hyper, MOEK_COPY_H2D);
            tc_f p = tc_in(t, n, -1, 1), g = tc_in(t, n, -1, 1), m = tc_in(t, n, -0.1f, 0.1f);
            tc_f v = tc_in(t, n, 0, 0.1f), ns = tc_in(t, 1, 4.0f, 9.0f);
            moek_adamw(C, p.h, g.h, m.h, v.h, n, hy.h, ns.h, 0.1f);
            t->g.adamw(G, p.d, g.d, m.d, v.d, n, hy.d, ns.d, 0.1f);
            if (ch_sync(&t->s, NM("cuda adamw n=%lld clip=%d", (long long)n, clip))) {
                tc_cmp(t, NM("cuda adamw p n=%lld clip=%d", (long long)n, clip), p, TOL);
                tc_cmp(t, NM("cuda adamw m n=%lld clip=%d", (long long)n, clip), m, TOL);
                tc_cmp(t, NM("cuda adamw v n=%lld clip=%d", (long long)n, clip), v, TOL);
            }
            moek_sgd(C, p.h, g.h, m.h, n, hy.h, clip ? ns.h : NULL, 0.01f);
            t->g.sgd(G, p.d, g.d, m.d, n, hy.d, clip ? ns.d : NULL, 0.01f);
            if (ch_sync(&t->s, NM("cuda sgd n=%lld clip=%d", (long long)n, clip))) {
                tc_cmp(t, NM("cuda sgd p n=%lld clip=%d", (long long)n, clip), p, TOL);
                tc_cmp(t, NM("cuda sgd buf n=%lld clip=%d", (long long)n, clip), m, TOL);
            }
        }
        ch_end_case(&t->s);
    }
}

/* ---- device services, graphs, error paths --------------------------------- */
static void tc_services(tc_env *t)
{
    int64_t n = 1000;
    float *a = ch_host(&t->s, n * 4), *b = ch_host(&t->s, n * 4);
    for (int64_t i = 0; i < n; i++)
        a[i] = (float)i * 0.5f;
    float *d1 = ch_dev(&t->s, n * 4), *d2 = ch_dev(&t->s, n * 4);
    ch_copy(&t->s, b, d1, n * 4, MOEK_COPY_D2H);
    int zero = 1;
    for (int64_t i = 0; i < n; i++)
        zero &= b[i] == 0.0f;
    CHECK("cuda device_alloc returns zeroed memory", zero, "non-zero byte in a fresh buffer");
    int rc = t->g.device_copy(&t->s.gctx, d1, a, n * 4, MOEK_COPY_H2D, t->s.err, sizeof t->s.err);
    rc |= t->g.device_copy(&t->s.gctx, d2, d1, n * 4, MOEK_COPY_D2D, t->s.err, sizeof t->s.err);
    rc |= t->g.device_copy(&t->s.gctx, b, d2, n * 4, MOEK_COPY_D2H, t->s.err, sizeof t->s.err);
    CHECK("cuda device_copy H2D, D2D, D2H roundtrip", rc == 0 && !memcmp(a, b, (size_t)n * 4),
          "rc %d (%s)", rc, t->s.err);
    rc = t->g.device_copy(&t->s.gctx, b, d2, n * 4, 7, t->s.err, sizeof t->s.err);
    printf("# bad copy kind: %s\n", t->s.err);
    CHECK("cuda device_copy rejects an unknown kind", rc == -1 && strstr(t->s.err, "unknown copy kind"),
          "rc %d", rc);
    moek_ctx bad = {0};
    rc = t->g.device_init(&bad, 999, 0, t->s.err, sizeof t->s.err);
    printf("# bad device index: %s\n", t->s.err);
    CHECK("cuda device_init rejects a bad index", rc == -1 && strstr(t->s.err, "out of range"), "rc %d", rc);
    ch_end_case(&t->s);

    /* a bad token id: reported at sync as MOEK_E_INDEX, output row zero */
    tc_i ids = tc_iin(t, 4, 0, 3);
    ids.h[2] = 99;
    tc_iup(t, ids);
    tc_f tab = tc_in(t, 3 * 5, -1, 1), out = tc_out(t, 4 * 5);
    t->g.embedding_fwd(G, ids.d, tab.d, out.d, 4, 3, 5);
    rc = t->g.device_sync(G, t->s.err, sizeof t->s.err);
    printf("# bad token id: %s\n", t->s.err);
    CHECK("cuda a bad index is reported at sync", rc == -1 && t->s.gstatus == MOEK_E_INDEX &&
          strstr(t->s.err, "MOEK_E_INDEX"), "rc %d status %d (%s)", rc, t->s.gstatus, t->s.err);
    t->s.gstatus = 0;
    rc = t->g.device_sync(G, t->s.err, sizeof t->s.err);
    CHECK("cuda the device status flag is reported once", rc == 0 && t->s.gstatus == 0, "rc %d", rc);
    /* a bad size: MOEK_E_SHAPE straight away */
    t->g.fill(G, out.d, -1, 0.0f);
    CHECK("cuda a negative size sets MOEK_E_SHAPE", t->s.gstatus == MOEK_E_SHAPE, "status %d",
          t->s.gstatus);
    ch_end_case(&t->s);

    /* graph: capture matmul + rmsnorm + attention, replay twice, compare
     * bit for bit with the same ops run one by one */
    int64_t N = 64, K = 48, M = 64, H = 2, T = 32, Dh = 32;
    tc_f x = tc_in(t, N * K, -1, 1), w = tc_in(t, M * K, -1, 1), nw = tc_in(t, M, 0.5f, 1.5f);
    tc_f y = tc_out(t, N * M), yn = tc_out(t, N * M), r = tc_out(t, N), o = tc_out(t, N * M);
    tc_f lse = tc_out(t, 2 * H * T);
    float *eager = ch_host(&t->s, N * M * 4), *replay = ch_host(&t->s, N * M * 4);
#define TC_STEP()                                                                         \
    do {                                                                                  \
        t->g.matmul_fwd(G, x.d, w.d, y.d, N, K, M);                                       \
        t->g.rmsnorm_fwd(G, y.d, nw.d, yn.d, r.d, N, M, 1e-5f);                           \
        t->g.attention_fwd(G, yn.d, yn.d, y.d, o.d, lse.d, 2, T, H, Dh);                  \
    } while (0)
    TC_STEP();
    if (!ch_sync(&t->s, "cuda graph: eager run"))
        goto out;
    ch_copy(&t->s, eager, o.d, N * M * 4, MOEK_COPY_D2H);
    ch_copy(&t->s, o.d, o.h, N * M * 4, MOEK_COPY_H2D);   /* poison again */
    void *graph = NULL;
    rc = t->g.graph_begin(G, t->s.err, sizeof t->s.err);
    if (rc == 0) {
        TC_STEP();
        rc = t->g.graph_end(G, &graph, t->s.err, sizeof t->s.err);
    }
    CHECK("cuda graph capture", rc == 0 && graph, "%s", t->s.err);
    if (rc == 0 && graph) {
        int same = 1;
        for (int rep = 0; rep < 2; rep++) {
            rc = t->g.graph_launch(G, graph, t->s.err, sizeof t->s.err);
            rc |= t->g.device_sync(G, t->s.err, sizeof t->s.err);
            ch_copy(&t->s, replay, o.d, N * M * 4, MOEK_COPY_D2H);
            same &= rc == 0 && !memcmp(eager, replay, (size_t)(N * M * 4));
        }
        CHECK("cuda graph replay matches the eager run bit for bit", same, "rc %d (%s)", rc, t->s.err);
        t->g.graph_free(graph);
    }
#undef TC_STEP
out:
    ch_end_case(&t->s);
}

/* ---- half storage: bf16 and fp16 ---------------------------------------------
 * Every _bf16 and every _f16 variant against the CPU library's (widen, fp32
 * kernel, round once), on the same half inputs: one body per family, run
 * once per half type (tc_half_cases), with the type's kernels in t->half.
 * Half outputs: ||gpu - cpu|| / ||cpu|| <= 1e-2 (a few elements may round
 * the other way when the fp32 results differ by an ulp; cuBLAS sums in
 * another order); fp32 side outputs (lse, rstd, probabilities, losses,
 * dgates, master weights, moments) <= 1e-3; integers equal.
 * fp16 runs the bf16 inputs' ranges (|x| <= 4, far inside fp16's 65504);
 * only the cast test starts from other values (tc_half_ties).  Some fp16
 * results are subnormal (below 2^-14), e.g. most of cross-entropy's dlogits
 * at V = 5003; both sides round the same fp32 value there too. */
#define TOL_HALF 1e-2
#define TOL_SIDE 1e-3
#define TN (t->half->ty->name)

/* a half tensor (of type t->half): h the CPU side, d the GPU side */
typedef struct {
    uint16_t *h, *d;
    int64_t n;
} tc_h;

static tc_h tc_hin(tc_env *t, int64_t n, float lo, float hi)
{
    tc_h b = {ch_host(&t->s, n * 2), ch_dev(&t->s, n * 2), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = t->half->ty->round(ch_unif(&t->rng, lo, hi));
    ch_copy(&t->s, b.d, b.h, n * 2, MOEK_COPY_H2D);
    return b;
}

/* poisoned with NaN on both sides */
static tc_h tc_hout(tc_env *t, int64_t n)
{
    tc_h b = {ch_host(&t->s, n * 2), ch_dev(&t->s, n * 2), n};
    for (int64_t i = 0; i < n; i++)
        b.h[i] = t->half->ty->nan;
    ch_copy(&t->s, b.d, b.h, n * 2, MOEK_COPY_H2D);
    return b;
}

static void tc_hup(tc_env *t, tc_h b) { ch_copy(&t->s, b.d, b.h, b.n * 2, MOEK_COPY_H2D); }

static void tc_hcmp(tc_env *t, const char *name, tc_h b, double tol)
{
    tc_half *hk = t->half;
    uint16_t *g = ch_host(&t->s, b.n * 2);
    ch_copy(&t->s, g, b.d, b.n * 2, MOEK_COPY_D2H);
    double num = 0.0, den = 0.0;
    int64_t bad = -1;
    for (int64_t i = 0; i < b.n; i++) {
        double gv = hk->ty->widen(g[i]), cv = hk->ty->widen(b.h[i]);
        if (!isfinite(gv) && bad < 0)
            bad = i;
        num += (gv - cv) * (gv - cv);
        den += cv * cv;
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (isfinite(rel) && rel > hk->worst) {
        hk->worst = rel;
        snprintf(hk->worst_name, sizeof hk->worst_name, "%s", name);
    }
    if (bad >= 0)
        CHECK(name, 0, "gpu[%lld] = %g (cpu %g)", (long long)bad, hk->ty->widen(g[bad]),
              hk->ty->widen(b.h[bad]));
    else
        CHECK(name, isfinite(rel) && rel <= tol, "relative error %.3g > %.1g over %lld values",
              rel, tol, (long long)b.n);
}

static void tc_h_elementwise(tc_env *t)
{
    tc_half *hk = t->half;
    static const int64_t sizes[] = {1, 37, 1000, 65537};
    char name[160];
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int64_t n = sizes[s];
        /* casts: fp32 values between neighbours of the type, exact ties
         * included (tc_half_ties) */
        tc_f xf = tc_in(t, n, -3, 3), yf = tc_out(t, n);
        for (size_t i = 0; i < hk->nties && (int64_t)i < n; i++)
            xf.h[i] = hk->ties[i];
        ch_copy(&t->s, xf.d, xf.h, n * 4, MOEK_COPY_H2D);
        tc_h yb = tc_hout(t, n);
        hk->c.cast_f32(C, xf.h, yb.h, n);
        hk->g.cast_f32(G, xf.d, yb.d, n);
        if (ch_sync(&t->s, NM("cuda cast_f32_%s n=%lld", TN, (long long)n)))
            tc_hcmp(t, name, yb, 0.0);
        tc_hup(t, yb);
        hk->c.cast_to_f32(C, yb.h, yf.h, n);
        hk->g.cast_to_f32(G, yb.d, yf.d, n);
        if (ch_sync(&t->s, NM("cuda cast_%s_f32 n=%lld", TN, (long long)n)))
            tc_cmp(t, name, yf, 0.0);

        tc_h a = tc_hin(t, n, -3, 3), b = tc_hin(t, n, -3, 3), y = tc_hout(t, n), z = tc_hout(t, n);
        hk->c.fill(C, y.h, n, 2.5f);
        hk->g.fill(G, y.d, n, 2.5f);
        if (ch_sync(&t->s, NM("cuda fill_%s n=%lld", TN, (long long)n)))
            tc_hcmp(t, name, y, 0.0);
        hk->c.copy(C, a.h, y.h, n);
        hk->g.copy(G, a.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda copy_%s n=%lld", TN, (long long)n)))
            tc_hcmp(t, name, y, 0.0);
        hk->c.add_fwd(C, a.h, b.h, y.h, n);
        hk->g.add_fwd(G, a.d, b.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda add_fwd_%s n=%lld", TN, (long long)n)))
            tc_hcmp(t, name, y, TOL_HALF);
        tc_f acc = tc_in(t, n, -1, 1);
        hk->c.accumulate(C, acc.h, a.h, n);
        hk->g.accumulate(G, acc.d, a.d, n);
        if (ch_sync(&t->s, NM("cuda accumulate_%s n=%lld", TN, (long long)n)))
            tc_cmp(t, name, acc, TOL_SIDE);
        hk->c.scale_fwd(C, a.h, y.h, n, -0.37f);
        hk->g.scale_fwd(G, a.d, y.d, n, -0.37f);
        if (ch_sync(&t->s, NM("cuda scale_fwd_%s n=%lld", TN, (long long)n)))
            tc_hcmp(t, name, y, TOL_HALF);
        hk->c.scale_bwd(C, b.h, y.h, n, 1.7f);
        hk->g.scale_bwd(G, b.d, y.d, n, 1.7f);
        if (ch_sync(&t->s, NM("cuda scale_bwd_%s n=%lld", TN, (long long)n)))
            tc_hcmp(t, name, y, TOL_HALF);
        hk->c.gelu_fwd(C, a.h, y.h, n);
        hk->g.gelu_fwd(G, a.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda gelu_fwd_%s n=%lld", TN, (long long)n)))
            tc_hcmp(t, name, y, TOL_HALF);
        hk->c.gelu_bwd(C, b.h, a.h, y.h, n);
        hk->g.gelu_bwd(G, b.d, a.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda gelu_bwd_%s n=%lld", TN, (long long)n)))
            tc_hcmp(t, name, y, TOL_HALF);
        hk->c.swiglu_fwd(C, a.h, b.h, y.h, n);
        hk->g.swiglu_fwd(G, a.d, b.d, y.d, n);
        if (ch_sync(&t->s, NM("cuda swiglu_fwd_%s n=%lld", TN, (long long)n)))
            tc_hcmp(t, name, y, TOL_HALF);
        tc_h dy = tc_hin(t, n, -1, 1);
        hk->c.swiglu_bwd(C, dy.h, a.h, b.h, y.h, z.h, n);
        hk->g.swiglu_bwd(G, dy.d, a.d, b.d, y.d, z.d, n);
        if (ch_sync(&t->s, NM("cuda swiglu_bwd_%s n=%lld", TN, (long long)n))) {
            tc_hcmp(t, NM("cuda swiglu_bwd_%s dgate n=%lld", TN, (long long)n), y, TOL_HALF);
            tc_hcmp(t, NM("cuda swiglu_bwd_%s dup n=%lld", TN, (long long)n), z, TOL_HALF);
        }
        ch_end_case(&t->s);
    }
}

static void tc_h_embedding(tc_env *t)
{
    tc_half *hk = t->half;
    /* the last: several id tiles of the half backward, ids 300.. unused */
    static const int64_t shapes[][3] = {{1, 5, 1}, {37, 5, 13}, {300, 50, 64}, {500, 700, 45}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], V = shapes[s][1], D = shapes[s][2];
        tc_i ids = tc_iin(t, N, 0, V < 300 ? V : 300);
        tc_h tab = tc_hin(t, V * D, -1, 1), out = tc_hout(t, N * D), dout = tc_hin(t, N * D, -1, 1);
        tc_h dtab = tc_hout(t, V * D);
#define SH (long long)N, (long long)V, (long long)D
        hk->c.embedding_fwd(C, ids.h, tab.h, out.h, N, V, D);
        hk->g.embedding_fwd(G, ids.d, tab.d, out.d, N, V, D);
        if (ch_sync(&t->s, NM("cuda embedding_fwd_%s N=%lld V=%lld D=%lld", TN, SH)))
            tc_hcmp(t, name, out, 0.0);
        hk->c.embedding_bwd(C, dout.h, ids.h, dtab.h, N, V, D);
        hk->g.embedding_bwd(G, dout.d, ids.d, dtab.d, N, V, D);
        if (ch_sync(&t->s, NM("cuda embedding_bwd_%s N=%lld V=%lld D=%lld", TN, SH)))
            tc_hcmp(t, name, dtab, TOL_HALF);
#undef SH
        ch_end_case(&t->s);
    }
    /* errors of the tiled half backward: a bad id at sync, a vocabulary too
     * big for its grid at once (nothing is touched before the check) */
    tc_i ids = tc_iin(t, 4, 0, 3);
    ids.h[1] = -2;
    tc_iup(t, ids);
    tc_h dout = tc_hin(t, 4 * 5, -1, 1), dtab = tc_hout(t, 3 * 5);
    hk->g.embedding_bwd(G, dout.d, ids.d, dtab.d, 4, 3, 5);
    int rc = t->g.device_sync(G, t->s.err, sizeof t->s.err);
    printf("# bad token id (embedding_bwd_%s): %s\n", TN, t->s.err);
    CHECK(NM("cuda embedding_bwd_%s reports a bad id at sync", TN),
          rc == -1 && t->s.gstatus == MOEK_E_INDEX && strstr(t->s.err, "MOEK_E_INDEX"),
          "rc %d status %d", rc, t->s.gstatus);
    t->s.gstatus = 0;
    hk->g.embedding_bwd(G, dout.d, ids.d, dtab.d, 4, (int64_t)1 << 25, 5);
    CHECK(NM("cuda embedding_bwd_%s rejects a vocabulary over 2^24 ids", TN),
          t->s.gstatus == MOEK_E_SHAPE, "status %d", t->s.gstatus);
    ch_end_case(&t->s);
}

static void tc_h_matmul(tc_env *t)
{
    tc_half *hk = t->half;
    static const int64_t shapes[][3] = {{1, 1, 1}, {37, 19, 23}, {128, 64, 96}, {300, 257, 129},
                                        {4, 7, 0}, {3, 0, 5}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], K = shapes[s][1], M = shapes[s][2];
        tc_h x = tc_hin(t, N * K, -1, 1), w = tc_hin(t, M * K, -1, 1), y = tc_hout(t, N * M);
        tc_h dy = tc_hin(t, N * M, -1, 1), dx = tc_hout(t, N * K), dw = tc_hout(t, M * K);
#define SH (long long)N, (long long)K, (long long)M
        hk->c.matmul_fwd(C, x.h, w.h, y.h, N, K, M);
        hk->g.matmul_fwd(G, x.d, w.d, y.d, N, K, M);
        if (ch_sync(&t->s, NM("cuda matmul_fwd_%s N=%lld K=%lld M=%lld", TN, SH)))
            tc_hcmp(t, name, y, TOL_HALF);
        hk->c.matmul_bwd(C, dy.h, x.h, w.h, dx.h, dw.h, N, K, M);
        hk->g.matmul_bwd(G, dy.d, x.d, w.d, dx.d, dw.d, N, K, M);
        if (ch_sync(&t->s, NM("cuda matmul_bwd_%s N=%lld K=%lld M=%lld", TN, SH))) {
            tc_hcmp(t, NM("cuda matmul_bwd_%s dx N=%lld K=%lld M=%lld", TN, SH), dx, TOL_HALF);
            tc_hcmp(t, NM("cuda matmul_bwd_%s dw N=%lld K=%lld M=%lld", TN, SH), dw, TOL_HALF);
        }
#undef SH
        ch_end_case(&t->s);
    }
}

static void tc_h_norm_rope(tc_env *t)
{
    tc_half *hk = t->half;
    static const int64_t shapes[][2] = {{1, 1}, {37, 19}, {64, 1000}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], D = shapes[s][1];
        tc_h x = tc_hin(t, N * D, -2, 2), w = tc_hin(t, D, 0.5f, 1.5f), y = tc_hout(t, N * D);
        tc_f r = tc_out(t, N);
        tc_h dy = tc_hin(t, N * D, -1, 1), dx = tc_hout(t, N * D), dw = tc_hout(t, D);
        hk->c.rmsnorm_fwd(C, x.h, w.h, y.h, r.h, N, D, 1e-5f);
        hk->g.rmsnorm_fwd(G, x.d, w.d, y.d, r.d, N, D, 1e-5f);
        if (ch_sync(&t->s, NM("cuda rmsnorm_fwd_%s N=%lld D=%lld", TN, (long long)N, (long long)D))) {
            tc_hcmp(t, name, y, TOL_HALF);
            tc_cmp(t, NM("cuda rmsnorm_fwd_%s rstd N=%lld D=%lld", TN, (long long)N, (long long)D), r,
                   TOL_SIDE);
        }
        ch_copy(&t->s, r.d, r.h, N * 4, MOEK_COPY_H2D);
        hk->c.rmsnorm_bwd(C, dy.h, x.h, w.h, r.h, dx.h, dw.h, N, D);
        hk->g.rmsnorm_bwd(G, dy.d, x.d, w.d, r.d, dx.d, dw.d, N, D);
        if (ch_sync(&t->s, NM("cuda rmsnorm_bwd_%s N=%lld D=%lld", TN, (long long)N, (long long)D))) {
            tc_hcmp(t, NM("cuda rmsnorm_bwd_%s dx N=%lld D=%lld", TN, (long long)N, (long long)D), dx,
                    TOL_HALF);
            tc_hcmp(t, NM("cuda rmsnorm_bwd_%s dw N=%lld D=%lld", TN, (long long)N, (long long)D), dw,
                    TOL_HALF);
        }
        ch_end_case(&t->s);
    }
    static const int64_t rshapes[][4] = {{1, 1, 1, 2}, {2, 37, 3, 10}, {1, 300, 2, 7}};
    for (size_t s = 0; s < sizeof rshapes / sizeof *rshapes; s++) {
        int64_t B = rshapes[s][0], T = rshapes[s][1], H = rshapes[s][2], Dh = rshapes[s][3];
        int64_t n = B * T * H * Dh;
        tc_h x = tc_hin(t, n, -1, 1), y = tc_hout(t, n), dx = tc_hout(t, n);
#define SH (long long)B, (long long)T, (long long)H, (long long)Dh
        hk->c.rope_fwd(C, x.h, y.h, B, T, H, Dh, 10000.0f);
        hk->g.rope_fwd(G, x.d, y.d, B, T, H, Dh, 10000.0f);
        if (ch_sync(&t->s, NM("cuda rope_fwd_%s B=%lld T=%lld H=%lld Dh=%lld", TN, SH)))
            tc_hcmp(t, name, y, TOL_HALF);
        hk->c.rope_bwd(C, x.h, dx.h, B, T, H, Dh, 10000.0f);
        hk->g.rope_bwd(G, x.d, dx.d, B, T, H, Dh, 10000.0f);
        if (ch_sync(&t->s, NM("cuda rope_bwd_%s B=%lld T=%lld H=%lld Dh=%lld", TN, SH)))
            tc_hcmp(t, name, dx, TOL_HALF);
#undef SH
        ch_end_case(&t->s);
    }
}

static void tc_h_attention(tc_env *t)
{
    tc_half *hk = t->half;
    /* the last three take the tensor-core kernels over several 64-row
     * tiles, so tiles are reloaded while other warps may lag; the last is
     * the largest head (the backward's most shared memory) */
    static const int64_t shapes[][4] = {{1, 1, 1, 4},    {2, 37, 3, 16},  {1, 130, 2, 33}, {1, 64, 4, 64},
                                        {1, 200, 2, 64}, {2, 150, 1, 32}, {1, 70, 2, 128}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t B = shapes[s][0], T = shapes[s][1], H = shapes[s][2], Dh = shapes[s][3];
        int64_t n = B * T * H * Dh;
        tc_h q = tc_hin(t, n, -1, 1), k = tc_hin(t, n, -1, 1), v = tc_hin(t, n, -1, 1);
        tc_h o = tc_hout(t, n), dout = tc_hin(t, n, -1, 1);
        tc_f lse = tc_out(t, B * H * T);
        tc_h dq = tc_hout(t, n), dk = tc_hout(t, n), dv = tc_hout(t, n);
#define SH (long long)B, (long long)T, (long long)H, (long long)Dh
        hk->c.attention_fwd(C, q.h, k.h, v.h, o.h, lse.h, B, T, H, Dh);
        hk->g.attention_fwd(G, q.d, k.d, v.d, o.d, lse.d, B, T, H, Dh);
        if (ch_sync(&t->s, NM("cuda attention_fwd_%s B=%lld T=%lld H=%lld Dh=%lld", TN, SH))) {
            tc_hcmp(t, name, o, TOL_HALF);
            tc_cmp(t, NM("cuda attention_fwd_%s lse B=%lld T=%lld H=%lld Dh=%lld", TN, SH), lse,
                   TOL_SIDE);
        }
        tc_hup(t, o);   /* backward from the CPU's o and lse on both sides */
        ch_copy(&t->s, lse.d, lse.h, B * H * T * 4, MOEK_COPY_H2D);
        hk->c.attention_bwd(C, dout.h, q.h, k.h, v.h, o.h, lse.h, dq.h, dk.h, dv.h, B, T, H, Dh);
        hk->g.attention_bwd(G, dout.d, q.d, k.d, v.d, o.d, lse.d, dq.d, dk.d, dv.d, B, T, H,
                                Dh);
        if (ch_sync(&t->s, NM("cuda attention_bwd_%s B=%lld T=%lld H=%lld Dh=%lld", TN, SH))) {
            tc_hcmp(t, NM("cuda attention_bwd_%s dq B=%lld T=%lld H=%lld Dh=%lld", TN, SH), dq, TOL_HALF);
            tc_hcmp(t, NM("cuda attention_bwd_%s dk B=%lld T=%lld H=%lld Dh=%lld", TN, SH), dk, TOL_HALF);
            tc_hcmp(t, NM("cuda attention_bwd_%s dv B=%lld T=%lld H=%lld Dh=%lld", TN, SH), dv, TOL_HALF);
        }
#undef SH
        ch_end_case(&t->s);
    }
}

static void tc_h_losses(tc_env *t)
{
    tc_half *hk = t->half;
    static const int64_t shapes[][2] = {{1, 5}, {37, 1000}, {16, 5003}};
    char name[160];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t N = shapes[s][0], V = shapes[s][1];
        tc_h x = tc_hin(t, N * V, -4, 4), dx = tc_hout(t, N * V);
        tc_f loss = tc_out(t, 1), lse = tc_out(t, N), dl = tc_in(t, 1, 0.5f, 2.0f);
        tc_i y = tc_iin(t, N, 0, V);
#define SH (long long)N, (long long)V
        hk->c.cross_entropy_fwd(C, x.h, y.h, loss.h, lse.h, N, V);
        hk->g.cross_entropy_fwd(G, x.d, y.d, loss.d, lse.d, N, V);
        if (ch_sync(&t->s, NM("cuda cross_entropy_fwd_%s N=%lld V=%lld", TN, SH))) {
            tc_cmp(t, name, loss, TOL_SIDE);
            tc_cmp(t, NM("cuda cross_entropy_fwd_%s lse N=%lld V=%lld", TN, SH), lse, TOL_SIDE);
        }
        ch_copy(&t->s, lse.d, lse.h, N * 4, MOEK_COPY_H2D);
        hk->c.cross_entropy_bwd(C, dl.h, x.h, y.h, lse.h, dx.h, N, V);
        hk->g.cross_entropy_bwd(G, dl.d, x.d, y.d, lse.d, dx.d, N, V);
        if (ch_sync(&t->s, NM("cuda cross_entropy_bwd_%s N=%lld V=%lld", TN, SH)))
            tc_hcmp(t, name, dx, TOL_HALF);
        hk->c.zloss_fwd(C, x.h, loss.h, N, V);
        hk->g.zloss_fwd(G, x.d, loss.d, N, V);
        if (ch_sync(&t->s, NM("cuda zloss_fwd_%s N=%lld E=%lld", TN, SH)))
            tc_cmp(t, name, loss, TOL_SIDE);
        hk->c.zloss_bwd(C, dl.h, x.h, dx.h, N, V);
        hk->g.zloss_bwd(G, dl.d, x.d, dx.d, N, V);
        if (ch_sync(&t->s, NM("cuda zloss_bwd_%s N=%lld E=%lld", TN, SH)))
            tc_hcmp(t, name, dx, TOL_HALF);
        /* router softmax on the same logits: fp32 probabilities */
        tc_f p = tc_out(t, N * V), dp = tc_in(t, N * V, -1, 1);
        hk->c.softmax_fwd(C, x.h, p.h, N, V);
        hk->g.softmax_fwd(G, x.d, p.d, N, V);
        if (ch_sync(&t->s, NM("cuda softmax_fwd_%s N=%lld E=%lld", TN, SH)))
            tc_cmp(t, name, p, TOL_SIDE);
        ch_copy(&t->s, p.d, p.h, N * V * 4, MOEK_COPY_H2D);
        hk->c.softmax_bwd(C, dp.h, p.h, dx.h, N, V);
        hk->g.softmax_bwd(G, dp.d, p.d, dx.d, N, V);
        if (ch_sync(&t->s, NM("cuda softmax_bwd_%s N=%lld E=%lld", TN, SH)))
            tc_hcmp(t, name, dx, TOL_HALF);
#undef SH
        ch_end_case(&t->s);
    }
}

/* idx patterns as in tc_moe_case */
static void tc_h_moe_case(tc_env *t, int64_t N, int64_t D, int64_t E, int64_t k, int64_t C_,
                          int64_t M, int pattern)
{
    tc_half *hk = t->half;
    char name[200], sh[120];
    snprintf(sh, sizeof sh, "N=%lld D=%lld E=%lld k=%lld C=%lld M=%lld idx=%d", (long long)N,
             (long long)D, (long long)E, (long long)k, (long long)C_, (long long)M, pattern);
    int64_t S = N * k, R = C_ > 0 ? E * C_ : S;
    tc_i idx = tc_iout(t, S);
    tc_route(t, idx.h, N, E, k, pattern);
    tc_iup(t, idx);
    tc_h x = tc_hin(t, N * D, -1, 1), xs = tc_hout(t, R * D);
    tc_i slot = tc_iout(t, S), er = tc_iout(t, 2 * E);
    hk->c.dispatch_fwd(C, x.h, idx.h, xs.h, slot.h, er.h, N, D, E, k, C_);
    hk->g.dispatch_fwd(G, x.d, idx.d, xs.d, slot.d, er.d, N, D, E, k, C_);
    if (ch_sync(&t->s, NM("cuda dispatch_fwd_%s %s", TN, sh))) {
        tc_hcmp(t, NM("cuda dispatch_fwd_%s xs %s", TN, sh), xs, 0.0);
        tc_icmp(t, NM("cuda dispatch_fwd_%s slot_row %s", TN, sh), slot);
        tc_icmp(t, NM("cuda dispatch_fwd_%s expert_rows %s", TN, sh), er);
    }
    tc_iup(t, slot);
    tc_iup(t, er);
    tc_hup(t, xs);
    tc_h dxs = tc_hin(t, R * D, -1, 1), dx = tc_hout(t, N * D);
    hk->c.dispatch_bwd(C, dxs.h, slot.h, dx.h, N, D, k, R);
    hk->g.dispatch_bwd(G, dxs.d, slot.d, dx.d, N, D, k, R);
    if (ch_sync(&t->s, NM("cuda dispatch_bwd_%s %s", TN, sh)))
        tc_hcmp(t, name, dx, TOL_HALF);
    tc_h w = tc_hin(t, E * M * D, -1, 1), ys = tc_hout(t, R * M);
    hk->c.grouped_matmul_fwd(C, xs.h, w.h, er.h, ys.h, R, D, M, E);
    hk->g.grouped_matmul_fwd(G, xs.d, w.d, er.d, ys.d, R, D, M, E);
    if (ch_sync(&t->s, NM("cuda grouped_matmul_fwd_%s %s", TN, sh)))
        tc_hcmp(t, name, ys, TOL_HALF);
    tc_h dys = tc_hin(t, R * M, -1, 1), dxs2 = tc_hout(t, R * D), dw = tc_hout(t, E * M * D);
    hk->c.grouped_matmul_bwd(C, dys.h, xs.h, w.h, er.h, dxs2.h, dw.h, R, D, M, E);
    hk->g.grouped_matmul_bwd(G, dys.d, xs.d, w.d, er.d, dxs2.d, dw.d, R, D, M, E);
    if (ch_sync(&t->s, NM("cuda grouped_matmul_bwd_%s %s", TN, sh))) {
        tc_hcmp(t, NM("cuda grouped_matmul_bwd_%s dxs %s", TN, sh), dxs2, TOL_HALF);
        tc_hcmp(t, NM("cuda grouped_matmul_bwd_%s dw %s", TN, sh), dw, TOL_HALF);
    }
    tc_f gates = tc_in(t, S, 0, 1), dg = tc_out(t, S);
    tc_h out = tc_hout(t, N * M), dout = tc_hin(t, N * M, -1, 1), dys2 = tc_hout(t, R * M);
    tc_hup(t, ys);
    hk->c.combine_fwd(C, ys.h, slot.h, gates.h, out.h, N, M, k, R);
    hk->g.combine_fwd(G, ys.d, slot.d, gates.d, out.d, N, M, k, R);
    if (ch_sync(&t->s, NM("cuda combine_fwd_%s %s", TN, sh)))
        tc_hcmp(t, name, out, TOL_HALF);
    hk->c.combine_bwd(C, dout.h, ys.h, slot.h, gates.h, dys2.h, dg.h, N, M, k, R);
    hk->g.combine_bwd(G, dout.d, ys.d, slot.d, gates.d, dys2.d, dg.d, N, M, k, R);
    if (ch_sync(&t->s, NM("cuda combine_bwd_%s %s", TN, sh))) {
        tc_hcmp(t, NM("cuda combine_bwd_%s dys %s", TN, sh), dys2, TOL_HALF);
        tc_cmp(t, NM("cuda combine_bwd_%s dgates %s", TN, sh), dg, TOL_SIDE);
    }
    ch_end_case(&t->s);
}

static void tc_h_moe(tc_env *t)
{
    tc_h_moe_case(t, 37, 13, 8, 2, 0, 23, 0);     /* dropless */
    tc_h_moe_case(t, 37, 13, 8, 2, 5, 23, 0);     /* capacity 5: drops */
    tc_h_moe_case(t, 37, 13, 8, 2, 12, 23, 1);    /* expert 0 gets nothing */
    tc_h_moe_case(t, 37, 13, 8, 2, 0, 23, 1);
    tc_h_moe_case(t, 50, 19, 4, 1, 0, 9, 2);      /* all tokens to one expert */
    tc_h_moe_case(t, 1, 7, 3, 1, 0, 5, 0);        /* a single token */
    tc_h_moe_case(t, 1, 7, 3, 2, 1, 5, 0);
    tc_h_moe_case(t, 300, 64, 16, 4, 0, 96, 0);   /* blocks over several tiles */
    tc_h_moe_case(t, 300, 64, 16, 4, 70, 96, 0);
    /* tensor-core paths: one K step, so the epilogue's staging reuses the
     * ring slot just read; and seven, so the 3-stage ring wraps twice */
    tc_h_moe_case(t, 40, 32, 4, 1, 0, 40, 0);
    tc_h_moe_case(t, 64, 224, 4, 2, 0, 48, 0);
}

static void tc_h_optim(tc_env *t)
{
    tc_half *hk = t->half;
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
            ch_copy(&t->s, hy.d, hy.h, sizeof hyper, MOEK_COPY_H2D);
            tc_f master = tc_in(t, n, -1, 1), g = tc_in(t, n, -1, 1), m = tc_in(t, n, -0.1f, 0.1f);
            tc_f v = tc_in(t, n, 0, 0.1f), ns = tc_in(t, 1, 4.0f, 9.0f);
            tc_h p = tc_hout(t, n);
            hk->c.adamw(C, p.h, master.h, g.h, m.h, v.h, n, hy.h, ns.h, 0.1f);
            hk->g.adamw(G, p.d, master.d, g.d, m.d, v.d, n, hy.d, ns.d, 0.1f);
            if (ch_sync(&t->s, NM("cuda adamw_%s n=%lld clip=%d", TN, (long long)n, clip))) {
                tc_hcmp(t, NM("cuda adamw_%s p n=%lld clip=%d", TN, (long long)n, clip), p, TOL_HALF);
                tc_cmp(t, NM("cuda adamw_%s master n=%lld clip=%d", TN, (long long)n, clip), master,
                       TOL_SIDE);
                tc_cmp(t, NM("cuda adamw_%s m n=%lld clip=%d", TN, (long long)n, clip), m, TOL_SIDE);
                tc_cmp(t, NM("cuda adamw_%s v n=%lld clip=%d", TN, (long long)n, clip), v, TOL_SIDE);
            }
            /* poison again: sgd must write every element */
            for (int64_t i = 0; i < n; i++)
                p.h[i] = hk->ty->nan;
            tc_hup(t, p);
            hk->c.sgd(C, p.h, master.h, g.h, m.h, n, hy.h, clip ? ns.h : NULL, 0.01f);
            hk->g.sgd(G, p.d, master.d, g.d, m.d, n, hy.d, clip ? ns.d : NULL, 0.01f);
            if (ch_sync(&t->s, NM("cuda sgd_%s n=%lld clip=%d", TN, (long long)n, clip))) {
                tc_hcmp(t, NM("cuda sgd_%s p n=%lld clip=%d", TN, (long long)n, clip), p, TOL_HALF);
                tc_cmp(t, NM("cuda sgd_%s master n=%lld clip=%d", TN, (long long)n, clip), master,
                       TOL_SIDE);
                tc_cmp(t, NM("cuda sgd_%s buf n=%lld clip=%d", TN, (long long)n, clip), m, TOL_SIDE);
            }
        }
        ch_end_case(&t->s);
    }
}

/* the cast test's first values, between neighbours of the type with exact
 * ties.  bf16: 1 + 2^-8 and -(1 + 2^-8) (ties, to even: down), 1 + 3 * 2^-8
 * (a tie, up), 3e38 (finite in bf16) and an fp32 subnormal.  fp16 has 3
 * more mantissa bits and a far smaller range, so it needs its own: the same
 * ties at 2^-11, 65519 (below 65520, the midpoint to 2^16: rounds to 65504,
 * the largest half; 3e38 would be Inf, which tc_hcmp fails as for bf16) and
 * 1e-7 (an fp16 subnormal, 2 units of 2^-24). */
static const float tc_ties_bf16[] = {1.00390625f, 1.01171875f, -1.00390625f, 3.0e38f, 1e-40f};
static const float tc_ties_f16[] = {1.00048828125f, 1.00146484375f, -1.00048828125f, 65519.0f,
                                    1e-7f};

/* the CPU side of both half types; the CUDA side comes from main's symbols */
static void tc_half_init(tc_env *t)
{
    tc_half *b = &t->halves[CH_BF16], *f = &t->halves[CH_F16];
#define TC_CPU_BF16(n) b->c.n = moek_##n##_bf16;
#define TC_CPU_F16(n) f->c.n = moek_##n##_f16;
    TC_HALF_KERNELS(TC_CPU_BF16)
    TC_HALF_KERNELS(TC_CPU_F16)
#undef TC_CPU_BF16
#undef TC_CPU_F16
    b->c.cast_to_f32 = moek_cast_bf16_f32;
    f->c.cast_to_f32 = moek_cast_f16_f32;
    b->ty = ch_half_type(CH_BF16);
    f->ty = ch_half_type(CH_F16);
    b->ties = tc_ties_bf16;
    b->nties = sizeof tc_ties_bf16 / sizeof *tc_ties_bf16;
    f->ties = tc_ties_f16;
    f->nties = sizeof tc_ties_f16 / sizeof *tc_ties_f16;
}

/* every half case, for one type */
static void tc_half_cases(tc_env *t, tc_half *hk)
{
    t->half = hk;
    tc_h_elementwise(t);
    tc_h_embedding(t);
    tc_h_matmul(t);
    tc_h_norm_rope(t);
    tc_h_attention(t);
    tc_h_losses(t);
    tc_h_moe(t);
    tc_h_optim(t);
    t->half = NULL;
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
#define TC_SYM_BF16(n) CH_HENTRY(t->halves[CH_BF16].g, n, "_bf16")
#define TC_SYM_F16(n) CH_HENTRY(t->halves[CH_F16].g, n, "_f16")
    ch_sym syms[] = {TC_KERNELS(TC_SYM) TC_HALF_KERNELS(TC_SYM_BF16) TC_HALF_KERNELS(TC_SYM_F16)
                     {"moek_cast_bf16_f32", (void **)&t->halves[CH_BF16].g.cast_to_f32},
                     {"moek_cast_f16_f32", (void **)&t->halves[CH_F16].g.cast_to_f32}};
#undef TC_SYM
#undef TC_SYM_BF16
#undef TC_SYM_F16
    int go = ch_start(lib, "cuda_kernels", syms, CH_NSYMS(syms), &t->s);
    if (go <= 0) {
        free(t);
        return go < 0;
    }
    t->rng = 0x9e3779b97f4a7c15ull;
    tc_half_init(t);
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
    /* the CPU half variants widen into a workspace (the bf16 macro serves
     * fp16 too); every case here fits */
    t->s.cctx.workspace_bytes = MOEK_BF16_WORKSPACE_BYTES(4 << 20);
    t->s.cctx.workspace = malloc((size_t)t->s.cctx.workspace_bytes);
    if (!t->s.cctx.workspace)
        return 2;
    /* bf16 first and fp16 last, so the fp32 and bf16 cases draw the inputs
     * they always drew */
    tc_half_cases(t, &t->halves[CH_BF16]);
    tc_half_cases(t, &t->halves[CH_F16]);
    free(t->s.cctx.workspace);
    t->g.device_fini(&t->s.gctx);
    /* how much room the tolerances leave */
    printf("# worst relative error: %.3g (%s)\n", t->worst, t->worst_name);
    for (int i = 0; i < CH_NHALF; i++) {
        tc_half *hk = &t->halves[i];
        printf("# worst %s output error: %.3g (%s)\n", hk->ty->name, hk->worst, hk->worst_name);
        printf("# worst fp32 output error of a %s kernel: %.3g (%s)\n", hk->ty->name,
               hk->worst_side, hk->worst_side_name);
    }
    free(t);
    CHECK_DONE();
}
