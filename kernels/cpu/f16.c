/* f16.c - the fp16-storage variants of the CPU kernels (precision = fp16).
 *
 * The twin of bf16.c with IEEE half storage (moek.h "fp16 storage"): each
 * variant widens its half inputs to fp32 exactly, runs the fp32 kernel of the
 * same name and rounds each half output once (RNE, overflow to Inf), so the
 * CPU results are the definition the CUDA __half variants are compared with.
 * The layout follows bf16.c line for line (add/scale/accumulate inline,
 * GELU/SwiGLU in stack chunks, embedding_fwd a half row gather, everything
 * else through MOEK_BF16_WORKSPACE_BYTES of ctx->workspace or MOEK_E_SHAPE);
 * the issue 2 layer ops (layernorm, silu, repeat_kv, bias_add), which have
 * their bf16 variants in layer_ops.c, are here too, by the same recipe.
 * Loss scaling lives in the optimizer (optim.c): nothing here knows of it. */
#include "bf16.h"   /* kbf16_team */
#include "f16.h"

/* Records an error; the first one wins, also across threads. */
static void kf16_fail(const moek_ctx *ctx, int code)
{
    if (ctx && ctx->status) {
        int zero = 0;
        __atomic_compare_exchange_n(ctx->status, &zero, code, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED);
    }
}

void moek_cast_f32_f16(const moek_ctx *ctx, const float *x, moek_f16 *y, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = kf16_round(x[i]);
}

void moek_cast_f16_f32(const moek_ctx *ctx, const moek_f16 *x, float *y, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = kf16_widen(x[i]);
}

/* ---- one call's half tensors and their fp32 copies ----------------------- */
#define KF16_MAX_ARGS 8   /* attention_bwd has the most: 8 */

typedef struct {
    int n;
    const moek_f16 *src[KF16_MAX_ARGS]; /* NULL: an optional output not wanted */
    moek_f16 *out[KF16_MAX_ARGS];       /* set for outputs: rounded back after */
    int64_t len[KF16_MAX_ARGS];
    float *f[KF16_MAX_ARGS];             /* the fp32 copy the kernel sees */
    float empty[1];                       /* what an empty tensor points at */
} kf16_call;

static void kf16_in(kf16_call *c, const moek_f16 *p, int64_t len)
{
    c->src[c->n] = p;
    c->out[c->n] = NULL;
    c->len[c->n] = len > 0 ? len : 0;
    c->n++;
}

static void kf16_out(kf16_call *c, moek_f16 *p, int64_t len)
{
    kf16_in(c, p, len);
    c->out[c->n - 1] = p;
}

/* Checks the workspace, carves a 64-byte aligned fp32 piece per tensor and
 * widens into it.  0 (MOEK_E_SHAPE, nothing written) when it is too small.
 * At most 8 pieces: their alignment padding fits the macro's 64 * 16 slack. */
static int kf16_widen_all(const moek_ctx *ctx, kf16_call *c)
{
    int64_t total = 0;
    for (int i = 0; i < c->n; i++)
        if (c->src[i])
            total += c->len[i];
    if (total > 0 && (!ctx || !ctx->workspace ||
                      ctx->workspace_bytes < MOEK_BF16_WORKSPACE_BYTES(total))) {
        kf16_fail(ctx, MOEK_E_SHAPE);
        return 0;
    }
    uintptr_t at = total > 0 ? (uintptr_t)ctx->workspace : 0;
    for (int i = 0; i < c->n; i++) {
        if (!c->src[i]) {
            c->f[i] = NULL;
        } else if (c->len[i] == 0) {
            c->f[i] = c->empty;
        } else {
            at = (at + 63) & ~(uintptr_t)63;
            c->f[i] = (float *)at;
            at += (uintptr_t)c->len[i] * sizeof(float);
            moek_cast_f16_f32(ctx, c->src[i], c->f[i], c->len[i]);
        }
    }
    return 1;
}

static void kf16_round_all(const moek_ctx *ctx, const kf16_call *c)
{
    for (int i = 0; i < c->n; i++)
        if (c->out[i] && c->len[i] > 0)
            moek_cast_f32_f16(ctx, c->f[i], c->out[i], c->len[i]);
}

