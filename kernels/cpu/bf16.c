/* bf16.c - the bf16-storage variants of the CPU kernels (precision = bf16).
 *
 * moek.h defines each variant as: widen the bf16 inputs to fp32 exactly, run
 * the fp32 kernel of the same name, round each bf16 output once (RNE).  This
 * file does literally that - it carves fp32 copies out of ctx->workspace and
 * calls the public fp32 kernel - so the CPU results are the reference the
 * CUDA variants are compared with, and stay in step with the fp32 kernels
 * whatever is done to them.  Outputs are widened too before the call, so
 * whatever an fp32 kernel leaves unwritten (an early return on a bad shape)
 * comes back unchanged.
 *
 * Elementwise ops need no workspace: add/scale/accumulate are a single
 * fp32 operation per element, done inline; GELU and SwiGLU widen chunks
 * onto the stack and call the fp32 kernel on each chunk (the same maths
 * element by element).  embedding_fwd is a row gather, copied as bf16.
 * Every other variant needs MOEK_BF16_WORKSPACE_BYTES(sum of the element
 * counts of its non-NULL bf16 arguments) and otherwise sets MOEK_E_SHAPE
 * and writes nothing. */
#include "bf16.h"

/* Records an error; the first one wins, also across threads. */
static void kbf16_fail(const moek_ctx *ctx, int code)
{
    if (ctx && ctx->status) {
        int zero = 0;
        __atomic_compare_exchange_n(ctx->status, &zero, code, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED);
    }
}

void moek_cast_f32_bf16(const moek_ctx *ctx, const float *x, moek_bf16 *y, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = kbf16_round(x[i]);
}

void moek_cast_bf16_f32(const moek_ctx *ctx, const moek_bf16 *x, float *y, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = kbf16_widen(x[i]);
}

/* ---- one call's bf16 tensors and their fp32 copies ----------------------- */
#define KBF16_MAX_ARGS 8   /* attention_bwd has the most: 8 */

typedef struct {
    int n;
    const moek_bf16 *src[KBF16_MAX_ARGS]; /* NULL: an optional output not wanted */
    moek_bf16 *out[KBF16_MAX_ARGS];       /* set for outputs: rounded back after */
    int64_t len[KBF16_MAX_ARGS];
    float *f[KBF16_MAX_ARGS];             /* the fp32 copy the kernel sees */
    float empty[1];                       /* what an empty tensor points at */
} kbf16_call;

static void kbf16_in(kbf16_call *c, const moek_bf16 *p, int64_t len)
{
    c->src[c->n] = p;
    c->out[c->n] = NULL;
    c->len[c->n] = len > 0 ? len : 0;
    c->n++;
}

static void kbf16_out(kbf16_call *c, moek_bf16 *p, int64_t len)
{
    kbf16_in(c, p, len);
    c->out[c->n - 1] = p;
}

/* Checks the workspace, carves a 64-byte aligned fp32 piece per tensor and
 * widens into it.  0 (MOEK_E_SHAPE, nothing written) when it is too small.
 * At most 8 pieces: their alignment padding fits the macro's 64 * 16 slack. */
static int kbf16_widen_all(const moek_ctx *ctx, kbf16_call *c)
{
    int64_t total = 0;
    for (int i = 0; i < c->n; i++)
        if (c->src[i])
            total += c->len[i];
    if (total > 0 && (!ctx || !ctx->workspace ||
                      ctx->workspace_bytes < MOEK_BF16_WORKSPACE_BYTES(total))) {
        kbf16_fail(ctx, MOEK_E_SHAPE);
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
            moek_cast_bf16_f32(ctx, c->src[i], c->f[i], c->len[i]);
        }
    }
    return 1;
}

static void kbf16_round_all(const moek_ctx *ctx, const kbf16_call *c)
{
    for (int i = 0; i < c->n; i++)
        if (c->out[i] && c->len[i] > 0)
            moek_cast_f32_bf16(ctx, c->f[i], c->out[i], c->len[i]);
}

/* ---- elementwise: no workspace ------------------------------------------- */
void moek_fill_bf16(const moek_ctx *ctx, moek_bf16 *x, int64_t n, float value)
{
    moek_bf16 h = kbf16_round(value);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        x[i] = h;
}

