/* matmul.c - dense matrix products through OpenBLAS, and the grouped
 * (per-expert) product over the row blocks that dispatch laid out. */
#include <limits.h>

#include "kcpu.h"

void kcpu_gemm(const moek_ctx *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
               const float *a, int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc)
{
    if (m <= 0 || n <= 0)
        return;
    if (k <= 0) { /* an empty sum: C = 0 */
        for (int64_t i = 0; i < m; i++)
            memset(c + i * ldc, 0, (size_t)n * sizeof *c);
        return;
    }
    if (m > INT_MAX || n > INT_MAX || k > INT_MAX || lda > INT_MAX || ldb > INT_MAX || ldc > INT_MAX) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                (int)m, (int)n, (int)k, 1.0f, a, (int)lda, b, (int)ldb, 0.0f, c, (int)ldc);
}

void moek_matmul_fwd(const moek_ctx *ctx, const float *x, const float *w, float *y,
                     int64_t N, int64_t K, int64_t M)
{
    kcpu_gemm(ctx, 0, 1, N, M, K, x, K, w, K, y, M);
}

/* dx = dy . w,  dw = dy^T . x.  Either output may be NULL when the
 * compiler needs no gradient for it (token embeddings' inputs, frozen w). */
void moek_matmul_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                     float *dx, float *dw, int64_t N, int64_t K, int64_t M)
{
    if (dx)
        kcpu_gemm(ctx, 0, 0, N, K, M, dy, M, w, K, dx, K);
    if (dw) {
        if (N <= 0) {
            if (M * K > 0)
                memset(dw, 0, (size_t)(M * K) * sizeof *dw);
        } else {
            kcpu_gemm(ctx, 1, 0, M, K, N, dy, M, x, K, dw, K);
        }
    }
}

/* expert_rows comes from dispatch but lives in memory the runtime hands
 * around: check each block before trusting it. */
static int kcpu_block(const moek_ctx *ctx, const int32_t *expert_rows, int64_t e, int64_t R,
                      int64_t *first, int64_t *count)
{
    *first = expert_rows[2 * e];
    *count = expert_rows[2 * e + 1];
    if (*first < 0 || *count < 0 || *first + *count > R) {
        kcpu_fail(ctx, MOEK_E_INDEX);
        *count = 0;
        return 0;
    }
    return *count > 0;
}

void moek_grouped_matmul_fwd(const moek_ctx *ctx, const float *xs, const float *w,
                             const int32_t *expert_rows, float *ys,
                             int64_t R, int64_t K, int64_t M, int64_t E)
{
    /* rows no expert owns (capacity slack) must read as zero */
    if (R * M > 0)
        memset(ys, 0, (size_t)(R * M) * sizeof *ys);
    for (int64_t e = 0; e < E; e++) {
        int64_t r0, n;
        if (kcpu_block(ctx, expert_rows, e, R, &r0, &n))
            kcpu_gemm(ctx, 0, 1, n, M, K, xs + r0 * K, K, w + e * M * K, K, ys + r0 * M, M);
    }
}

void moek_grouped_matmul_bwd(const moek_ctx *ctx, const float *dys, const float *xs, const float *w,
                             const int32_t *expert_rows, float *dxs, float *dw,
                             int64_t R, int64_t K, int64_t M, int64_t E)
{
    if (dxs && R * K > 0)
        memset(dxs, 0, (size_t)(R * K) * sizeof *dxs);
    for (int64_t e = 0; e < E; e++) {
        int64_t r0, n;
        int has = kcpu_block(ctx, expert_rows, e, R, &r0, &n);
        if (dw && !has && M * K > 0)
            memset(dw + e * M * K, 0, (size_t)(M * K) * sizeof *dw);
        if (!has)
            continue;
        if (dxs)
            kcpu_gemm(ctx, 0, 0, n, K, M, dys + r0 * M, M, w + e * M * K, K, dxs + r0 * K, K);
        if (dw)
            kcpu_gemm(ctx, 1, 0, M, K, n, dys + r0 * M, M, xs + r0 * K, K, dw + e * M * K, K);
    }
}