/* ---- elementwise: no workspace ------------------------------------------- */
void moek_fill_f16(const moek_ctx *ctx, moek_f16 *x, int64_t n, float value)
{
    moek_f16 h = kf16_round(value);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        x[i] = h;
}

/* a bit copy: widening then rounding is the identity on every non-NaN */
void moek_copy_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n)
{
    (void)ctx;
    if (n > 0 && x != y)
        memmove(y, x, (size_t)n * sizeof *y);
}

void moek_add_fwd_f16(const moek_ctx *ctx, const moek_f16 *a, const moek_f16 *b, moek_f16 *y,
                       int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = kf16_round(kf16_widen(a[i]) + kf16_widen(b[i]));
}

void moek_accumulate_f16(const moek_ctx *ctx, float *dst, const moek_f16 *src, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        dst[i] += kf16_widen(src[i]);
}

void moek_scale_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n, float s)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = kf16_round(kf16_widen(x[i]) * s);
}

void moek_scale_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, int64_t n, float s)
{
    moek_scale_fwd_f16(ctx, dy, dx, n, s);
}

/* GELU and SwiGLU: chunks widened onto the stack, the fp32 kernel run on
 * each chunk on one thread (the chunks are spread over the team). */
#define KF16_CHUNK 1024

static moek_ctx kf16_serial(const moek_ctx *ctx)
{
    moek_ctx one;
    if (ctx)
        one = *ctx;
    else
        memset(&one, 0, sizeof one);
    one.num_threads = 1;
    return one;
}

static void kf16_widen_chunk(const moek_f16 *x, float *y, int64_t m)
{
    for (int64_t i = 0; i < m; i++)
        y[i] = kf16_widen(x[i]);
}

static void kf16_round_chunk(const float *x, moek_f16 *y, int64_t m)
{
    for (int64_t i = 0; i < m; i++)
        y[i] = kf16_round(x[i]);
}

#define KF16_CHUNKS(n) ((((n) > 0 ? (n) : 0) + KF16_CHUNK - 1) / KF16_CHUNK)
#define KF16_CHUNK_LEN(n, c) ((n) - (c) * KF16_CHUNK < KF16_CHUNK ? (n) - (c) * KF16_CHUNK : KF16_CHUNK)

void moek_gelu_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n)
{
    moek_ctx one = kf16_serial(ctx);
    int64_t chunks = KF16_CHUNKS(n);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float a[KF16_CHUNK], r[KF16_CHUNK];
        int64_t o = c * KF16_CHUNK, m = KF16_CHUNK_LEN(n, c);
        kf16_widen_chunk(x + o, a, m);
        moek_gelu_fwd(&one, a, r, m);
        kf16_round_chunk(r, y + o, m);
    }
}

void moek_gelu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x, moek_f16 *dx,
                        int64_t n)
{
    moek_ctx one = kf16_serial(ctx);
    int64_t chunks = KF16_CHUNKS(n);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float d[KF16_CHUNK], a[KF16_CHUNK], r[KF16_CHUNK];
        int64_t o = c * KF16_CHUNK, m = KF16_CHUNK_LEN(n, c);
        kf16_widen_chunk(dy + o, d, m);
        kf16_widen_chunk(x + o, a, m);
        moek_gelu_bwd(&one, d, a, r, m);
        kf16_round_chunk(r, dx + o, m);
    }
}

void moek_swiglu_fwd_f16(const moek_ctx *ctx, const moek_f16 *gate, const moek_f16 *up,
                          moek_f16 *y, int64_t n)
{
    moek_ctx one = kf16_serial(ctx);
    int64_t chunks = KF16_CHUNKS(n);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float g[KF16_CHUNK], u[KF16_CHUNK], r[KF16_CHUNK];
        int64_t o = c * KF16_CHUNK, m = KF16_CHUNK_LEN(n, c);
        kf16_widen_chunk(gate + o, g, m);
        kf16_widen_chunk(up + o, u, m);
        moek_swiglu_fwd(&one, g, u, r, m);
        kf16_round_chunk(r, y + o, m);
    }
}