/* a bit copy: widening then rounding is the identity on every non-NaN */
void moek_copy_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n)
{
    (void)ctx;
    if (n > 0 && x != y)
        memmove(y, x, (size_t)n * sizeof *y);
}

void moek_add_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *a, const moek_bf16 *b, moek_bf16 *y,
                       int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = kbf16_round(kbf16_widen(a[i]) + kbf16_widen(b[i]));
}

void moek_accumulate_bf16(const moek_ctx *ctx, float *dst, const moek_bf16 *src, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        dst[i] += kbf16_widen(src[i]);
}

void moek_scale_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n, float s)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = kbf16_round(kbf16_widen(x[i]) * s);
}

void moek_scale_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, int64_t n, float s)
{
    moek_scale_fwd_bf16(ctx, dy, dx, n, s);
}

/* GELU and SwiGLU: chunks widened onto the stack, the fp32 kernel run on
 * each chunk on one thread (the chunks are spread over the team). */
#define KBF16_CHUNK 1024

static moek_ctx kbf16_serial(const moek_ctx *ctx)
{
    moek_ctx one;
    if (ctx)
        one = *ctx;
    else
        memset(&one, 0, sizeof one);
    one.num_threads = 1;
    return one;
}

static void kbf16_widen_chunk(const moek_bf16 *x, float *y, int64_t m)
{
    for (int64_t i = 0; i < m; i++)
        y[i] = kbf16_widen(x[i]);
}

static void kbf16_round_chunk(const float *x, moek_bf16 *y, int64_t m)
{
    for (int64_t i = 0; i < m; i++)
        y[i] = kbf16_round(x[i]);
}

#define KBF16_CHUNKS(n) ((((n) > 0 ? (n) : 0) + KBF16_CHUNK - 1) / KBF16_CHUNK)
#define KBF16_CHUNK_LEN(n, c) ((n) - (c) * KBF16_CHUNK < KBF16_CHUNK ? (n) - (c) * KBF16_CHUNK : KBF16_CHUNK)

void moek_gelu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n)
{
    moek_ctx one = kbf16_serial(ctx);
    int64_t chunks = KBF16_CHUNKS(n);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float a[KBF16_CHUNK], r[KBF16_CHUNK];
        int64_t o = c * KBF16_CHUNK, m = KBF16_CHUNK_LEN(n, c);
        kbf16_widen_chunk(x + o, a, m);
        moek_gelu_fwd(&one, a, r, m);
        kbf16_round_chunk(r, y + o, m);
    }
}

void moek_gelu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x, moek_bf16 *dx,
                        int64_t n)
{
    moek_ctx one = kbf16_serial(ctx);
    int64_t chunks = KBF16_CHUNKS(n);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float d[KBF16_CHUNK], a[KBF16_CHUNK], r[KBF16_CHUNK];
        int64_t o = c * KBF16_CHUNK, m = KBF16_CHUNK_LEN(n, c);
        kbf16_widen_chunk(dy + o, d, m);
        kbf16_widen_chunk(x + o, a, m);
        moek_gelu_bwd(&one, d, a, r, m);
        kbf16_round_chunk(r, dx + o, m);
    }
}

void moek_swiglu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *gate, const moek_bf16 *up,
                          moek_bf16 *y, int64_t n)
{
    moek_ctx one = kbf16_serial(ctx);
    int64_t chunks = KBF16_CHUNKS(n);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float g[KBF16_CHUNK], u[KBF16_CHUNK], r[KBF16_CHUNK];
        int64_t o = c * KBF16_CHUNK, m = KBF16_CHUNK_LEN(n, c);
        kbf16_widen_chunk(gate + o, g, m);
        kbf16_widen_chunk(up + o, u, m);
        moek_swiglu_fwd(&one, g, u, r, m);
        kbf16_round_chunk(r, y + o, m);
    }
}

void moek_swiglu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *gate,
                          const moek_bf16 *up, moek_bf16 *dgate, moek_bf16 *dup, int64_t n)
{
    moek_ctx one = kbf16_serial(ctx);
    int64_t chunks = KBF16_CHUNKS(n);
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, 8 * n))
    for (int64_t c = 0; c < chunks; c++) {
        float d[KBF16_CHUNK], g[KBF16_CHUNK], u[KBF16_CHUNK], rg[KBF16_CHUNK], ru[KBF16_CHUNK];
        int64_t o = c * KBF16_CHUNK, m = KBF16_CHUNK_LEN(n, c);
        kbf16_widen_chunk(dy + o, d, m);
        kbf16_widen_chunk(gate + o, g, m);
        kbf16_widen_chunk(up + o, u, m);
        moek_swiglu_bwd(&one, d, g, u, rg, ru, m);
        kbf16_round_chunk(rg, dgate + o, m);
        kbf16_round_chunk(ru, dup + o, m);
    }
}

