/* matmul.cu - dense products through cuBLAS, and the grouped expert
 * product as a kernel of our own that reads expert_rows on the device (no
 * host sync, so it can be captured in a CUDA graph with dropless routing
 * whose block sizes change every step).
 *
 * Row-major to cuBLAS's column-major: a row-major [r, c] matrix is a
 * column-major [c, r] one, so row-major C = A . B is column-major
 * C^T = B^T . A^T and every call below swaps its operands. */
#include <limits.h>

#include "kcuda.cuh"

/* fp32 storage with fp32 compute; CUBLAS_COMPUTE_32F with the default math
 * mode never rounds inputs to TF32.  bf16 storage: bf16 A, B and C with the
 * same fp32 compute type, which runs on the tensor cores and rounds C once. */
template <typename T> struct kc_blas_type;
template <> struct kc_blas_type<float> {
    static constexpr cudaDataType_t value = CUDA_R_32F;
};
template <> struct kc_blas_type<kc_bf16> {
    static constexpr cudaDataType_t value = CUDA_R_16BF;
};

/* column-major C[m,n] = op(A) . op(B) */
template <typename T>
static bool kc_gemm(const moek_ctx *ctx, cublasOperation_t ta, cublasOperation_t tb, int64_t m,
                    int64_t n, int64_t k, const T *a, int64_t lda, const T *b, int64_t ldb, T *c,
                    int64_t ldc)
{
    kcuda_handles *h = kc_handles(ctx);
    if (!h) {
        kc_fail(ctx, MOEK_E_DEVICE);
        return false;
    }
    if (!kc_shape(ctx, m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX &&
                           ldb <= INT_MAX && ldc <= INT_MAX))
        return false;
    if (!kc_blas_ok(ctx, cublasSetStream(h->blas, kc_stream(ctx))))
        return false;
    const float one = 1.0f, zero = 0.0f;
    cudaDataType_t dt = kc_blas_type<T>::value;
    return kc_blas_ok(ctx, cublasGemmEx(h->blas, ta, tb, (int)m, (int)n, (int)k, &one, a, dt,
                                        (int)lda, b, dt, (int)ldb, &zero, c, dt, (int)ldc,
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

template <typename T>
static void kc_matmul_fwd(const moek_ctx *ctx, const T *x, const T *w, T *y, int64_t N, int64_t K,
                          int64_t M)
{
    if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0) || N == 0 || M == 0)
        return;
    if (K == 0) {   /* an empty sum; cuBLAS rejects a leading dimension of 0 */
        kc_zero(ctx, y, N * M * (int64_t)sizeof(T));
        return;
    }
    /* y^T[M,N] = w[M,K] . x^T[K,N] */
    kc_gemm<T>(ctx, CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, w, K, x, K, y, M);
}

template <typename T>
static void kc_matmul_bwd(const moek_ctx *ctx, const T *dy, const T *x, const T *w, T *dx, T *dw,
                          int64_t N, int64_t K, int64_t M)
{
    if (!kc_shape(ctx, N >= 0 && K >= 0 && M >= 0))
        return;
    if (K == 0)
        return;   /* dx and dw are empty */
    /* dx[N,K] = dy[N,M] . w[M,K]:  dx^T = w^T . dy^T */
    if (dx && N > 0) {
        if (M == 0)
            kc_zero(ctx, dx, N * K * (int64_t)sizeof(T));
        else
            kc_gemm<T>(ctx, CUBLAS_OP_N, CUBLAS_OP_N, K, N, M, w, K, dy, M, dx, K);
    }
    /* dw[M,K] = dy^T[M,N] . x[N,K]:  dw^T = x^T . dy */
    if (dw && M > 0) {
        if (N == 0)
            kc_zero(ctx, dw, M * K * (int64_t)sizeof(T));
        else
            kc_gemm<T>(ctx, CUBLAS_OP_N, CUBLAS_OP_T, K, M, N, x, K, dy, M, dw, K);
    }
}

/* ---- grouped product over expert blocks ---------------------------------
 * One shared-memory tiled SGEMM body: C[i,j] = sum_kk A(i,kk) B(kk,j) with
 * arbitrary element strides for A and B, so the forward and both backward
 * products are the same code.  64x64 tile, 256 threads, 4x4 per thread,
 * fp32 FMA accumulation. */
#define GM_BM 64
#define GM_BN 64
#define GM_BK 16

struct gm_operand {
    int64_t rs, cs;   /* element (r, c) at p[r*rs + c*cs] */
};

template <typename T>
__device__ void gm_tile(const T *A, gm_operand sa, const T *B, gm_operand sb, T *C, int64_t ldc,
                        int64_t rows, int64_t cols, int64_t depth, int64_t i0, int64_t j0)
{
    __shared__ float As[GM_BK][GM_BM + 1];
    __shared__ float Bs[GM_BK][GM_BN + 1];
    int tid = threadIdx.x;
    int ty = tid / 16, tx = tid % 16;
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
            acc[a][b] = 0.0f;
    for (int64_t k0 = 0; k0 < depth; k0 += GM_BK) {
        /* 1024 elements of each tile, 4 per thread */
#pragma unroll
        for (int l = 0; l < 4; l++) {
            int e = tid + l * 256;
            int kk = e % GM_BK, r = e / GM_BK;
            int64_t gi = i0 + r, gk = k0 + kk;
            As[kk][r] = (gi < rows && gk < depth) ? kc_ld(A + gi * sa.rs + gk * sa.cs) : 0.0f;
            int64_t gj = j0 + r;
            Bs[kk][r] = (gj < cols && gk < depth) ? kc_ld(B + gk * sb.rs + gj * sb.cs) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GM_BK; kk++) {
            float av[4], bv[4];
#pragma unroll
            for (int a = 0; a < 4; a++)
                av[a] = As[kk][ty + 16 * a];
#pragma unroll
            for (int b = 0; b < 4; b++)
                bv[b] = Bs[kk][tx + 16 * b];
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 4; b++)
                    acc[a][b] = fmaf(av[a], bv[b], acc[a][b]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int64_t gi = i0 + ty + 16 * a;
        if (gi >= rows)
            continue;
#pragma unroll
        for (int b = 0; b < 4; b++) {
            int64_t gj = j0 + tx + 16 * b;
            if (gj < cols)
                kc_st(C + gi * ldc + gj, acc[a][b]);
        }
    }
}

/* Reads and checks expert e's block; false (and MOEK_E_INDEX) if it does
 * not lie inside [0, R). */
__device__ inline bool gm_block(const int32_t *expert_rows, int64_t e, int64_t R, int *st,
                                int64_t *r0, int64_t *cnt)
{
    *r0 = expert_rows[2 * e];
    *cnt = expert_rows[2 * e + 1];
    if (*r0 < 0 || *cnt < 0 || *r0 + *cnt > R) {
        kc_dev_fail(st, MOEK_E_INDEX);
        return false;
    }
    return true;
}

/* Row-tile products (forward, dxs): blockIdx.y enumerates the row tiles of
 * all experts in order; there are at most ceil(R/BM) + E of them.  A block
 * finds its expert by walking expert_rows (E is small). */
template <typename T>
__global__ void k_grouped_rows(const T *X, int64_t ldx, const T *W, gm_operand sw, int64_t wstride,
                               const int32_t *expert_rows, T *Y, int64_t ldy, int64_t R,
                               int64_t cols, int64_t depth, int64_t E, int *st)
{
    int64_t t = blockIdx.y;
    for (int64_t e = 0; e < E; e++) {
        int64_t r0, cnt;
        if (!gm_block(expert_rows, e, R, st, &r0, &cnt))
            return;
        int64_t tiles = (cnt + GM_BM - 1) / GM_BM;
        if (t < tiles) {
            gm_operand sx = {ldx, 1};
            gm_tile(X + r0 * ldx, sx, W + e * wstride, sw, Y + r0 * ldy, ldy, cnt, cols, depth,
                    t * GM_BM, (int64_t)blockIdx.x * GM_BN);
            return;
        }
        t -= tiles;
    }
}

/* dw[e][m][k] = sum over e's rows r of dys[r][m] xs[r][k]; blockIdx.z = e */
template <typename T>
__global__ void k_grouped_dw(const T *dys, const T *xs, const int32_t *expert_rows, T *dw,
                             int64_t R, int64_t K, int64_t M, int *st)
{
    int64_t e = blockIdx.z, r0, cnt;
    if (!gm_block(expert_rows, e, R, st, &r0, &cnt))
        r0 = cnt = 0;   /* still overwrite dw[e] so it holds no stale data */
    gm_operand sa = {1, M}, sb = {K, 1};
    gm_tile(dys + r0 * M, sa, xs + r0 * K, sb, dw + e * M * K, K, M, K, cnt,
            (int64_t)blockIdx.y * GM_BM, (int64_t)blockIdx.x * GM_BN);
}

static bool gm_grid_ok(const moek_ctx *ctx, int64_t R, int64_t E, int64_t cols)
{
    return kc_shape(ctx, (R + GM_BM - 1) / GM_BM + E <= 65535 &&
                             (cols + GM_BN - 1) / GM_BN <= INT_MAX);
}

template <typename T>
static void kc_grouped_fwd(const moek_ctx *ctx, const T *xs, const T *w, const int32_t *expert_rows,
                           T *ys, int64_t R, int64_t K, int64_t M, int64_t E)
{
    if (!kc_shape(ctx, R >= 0 && K >= 0 && M >= 0 && E >= 0) || R == 0 || M == 0)
        return;
    /* rows outside every block stay zero */
    if (!kc_zero(ctx, ys, R * M * (int64_t)sizeof(T)) || E == 0 || !gm_grid_ok(ctx, R, E, M))
        return;
    dim3 grid((unsigned)((M + GM_BN - 1) / GM_BN), (unsigned)((R + GM_BM - 1) / GM_BM + E));
    gm_operand sw = {1, K};   /* B(kk, j) = w[e][j][kk] */
    k_grouped_rows<T><<<grid, 256, 0, kc_stream(ctx)>>>(xs, K, w, sw, M * K, expert_rows, ys, M, R,
                                                         M, K, E, kc_dev_status(ctx));
    kc_launched(ctx);
}

template <typename T>
static void kc_grouped_bwd(const moek_ctx *ctx, const T *dys, const T *xs, const T *w,
                           const int32_t *expert_rows, T *dxs, T *dw, int64_t R, int64_t K,
                           int64_t M, int64_t E)
{
    if (!kc_shape(ctx, R >= 0 && K >= 0 && M >= 0 && E >= 0) || K == 0)
        return;
    if (dxs && R > 0) {
        if (!kc_zero(ctx, dxs, R * K * (int64_t)sizeof(T)))
            return;
        if (E > 0 && M > 0 && gm_grid_ok(ctx, R, E, K)) {
            dim3 grid((unsigned)((K + GM_BN - 1) / GM_BN), (unsigned)((R + GM_BM - 1) / GM_BM + E));
            gm_operand sw = {K, 1};   /* B(kk = m, j = k) = w[e][m][k] */
            k_grouped_rows<T><<<grid, 256, 0, kc_stream(ctx)>>>(
                dys, M, w, sw, M * K, expert_rows, dxs, K, R, K, M, E, kc_dev_status(ctx));
            if (!kc_launched(ctx))
                return;
        }
    }
    if (dw && E > 0 && M > 0) {
        if (!kc_shape(ctx, E <= 65535 && (M + GM_BM - 1) / GM_BM <= 65535))
            return;
        dim3 grid((unsigned)((K + GM_BN - 1) / GM_BN), (unsigned)((M + GM_BM - 1) / GM_BM),
                  (unsigned)E);
        k_grouped_dw<T><<<grid, 256, 0, kc_stream(ctx)>>>(dys, xs, expert_rows, dw, R, K, M,
                                                           kc_dev_status(ctx));
        kc_launched(ctx);
    }
}

/* ---- the exported symbols: fp32 and bf16 storage ------------------------ */
extern "C" {

void moek_matmul_fwd(const moek_ctx *ctx, const float *x, const float *w, float *y, int64_t N,
                     int64_t K, int64_t M)
{
    kc_matmul_fwd(ctx, x, w, y, N, K, M);
}

void moek_matmul_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                     float *dx, float *dw, int64_t N, int64_t K, int64_t M)
{
    kc_matmul_bwd(ctx, dy, x, w, dx, dw, N, K, M);
}

void moek_grouped_matmul_fwd(const moek_ctx *ctx, const float *xs, const float *w,
                             const int32_t *expert_rows, float *ys, int64_t R, int64_t K, int64_t M,
                             int64_t E)
{
    kc_grouped_fwd(ctx, xs, w, expert_rows, ys, R, K, M, E);
}

void moek_grouped_matmul_bwd(const moek_ctx *ctx, const float *dys, const float *xs,
                             const float *w, const int32_t *expert_rows, float *dxs, float *dw,
                             int64_t R, int64_t K, int64_t M, int64_t E)
{
    kc_grouped_bwd(ctx, dys, xs, w, expert_rows, dxs, dw, R, K, M, E);
}

void moek_matmul_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w,
                          moek_bf16 *y, int64_t N, int64_t K, int64_t M)
{
    kc_matmul_fwd(ctx, kc_bf(x), kc_bf(w), kc_bf(y), N, K, M);
}

void moek_matmul_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                          const moek_bf16 *w, moek_bf16 *dx, moek_bf16 *dw, int64_t N, int64_t K,
                          int64_t M)
{
    kc_matmul_bwd(ctx, kc_bf(dy), kc_bf(x), kc_bf(w), kc_bf(dx), kc_bf(dw), N, K,
                  M);
}

/* bf16 loads into the same fp32-FMA tiles (no tensor cores yet): each
 * output is one fp32 sum rounded once */
void moek_grouped_matmul_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *xs, const moek_bf16 *w,
                                  const int32_t *expert_rows, moek_bf16 *ys, int64_t R, int64_t K,
                                  int64_t M, int64_t E)
{
    kc_grouped_fwd(ctx, kc_bf(xs), kc_bf(w), expert_rows, kc_bf(ys), R, K, M, E);
}

void moek_grouped_matmul_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dys, const moek_bf16 *xs,
                                  const moek_bf16 *w, const int32_t *expert_rows, moek_bf16 *dxs,
                                  moek_bf16 *dw, int64_t R, int64_t K, int64_t M, int64_t E)
{
    kc_grouped_bwd(ctx, kc_bf(dys), kc_bf(xs), kc_bf(w), expert_rows, kc_bf(dxs), kc_bf(dw),
                   R, K, M, E);
}

} /* extern "C" */