void moek_swiglu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *gate,
                          const moek_f16 *up, moek_f16 *dgate, moek_f16 *dup, int64_t n)
{
    moek_ctx one = kf16_serial(ctx);
    int64_t chunks = KF16_CHUNKS(n);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float d[KF16_CHUNK], g[KF16_CHUNK], u[KF16_CHUNK], rg[KF16_CHUNK], ru[KF16_CHUNK];
        int64_t o = c * KF16_CHUNK, m = KF16_CHUNK_LEN(n, c);
        kf16_widen_chunk(dy + o, d, m);
        kf16_widen_chunk(gate + o, g, m);
        kf16_widen_chunk(up + o, u, m);
        moek_swiglu_bwd(&one, d, g, u, rg, ru, m);
        kf16_round_chunk(rg, dgate + o, m);
        kf16_round_chunk(ru, dup + o, m);
    }
}

/* ---- embedding ------------------------------------------------------------ */
/* A gather moves values without arithmetic: rows are copied as halves (as the
 * fp32 kernel: an id outside [0, V) gives MOEK_E_INDEX and a zero row). */
void moek_embedding_fwd_f16(const moek_ctx *ctx, const int32_t *ids, const moek_f16 *table,
                             moek_f16 *out, int64_t N, int64_t V, int64_t D)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, N * D))
    for (int64_t t = 0; t < N; t++) {
        int64_t id = ids[t];
        if (id < 0 || id >= V) {
            kf16_fail(ctx, MOEK_E_INDEX);
            memset(out + t * D, 0, (size_t)D * sizeof *out);
            continue;
        }
        memcpy(out + t * D, table + id * D, (size_t)D * sizeof *out);
    }
}

void moek_embedding_bwd_f16(const moek_ctx *ctx, const moek_f16 *dout, const int32_t *ids,
                             moek_f16 *dtable, int64_t N, int64_t V, int64_t D)
{
    kf16_call c = {0};
    kf16_in(&c, dout, N * D);
    kf16_out(&c, dtable, V * D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_embedding_bwd(ctx, c.f[0], ids, c.f[1], N, V, D);
    kf16_round_all(ctx, &c);
}

/* ---- dense layers --------------------------------------------------------- */
void moek_matmul_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w, moek_f16 *y,
                          int64_t N, int64_t K, int64_t M)
{
    kf16_call c = {0};
    kf16_in(&c, x, N * K);
    kf16_in(&c, w, M * K);
    kf16_out(&c, y, N * M);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_matmul_fwd(ctx, c.f[0], c.f[1], c.f[2], N, K, M);
    kf16_round_all(ctx, &c);
}

void moek_matmul_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                          const moek_f16 *w, moek_f16 *dx, moek_f16 *dw, int64_t N, int64_t K,
                          int64_t M)
{
    kf16_call c = {0};
    kf16_in(&c, dy, N * M);
    kf16_in(&c, x, N * K);
    kf16_in(&c, w, M * K);
    kf16_out(&c, dx, N * K);
    kf16_out(&c, dw, M * K);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_matmul_bwd(ctx, c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], N, K, M);
    kf16_round_all(ctx, &c);
}

void moek_rmsnorm_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w, moek_f16 *y,
                           float *rstd, int64_t N, int64_t D, float eps)
{
    kf16_call c = {0};
    kf16_in(&c, x, N * D);
    kf16_in(&c, w, D);
    kf16_out(&c, y, N * D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_rmsnorm_fwd(ctx, c.f[0], c.f[1], c.f[2], rstd, N, D, eps);
    kf16_round_all(ctx, &c);
}

void moek_rmsnorm_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                           const moek_f16 *w, const float *rstd, moek_f16 *dx, moek_f16 *dw,
                           int64_t N, int64_t D)
{
    kf16_call c = {0};
    kf16_in(&c, dy, N * D);
    kf16_in(&c, x, N * D);
    kf16_in(&c, w, D);
    kf16_out(&c, dx, N * D);
    kf16_out(&c, dw, D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_rmsnorm_bwd(ctx, c.f[0], c.f[1], c.f[2], rstd, c.f[3], c.f[4], N, D);
    kf16_round_all(ctx, &c);
}

void moek_rope_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y,
                        int64_t B, int64_t T, int64_t H, int64_t Dh, float theta)
{
    kf16_call c = {0};
    kf16_in(&c, x, B * T * H * Dh);
    kf16_out(&c, y, B * T * H * Dh);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_rope_fwd(ctx, c.f[0], c.f[1], B, T, H, Dh, theta);
    kf16_round_all(ctx, &c);
}