/* ---- embedding ------------------------------------------------------------ */
/* A gather moves values without arithmetic: rows are copied as bf16 (as the
 * fp32 kernel: an id outside [0, V) gives MOEK_E_INDEX and a zero row). */
void moek_embedding_fwd_bf16(const moek_ctx *ctx, const int32_t *ids, const moek_bf16 *table,
                             moek_bf16 *out, int64_t N, int64_t V, int64_t D)
{
#pragma omp parallel for schedule(static) num_threads(kbf16_team(ctx, N * D))
    for (int64_t t = 0; t < N; t++) {
        int64_t id = ids[t];
        if (id < 0 || id >= V) {
            kbf16_fail(ctx, MOEK_E_INDEX);
            memset(out + t * D, 0, (size_t)D * sizeof *out);
            continue;
        }
        memcpy(out + t * D, table + id * D, (size_t)D * sizeof *out);
    }
}

void moek_embedding_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const int32_t *ids,
                             moek_bf16 *dtable, int64_t N, int64_t V, int64_t D)
{
    kbf16_call c = {0};
    kbf16_in(&c, dout, N * D);
    kbf16_out(&c, dtable, V * D);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_embedding_bwd(ctx, c.f[0], ids, c.f[1], N, V, D);
    kbf16_round_all(ctx, &c);
}

/* ---- dense layers --------------------------------------------------------- */
void moek_matmul_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w, moek_bf16 *y,
                          int64_t N, int64_t K, int64_t M)
{
    kbf16_call c = {0};
    kbf16_in(&c, x, N * K);
    kbf16_in(&c, w, M * K);
    kbf16_out(&c, y, N * M);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_matmul_fwd(ctx, c.f[0], c.f[1], c.f[2], N, K, M);
    kbf16_round_all(ctx, &c);
}

void moek_matmul_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                          const moek_bf16 *w, moek_bf16 *dx, moek_bf16 *dw, int64_t N, int64_t K,
                          int64_t M)
{
    kbf16_call c = {0};
    kbf16_in(&c, dy, N * M);
    kbf16_in(&c, x, N * K);
    kbf16_in(&c, w, M * K);
    kbf16_out(&c, dx, N * K);
    kbf16_out(&c, dw, M * K);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_matmul_bwd(ctx, c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], N, K, M);
    kbf16_round_all(ctx, &c);
}

void moek_rmsnorm_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w, moek_bf16 *y,
                           float *rstd, int64_t N, int64_t D, float eps)
{
    kbf16_call c = {0};
    kbf16_in(&c, x, N * D);
    kbf16_in(&c, w, D);
    kbf16_out(&c, y, N * D);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_rmsnorm_fwd(ctx, c.f[0], c.f[1], c.f[2], rstd, N, D, eps);
    kbf16_round_all(ctx, &c);
}

void moek_rmsnorm_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                           const moek_bf16 *w, const float *rstd, moek_bf16 *dx, moek_bf16 *dw,
                           int64_t N, int64_t D)
{
    kbf16_call c = {0};
    kbf16_in(&c, dy, N * D);
    kbf16_in(&c, x, N * D);
    kbf16_in(&c, w, D);
    kbf16_out(&c, dx, N * D);
    kbf16_out(&c, dw, D);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_rmsnorm_bwd(ctx, c.f[0], c.f[1], c.f[2], rstd, c.f[3], c.f[4], N, D);
    kbf16_round_all(ctx, &c);
}

void moek_rope_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y,
                        int64_t B, int64_t T, int64_t H, int64_t Dh, float theta)
{
    kbf16_call c = {0};
    kbf16_in(&c, x, B * T * H * Dh);
    kbf16_out(&c, y, B * T * H * Dh);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_rope_fwd(ctx, c.f[0], c.f[1], B, T, H, Dh, theta);
    kbf16_round_all(ctx, &c);
}

