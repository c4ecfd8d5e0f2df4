/* elementwise.c - fill, copy, add, scale, GELU (tanh), SwiGLU, embedding. */
#include <math.h>

#include "kcpu.h"

void moek_fill(const moek_ctx *ctx, float *x, int64_t n, float value)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        x[i] = value;
}

void moek_copy(const moek_ctx *ctx, const float *x, float *y, int64_t n)
{
    (void)ctx;
    if (n > 0 && x != y)
        memmove(y, x, (size_t)n * sizeof *y);
}

void moek_add_fwd(const moek_ctx *ctx, const float *a, const float *b, float *y, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
}

void moek_accumulate(const moek_ctx *ctx, float *dst, const float *src, int64_t n)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        dst[i] += src[i];
}

void moek_scale_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n, float s)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        y[i] = x[i] * s;
}

void moek_scale_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t n, float s)
{
    moek_scale_fwd(ctx, dy, dx, n, s);
}

/* gelu(x) = x/2 (1 + tanh(c (x + a x^3))), c = sqrt(2/pi), a = 0.044715:
 * the approximation GPT-2 and PyTorch's gelu(approximate="tanh") use. */
#define KCPU_GELU_C 0.7978845608028654f
#define KCPU_GELU_A 0.044715f

/* 1/2 (1 + tanh u) = sigmoid(2u), so gelu(x) = x sigmoid(2u) with
 * u = c (x + a x^3): one kcpu_expf (the loop vectorises; tanhf does not) and
 * no cancellation in 1 + tanh for large negative x.  For the backward,
 * 1 - tanh^2 = 4 s (1 - s), s = sigmoid(2u). */
void moek_gelu_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n)
{
#pragma omp parallel for simd schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float u = KCPU_GELU_C * (v + KCPU_GELU_A * v * v * v);
        y[i] = v / (1.0f + kcpu_expf(-2.0f * u));
    }
}

void moek_gelu_bwd(const moek_ctx *ctx, const float *dy, const float *x, float *dx, int64_t n)
{
#pragma omp parallel for simd schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float u = KCPU_GELU_C * (v + KCPU_GELU_A * v * v * v);
        float s = 1.0f / (1.0f + kcpu_expf(-2.0f * u));
        float du = KCPU_GELU_C * (1.0f + 3.0f * KCPU_GELU_A * v * v);
        dx[i] = dy[i] * (s + 2.0f * v * s * (1.0f - s) * du);
    }
}

/* y = silu(gate) * up, silu(g) = g * sigmoid(g); kcpu_expf lets the loop vectorise */
void moek_swiglu_fwd(const moek_ctx *ctx, const float *gate, const float *up, float *y, int64_t n)
{
#pragma omp parallel for simd schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        float s = 1.0f / (1.0f + kcpu_expf(-g));
        y[i] = g * s * up[i];
    }
}

void moek_swiglu_bwd(const moek_ctx *ctx, const float *dy, const float *gate, const float *up,
                     float *dgate, float *dup, int64_t n)
{
#pragma omp parallel for simd schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        float s = 1.0f / (1.0f + kcpu_expf(-g));
        /* d silu / dg = s (1 + g (1 - s)) */
        dgate[i] = dy[i] * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] = dy[i] * g * s;
    }
}

void moek_embedding_fwd(const moek_ctx *ctx, const int32_t *ids, const float *table, float *out,
                        int64_t N, int64_t V, int64_t D)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * D))
    for (int64_t t = 0; t < N; t++) {
        int64_t id = ids[t];
        if (id < 0 || id >= V) {
            kcpu_fail(ctx, MOEK_E_INDEX);
            memset(out + t * D, 0, (size_t)D * sizeof *out);
            continue;
        }
        memcpy(out + t * D, table + id * D, (size_t)D * sizeof *out);
    }
}

/* dtable[v] = sum of dout rows whose id is v.  Threads split the columns, so
 * each one scatters over all tokens without races and the sum order (token
 * order) does not depend on the thread count. */
void moek_embedding_bwd(const moek_ctx *ctx, const float *dout, const int32_t *ids, float *dtable,
                        int64_t N, int64_t V, int64_t D)
{
    if (V * D > 0)
        memset(dtable, 0, (size_t)(V * D) * sizeof *dtable);
    for (int64_t t = 0; t < N; t++)
        if (ids[t] < 0 || ids[t] >= V)
            kcpu_fail(ctx, MOEK_E_INDEX);
    int64_t chunk = 64;
    int64_t nchunks = (D + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * D))
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t d0 = c * chunk, d1 = d0 + chunk < D ? d0 + chunk : D;
        for (int64_t t = 0; t < N; t++) {
            int64_t id = ids[t];
            if (id < 0 || id >= V)
                continue;
            float *dst = dtable + id * D;
            const float *src = dout + t * D;
            for (int64_t d = d0; d < d1; d++)
                dst[d] += src[d];
        }
    }
}