void moek_rope_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx,
                        int64_t B, int64_t T, int64_t H, int64_t Dh, float theta)
{
    kf16_call c = {0};
    kf16_in(&c, dy, B * T * H * Dh);
    kf16_out(&c, dx, B * T * H * Dh);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_rope_bwd(ctx, c.f[0], c.f[1], B, T, H, Dh, theta);
    kf16_round_all(ctx, &c);
}

void moek_attention_fwd_f16(const moek_ctx *ctx, const moek_f16 *q, const moek_f16 *k,
                             const moek_f16 *v, moek_f16 *o, float *lse,
                             int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    int64_t n = B * T * H * Dh;
    kf16_call c = {0};
    kf16_in(&c, q, n);
    kf16_in(&c, k, n);
    kf16_in(&c, v, n);
    kf16_out(&c, o, n);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_attention_fwd(ctx, c.f[0], c.f[1], c.f[2], c.f[3], lse, B, T, H, Dh);
    kf16_round_all(ctx, &c);
}

void moek_attention_bwd_f16(const moek_ctx *ctx, const moek_f16 *dout, const moek_f16 *q,
                             const moek_f16 *k, const moek_f16 *v, const moek_f16 *o,
                             const float *lse, moek_f16 *dq, moek_f16 *dk, moek_f16 *dv,
                             int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    int64_t n = B * T * H * Dh;
    kf16_call c = {0};
    kf16_in(&c, dout, n);
    kf16_in(&c, q, n);
    kf16_in(&c, k, n);
    kf16_in(&c, v, n);
    kf16_in(&c, o, n);
    kf16_out(&c, dq, n);
    kf16_out(&c, dk, n);
    kf16_out(&c, dv, n);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_attention_bwd(ctx, c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], lse, c.f[5], c.f[6], c.f[7],
                       B, T, H, Dh);
    kf16_round_all(ctx, &c);
}

/* ---- losses and the router ---------------------------------------------- */
void moek_cross_entropy_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits,
                                 const int32_t *targets, float *loss, float *lse,
                                 int64_t N, int64_t V)
{
    kf16_call c = {0};
    kf16_in(&c, logits, N * V);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_cross_entropy_fwd(ctx, c.f[0], targets, loss, lse, N, V);
}

void moek_cross_entropy_bwd_f16(const moek_ctx *ctx, const float *dloss, const moek_f16 *logits,
                                 const int32_t *targets, const float *lse, moek_f16 *dlogits,
                                 int64_t N, int64_t V)
{
    kf16_call c = {0};
    kf16_in(&c, logits, N * V);
    kf16_out(&c, dlogits, N * V);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_cross_entropy_bwd(ctx, dloss, c.f[0], targets, lse, c.f[1], N, V);
    kf16_round_all(ctx, &c);
}

void moek_softmax_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits, float *probs,
                           int64_t N, int64_t E)
{
    kf16_call c = {0};
    kf16_in(&c, logits, N * E);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_softmax_fwd(ctx, c.f[0], probs, N, E);
}

void moek_softmax_bwd_f16(const moek_ctx *ctx, const float *dprobs, const float *probs,
                           moek_f16 *dlogits, int64_t N, int64_t E)
{
    kf16_call c = {0};
    kf16_out(&c, dlogits, N * E);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_softmax_bwd(ctx, dprobs, probs, c.f[0], N, E);
    kf16_round_all(ctx, &c);
}

void moek_zloss_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits, float *loss,
                         int64_t N, int64_t E)
{
    kf16_call c = {0};
    kf16_in(&c, logits, N * E);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_zloss_fwd(ctx, c.f[0], loss, N, E);
}

void moek_zloss_bwd_f16(const moek_ctx *ctx, const float *dloss, const moek_f16 *logits,
                         moek_f16 *dlogits, int64_t N, int64_t E)
{
    kf16_call c = {0};
    kf16_in(&c, logits, N * E);
    kf16_out(&c, dlogits, N * E);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_zloss_bwd(ctx, dloss, c.f[0], c.f[1], N, E);
    kf16_round_all(ctx, &c);
}