void moek_rope_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx,
                        int64_t B, int64_t T, int64_t H, int64_t Dh, float theta)
{
    kbf16_call c = {0};
    kbf16_in(&c, dy, B * T * H * Dh);
    kbf16_out(&c, dx, B * T * H * Dh);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_rope_bwd(ctx, c.f[0], c.f[1], B, T, H, Dh, theta);
    kbf16_round_all(ctx, &c);
}

void moek_attention_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *q, const moek_bf16 *k,
                             const moek_bf16 *v, moek_bf16 *o, float *lse,
                             int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    int64_t n = B * T * H * Dh;
    kbf16_call c = {0};
    kbf16_in(&c, q, n);
    kbf16_in(&c, k, n);
    kbf16_in(&c, v, n);
    kbf16_out(&c, o, n);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_attention_fwd(ctx, c.f[0], c.f[1], c.f[2], c.f[3], lse, B, T, H, Dh);
    kbf16_round_all(ctx, &c);
}

void moek_attention_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const moek_bf16 *q,
                             const moek_bf16 *k, const moek_bf16 *v, const moek_bf16 *o,
                             const float *lse, moek_bf16 *dq, moek_bf16 *dk, moek_bf16 *dv,
                             int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    int64_t n = B * T * H * Dh;
    kbf16_call c = {0};
    kbf16_in(&c, dout, n);
    kbf16_in(&c, q, n);
    kbf16_in(&c, k, n);
    kbf16_in(&c, v, n);
    kbf16_in(&c, o, n);
    kbf16_out(&c, dq, n);
    kbf16_out(&c, dk, n);
    kbf16_out(&c, dv, n);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_attention_bwd(ctx, c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], lse, c.f[5], c.f[6], c.f[7],
                       B, T, H, Dh);
    kbf16_round_all(ctx, &c);
}

/* ---- losses and the router ---------------------------------------------- */
void moek_cross_entropy_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits,
                                 const int32_t *targets, float *loss, float *lse,
                                 int64_t N, int64_t V)
{
    kbf16_call c = {0};
    kbf16_in(&c, logits, N * V);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_cross_entropy_fwd(ctx, c.f[0], targets, loss, lse, N, V);
}

void moek_cross_entropy_bwd_bf16(const moek_ctx *ctx, const float *dloss, const moek_bf16 *logits,
                                 const int32_t *targets, const float *lse, moek_bf16 *dlogits,
                                 int64_t N, int64_t V)
{
    kbf16_call c = {0};
    kbf16_in(&c, logits, N * V);
    kbf16_out(&c, dlogits, N * V);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_cross_entropy_bwd(ctx, dloss, c.f[0], targets, lse, c.f[1], N, V);
    kbf16_round_all(ctx, &c);
}

void moek_softmax_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits, float *probs,
                           int64_t N, int64_t E)
{
    kbf16_call c = {0};
    kbf16_in(&c, logits, N * E);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_softmax_fwd(ctx, c.f[0], probs, N, E);
}

void moek_softmax_bwd_bf16(const moek_ctx *ctx, const float *dprobs, const float *probs,
                           moek_bf16 *dlogits, int64_t N, int64_t E)
{
    kbf16_call c = {0};
    kbf16_out(&c, dlogits, N * E);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_softmax_bwd(ctx, dprobs, probs, c.f[0], N, E);
    kbf16_round_all(ctx, &c);
}

void moek_zloss_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits, float *loss,
                         int64_t N, int64_t E)
{
    kbf16_call c = {0};
    kbf16_in(&c, logits, N * E);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_zloss_fwd(ctx, c.f[0], loss, N, E);
}

void moek_zloss_bwd_bf16(const moek_ctx *ctx, const float *dloss, const moek_bf16 *logits,
                         moek_bf16 *dlogits, int64_t N, int64_t E)
{
    kbf16_call c = {0};
    kbf16_in(&c, logits, N * E);
    kbf16_out(&c, dlogits, N * E);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_zloss_bwd(ctx, dloss, c.f[0], c.f[1], N, E);
    kbf16_round_all(ctx, &c);
}

/* ---- dispatch / experts / combine ----------------------------------------- */
void moek_dispatch_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const int32_t *idx,
                            moek_bf16 *xs, int32_t *slot_row, int32_t *expert_rows,
                            int64_t N, int64_t D, int64_t E, int64_t k, int64_t C)
{
    int64_t R = C > 0 ? E * C : (C == 0 ? N * k : 0); /* C < 0: the fp32 kernel rejects it */
    kbf16_call c = {0};
    kbf16_in(&c, x, N * D);
    kbf16_out(&c, xs, R * D);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_dispatch_fwd(ctx, c.f[0], idx, c.f[1], slot_row, expert_rows, N, D, E, k, C);
    kbf16_round_all(ctx, &c);
}

void moek_dispatch_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dxs, const int32_t *slot_row,
                            moek_bf16 *dx, int64_t N, int64_t D, int64_t k, int64_t R)
{
    kbf16_call c = {0};
    kbf16_in(&c, dxs, R * D);
    kbf16_out(&c, dx, N * D);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_dispatch_bwd(ctx, c.f[0], slot_row, c.f[1], N, D, k, R);
    kbf16_round_all(ctx, &c);
}

void moek_grouped_matmul_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *xs, const moek_bf16 *w,
                                  const int32_t *expert_rows, moek_bf16 *ys,
                                  int64_t R, int64_t K, int64_t M, int64_t E)
{
    kbf16_call c = {0};
    kbf16_in(&c, xs, R * K);
    kbf16_in(&c, w, E * M * K);
    kbf16_out(&c, ys, R * M);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_grouped_matmul_fwd(ctx, c.f[0], c.f[1], expert_rows, c.f[2], R, K, M, E);
    kbf16_round_all(ctx, &c);
}

void moek_grouped_matmul_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dys, const moek_bf16 *xs,
                                  const moek_bf16 *w, const int32_t *expert_rows,
                                  moek_bf16 *dxs, moek_bf16 *dw, int64_t R, int64_t K, int64_t M,
                                  int64_t E)
{
    kbf16_call c = {0};
    kbf16_in(&c, dys, R * M);
    kbf16_in(&c, xs, R * K);
    kbf16_in(&c, w, E * M * K);
    kbf16_out(&c, dxs, R * K);
    kbf16_out(&c, dw, E * M * K);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_grouped_matmul_bwd(ctx, c.f[0], c.f[1], c.f[2], expert_rows, c.f[3], c.f[4], R, K, M, E);
    kbf16_round_all(ctx, &c);
}

void moek_combine_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *ys, const int32_t *slot_row,
                           const float *gates, moek_bf16 *out, int64_t N, int64_t D, int64_t k,
                           int64_t R)
{
    kbf16_call c = {0};
    kbf16_in(&c, ys, R * D);
    kbf16_out(&c, out, N * D);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_combine_fwd(ctx, c.f[0], slot_row, gates, c.f[1], N, D, k, R);
    kbf16_round_all(ctx, &c);
}

void moek_combine_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const moek_bf16 *ys,
                           const int32_t *slot_row, const float *gates, moek_bf16 *dys,
                           float *dgates, int64_t N, int64_t D, int64_t k, int64_t R)
{
    kbf16_call c = {0};
    kbf16_in(&c, dout, N * D);
    kbf16_in(&c, ys, R * D);
    kbf16_out(&c, dys, R * D);
    if (!kbf16_widen_all(ctx, &c))
        return;
    moek_combine_bwd(ctx, c.f[0], c.f[1], slot_row, gates, c.f[2], dgates, N, D, k, R);
    kbf16_round_all(ctx, &c);
}

/* ---- optimizer: the fp32 update on the master copy, then p = bf16(master) */
void moek_adamw_bf16(const moek_ctx *ctx, moek_bf16 *p, float *master, const float *g, float *m,
                     float *v, int64_t n, const float *hyper, const float *norm_sq,
                     float weight_decay)
{
    moek_adamw(ctx, master, g, m, v, n, hyper, norm_sq, weight_decay);
    moek_cast_f32_bf16(ctx, master, p, n);
}

void moek_sgd_bf16(const moek_ctx *ctx, moek_bf16 *p, float *master, const float *g, float *buf,
                   int64_t n, const float *hyper, const float *norm_sq, float weight_decay)
{
    moek_sgd(ctx, master, g, buf, n, hyper, norm_sq, weight_decay);
    moek_cast_f32_bf16(ctx, master, p, n);
}