/* ---- dispatch / experts / combine ----------------------------------------- */
void moek_dispatch_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const int32_t *idx,
                            moek_f16 *xs, int32_t *slot_row, int32_t *expert_rows,
                            int64_t N, int64_t D, int64_t E, int64_t k, int64_t C)
{
    int64_t R = C > 0 ? E * C : (C == 0 ? N * k : 0); /* C < 0: the fp32 kernel rejects it */
    kf16_call c = {0};
    kf16_in(&c, x, N * D);
    kf16_out(&c, xs, R * D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_dispatch_fwd(ctx, c.f[0], idx, c.f[1], slot_row, expert_rows, N, D, E, k, C);
    kf16_round_all(ctx, &c);
}

void moek_dispatch_bwd_f16(const moek_ctx *ctx, const moek_f16 *dxs, const int32_t *slot_row,
                            moek_f16 *dx, int64_t N, int64_t D, int64_t k, int64_t R)
{
    kf16_call c = {0};
    kf16_in(&c, dxs, R * D);
    kf16_out(&c, dx, N * D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_dispatch_bwd(ctx, c.f[0], slot_row, c.f[1], N, D, k, R);
    kf16_round_all(ctx, &c);
}

void moek_grouped_matmul_fwd_f16(const moek_ctx *ctx, const moek_f16 *xs, const moek_f16 *w,
                                  const int32_t *expert_rows, moek_f16 *ys,
                                  int64_t R, int64_t K, int64_t M, int64_t E)
{
    kf16_call c = {0};
    kf16_in(&c, xs, R * K);
    kf16_in(&c, w, E * M * K);
    kf16_out(&c, ys, R * M);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_grouped_matmul_fwd(ctx, c.f[0], c.f[1], expert_rows, c.f[2], R, K, M, E);
    kf16_round_all(ctx, &c);
}

void moek_grouped_matmul_bwd_f16(const moek_ctx *ctx, const moek_f16 *dys, const moek_f16 *xs,
                                  const moek_f16 *w, const int32_t *expert_rows,
                                  moek_f16 *dxs, moek_f16 *dw, int64_t R, int64_t K, int64_t M,
                                  int64_t E)
{
    kf16_call c = {0};
    kf16_in(&c, dys, R * M);
    kf16_in(&c, xs, R * K);
    kf16_in(&c, w, E * M * K);
    kf16_out(&c, dxs, R * K);
    kf16_out(&c, dw, E * M * K);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_grouped_matmul_bwd(ctx, c.f[0], c.f[1], c.f[2], expert_rows, c.f[3], c.f[4], R, K, M, E);
    kf16_round_all(ctx, &c);
}

void moek_combine_fwd_f16(const moek_ctx *ctx, const moek_f16 *ys, const int32_t *slot_row,
                           const float *gates, moek_f16 *out, int64_t N, int64_t D, int64_t k,
                           int64_t R)
{
    kf16_call c = {0};
    kf16_in(&c, ys, R * D);
    kf16_out(&c, out, N * D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_combine_fwd(ctx, c.f[0], slot_row, gates, c.f[1], N, D, k, R);
    kf16_round_all(ctx, &c);
}

void moek_combine_bwd_f16(const moek_ctx *ctx, const moek_f16 *dout, const moek_f16 *ys,
                           const int32_t *slot_row, const float *gates, moek_f16 *dys,
                           float *dgates, int64_t N, int64_t D, int64_t k, int64_t R)
{
    kf16_call c = {0};
    kf16_in(&c, dout, N * D);
    kf16_in(&c, ys, R * D);
    kf16_out(&c, dys, R * D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_combine_bwd(ctx, c.f[0], c.f[1], slot_row, gates, c.f[2], dgates, N, D, k, R);
    kf16_round_all(ctx, &c);
}

/* ---- optimizer: the fp32 update on the master copy, then p = half(master) */
void moek_adamw_f16(const moek_ctx *ctx, moek_f16 *p, float *master, const float *g, float *m,
                     float *v, int64_t n, const float *hyper, const float *norm_sq,
                     float weight_decay)
{
    moek_adamw(ctx, master, g, m, v, n, hyper, norm_sq, weight_decay);
    moek_cast_f32_f16(ctx, master, p, n);
}

void moek_sgd_f16(const moek_ctx *ctx, moek_f16 *p, float *master, const float *g, float *buf,
                   int64_t n, const float *hyper, const float *norm_sq, float weight_decay)
{
    moek_sgd(ctx, master, g, buf, n, hyper, norm_sq, weight_decay);
    moek_cast_f32_f16(ctx, master, p, n);
}

/* ---- issue 2 layer ops ---------------------------------------------------- */
void moek_layernorm_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w,
                            const moek_f16 *b, moek_f16 *y, float *mean, float *rstd, int64_t N,
                            int64_t D, float eps)
{
    kf16_call c = {0};
    kf16_in(&c, x, N * D);
    kf16_in(&c, w, D);
    kf16_in(&c, b, D);
    kf16_out(&c, y, N * D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_layernorm_fwd(ctx, c.f[0], c.f[1], c.f[2], c.f[3], mean, rstd, N, D, eps);
    kf16_round_all(ctx, &c);
}

void moek_layernorm_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                            const moek_f16 *w, const float *mean, const float *rstd,
                            moek_f16 *dx, moek_f16 *dw, moek_f16 *db, int64_t N, int64_t D)
{
    kf16_call c = {0};
    kf16_in(&c, dy, N * D);
    kf16_in(&c, x, N * D);
    kf16_in(&c, w, D);
    kf16_out(&c, dx, N * D);   /* a NULL output stays NULL for the fp32 kernel */
    kf16_out(&c, dw, D);
    kf16_out(&c, db, D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_layernorm_bwd(ctx, c.f[0], c.f[1], c.f[2], mean, rstd, c.f[3], c.f[4], c.f[5], N, D);
    kf16_round_all(ctx, &c);
}

void moek_silu_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n)
{
    kf16_call c = {0};
    kf16_in(&c, x, n);
    kf16_out(&c, y, n);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_silu_fwd(ctx, c.f[0], c.f[1], n);
    kf16_round_all(ctx, &c);
}

void moek_silu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x, moek_f16 *dx,
                       int64_t n)
{
    kf16_call c = {0};
    kf16_in(&c, dy, n);
    kf16_in(&c, x, n);
    kf16_out(&c, dx, n);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_silu_bwd(ctx, c.f[0], c.f[1], c.f[2], n);
    kf16_round_all(ctx, &c);
}

void moek_repeat_kv_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t N,
                            int64_t Hkv, int64_t H, int64_t Dh)
{
    kf16_call c = {0};
    kf16_in(&c, x, N * Hkv * Dh);
    kf16_out(&c, y, N * H * Dh);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_repeat_kv_fwd(ctx, c.f[0], c.f[1], N, Hkv, H, Dh);
    kf16_round_all(ctx, &c);
}

void moek_repeat_kv_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, int64_t N,
                            int64_t Hkv, int64_t H, int64_t Dh)
{
    kf16_call c = {0};
    kf16_in(&c, dy, N * H * Dh);
    kf16_out(&c, dx, N * Hkv * Dh);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_repeat_kv_bwd(ctx, c.f[0], c.f[1], N, Hkv, H, Dh);
    kf16_round_all(ctx, &c);
}

void moek_bias_add_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *b, moek_f16 *y,
                           int64_t N, int64_t D)
{
    kf16_call c = {0};
    kf16_in(&c, x, N * D);
    kf16_in(&c, b, D);
    kf16_out(&c, y, N * D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_bias_add_fwd(ctx, c.f[0], c.f[1], c.f[2], N, D);
    kf16_round_all(ctx, &c);
}

void moek_bias_add_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, moek_f16 *db,
                           int64_t N, int64_t D)
{
    kf16_call c = {0};
    kf16_in(&c, dy, N * D);
    kf16_out(&c, dx, N * D);
    kf16_out(&c, db, D);
    if (!kf16_widen_all(ctx, &c))
        return;
    moek_bias_add_bwd(ctx, c.f[0], c.f[1], c.f[2], N, D);
    kf16_round_all(ctx, &c);
}
