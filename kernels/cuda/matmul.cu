/* matmul.cu - dense products through cuBLAS, and the grouped expert
 * product as a kernel of our own that reads expert_rows on the device (no
 * host sync, so it can be captured in a CUDA graph with dropless routing
 * whose block sizes change every step).
 *
 * Row-major to cuBLAS's column-major: a row-major [r, c] matrix is a
 * column-major [c, r] one, so row-major C = A . B is column-major
 * C^T = B^T . A^T and every call below swaps its operands. */
#include <limits.h>
#include <mma.h>
#include <type_traits>

#include "kcuda.cuh"

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

/* ---- grouped product on the tensor cores (bf16 storage only) -------------
 * Same block layout as above (blockIdx.y walks the row tiles of all experts,
 * blockIdx.z the expert for dw), but the body is WMMA 16x16x16 bf16 with fp32
 * accumulation: a 128x128 tile per block, 8 warps of 64x32, K steps of 32
 * through a 3-stage cp.async ring in shared memory.  Tiles are copied in the
 * operand's own memory order (16-byte chunks along its contiguous dimension),
 * and WMMA reads them as row- or column-major, so one body serves the
 * forward (A row, B col), dxs (A row, B row) and dw (A col, B row).  It needs
 * K and M multiples of 8 and 16-byte aligned bases, so every chunk is either
 * wholly inside the matrix or wholly outside it (zero-filled); other shapes
 * take the fp32-FMA kernel above.  fp32 accumulation rounded once to bf16, as
 * the FMA kernel does; only the summation order differs. */
#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_STAGES 3
#define TC_PAD 8   /* bf16 elements: 16 bytes, so 8 rows of an ldmatrix hit 8 bank groups */

template <bool COL> struct tc_a_shape {   /* A tile [BM x BK], stored as in memory */
    static constexpr int elems = COL ? TC_BK * (TC_BM + TC_PAD) : TC_BM * (TC_BK + TC_PAD);
};
template <bool COL> struct tc_b_shape {   /* B tile [BK x BN] */
    static constexpr int elems = COL ? TC_BN * (TC_BK + TC_PAD) : TC_BK * (TC_BN + TC_PAD);
};

static constexpr size_t tc_smem_bytes(bool acol, bool bcol)
{
    return (size_t)TC_STAGES * 2 *
           ((acol ? TC_BK * (TC_BM + TC_PAD) : TC_BM * (TC_BK + TC_PAD)) +
            (bcol ? TC_BN * (TC_BK + TC_PAD) : TC_BK * (TC_BN + TC_PAD)));
}

/* element (r, c) of A at A[r*lda + c] (row) or A[c*lda + r] (col); same for B
 * with (depth, col).  rows/cols/depth bound the product. */
template <bool ACOL, bool BCOL>
__device__ void tc_tile(const kc_bf16 *A, int64_t lda, const kc_bf16 *B, int64_t ldb, kc_bf16 *C,
                        int64_t ldc, int64_t rows, int64_t cols, int64_t depth, int64_t i0,
                        int64_t j0)
{
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char tc_shm[];
    constexpr int AE = tc_a_shape<ACOL>::elems, BE = tc_b_shape<BCOL>::elems;
    kc_bf16 *sa = reinterpret_cast<kc_bf16 *>(tc_shm), *sb = sa + TC_STAGES * AE;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int wm = warp >> 2, wn = warp & 3;   /* 2 x 4 warps, 64 x 32 each */

    auto load = [&](int slot, int64_t k0) {
        kc_bf16 *as = sa + slot * AE, *bs = sb + slot * BE;
#pragma unroll
        for (int l = 0; l < 2; l++) {   /* 512 chunks of 8 per operand */
            int c = tid + l * 256;
            if (!ACOL) {
                int i = c >> 2, kk = (c & 3) * 8;
                bool ok = i0 + i < rows && k0 + kk < depth;
                kc_cp16(as + i * (TC_BK + TC_PAD) + kk, ok ? A + (i0 + i) * lda + k0 + kk : A,
                        ok ? 16 : 0);
            } else {
                int kk = c >> 4, i = (c & 15) * 8;
                bool ok = i0 + i < rows && k0 + kk < depth;
                kc_cp16(as + kk * (TC_BM + TC_PAD) + i, ok ? A + (k0 + kk) * lda + i0 + i : A,
                        ok ? 16 : 0);
            }
            if (!BCOL) {
                int kk = c >> 4, j = (c & 15) * 8;
                bool ok = j0 + j < cols && k0 + kk < depth;
                kc_cp16(bs + kk * (TC_BN + TC_PAD) + j, ok ? B + (k0 + kk) * ldb + j0 + j : B,
                        ok ? 16 : 0);
            } else {
                int j = c >> 2, kk = (c & 3) * 8;
                bool ok = j0 + j < cols && k0 + kk < depth;
                kc_cp16(bs + j * (TC_BK + TC_PAD) + kk, ok ? B + (j0 + j) * ldb + k0 + kk : B,
                        ok ? 16 : 0);
            }
        }
    };

    using ALay = typename std::conditional<ACOL, wmma::col_major, wmma::row_major>::type;
    using BLay = typename std::conditional<BCOL, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < 2; b++)
            wmma::fill_fragment(acc[a][b], 0.0f);

    int64_t nk = (depth + TC_BK - 1) / TC_BK;
#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; s++) {
        if (s < nk)
            load(s, s * TC_BK);
        kc_cp_commit();
    }
    for (int64_t kt = 0; kt < nk; kt++) {
        kc_cp_wait<TC_STAGES - 2>();
        __syncthreads();   /* tile kt landed; every warp is done with tile kt-1 */
        if (kt + TC_STAGES - 1 < nk)
            load((int)((kt + TC_STAGES - 1) % TC_STAGES), (kt + TC_STAGES - 1) * TC_BK);
        kc_cp_commit();
        const kc_bf16 *as = sa + (kt % TC_STAGES) * AE, *bs = sb + (kt % TC_STAGES) * BE;
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, kc_bf16, ALay> af[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, kc_bf16, BLay> bf[2];
#pragma unroll
            for (int a = 0; a < 4; a++) {
                int r = wm * 64 + a * 16;
                if (!ACOL)
                    wmma::load_matrix_sync(af[a], as + r * (TC_BK + TC_PAD) + kk, TC_BK + TC_PAD);
                else
                    wmma::load_matrix_sync(af[a], as + kk * (TC_BM + TC_PAD) + r, TC_BM + TC_PAD);
            }
#pragma unroll
            for (int b = 0; b < 2; b++) {
                int c = wn * 32 + b * 16;
                if (!BCOL)
                    wmma::load_matrix_sync(bf[b], bs + kk * (TC_BN + TC_PAD) + c, TC_BN + TC_PAD);
                else
                    wmma::load_matrix_sync(bf[b], bs + c * (TC_BK + TC_PAD) + kk, TC_BK + TC_PAD);
            }
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 2; b++)
                    wmma::mma_sync(acc[a][b], af[a], bf[b], acc[a][b]);
        }
    }
    kc_cp_wait<0>();
    __syncthreads();   /* the ring is free: reuse it as per-warp 16x16 fp32 staging */
    float *st = reinterpret_cast<float *>(tc_shm) + warp * 256;
    int r = lane >> 1, c8 = (lane & 1) * 8;
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < 2; b++) {
            wmma::store_matrix_sync(st, acc[a][b], 16, wmma::mem_row_major);
            __syncwarp();
            int64_t gi = i0 + wm * 64 + a * 16 + r, gj = j0 + wn * 32 + b * 16 + c8;
            if (gi < rows && gj < cols) {   /* cols % 8 == 0: the 8 columns are all in */
                const float *sv = st + r * 16 + c8;
                uint4 u;   /* 8 bf16 as one 16-byte store; memcpy, not a pun (registers on the GPU) */
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    __nv_bfloat162 h = __floats2bfloat162_rn(sv[2 * q], sv[2 * q + 1]);
                    memcpy(reinterpret_cast<char *>(&u) + 4 * q, &h, 4);
                }
                *reinterpret_cast<uint4 *>(C + gi * ldc + gj) = u;
            }
            __syncwarp();
        }
}

template <bool ACOL, bool BCOL>
__global__ void __launch_bounds__(256, 2) k_tc_rows(const kc_bf16 *X, int64_t ldx, const kc_bf16 *W,
                                                 int64_t ldw, int64_t wstride,
                                                 const int32_t *expert_rows, kc_bf16 *Y, int64_t ldy,
                                                 int64_t R, int64_t cols, int64_t depth, int64_t E,
                                                 int *st)
{
    int64_t t = blockIdx.y;
    for (int64_t e = 0; e < E; e++) {
        int64_t r0, cnt;
        if (!gm_block(expert_rows, e, R, st, &r0, &cnt))
            return;
        int64_t tiles = (cnt + TC_BM - 1) / TC_BM;
        if (t < tiles) {
            tc_tile<ACOL, BCOL>(X + r0 * ldx, ldx, W + e * wstride, ldw, Y + r0 * ldy, ldy, cnt,
                                cols, depth, t * TC_BM, (int64_t)blockIdx.x * TC_BN);
            return;
        }
        t -= tiles;
    }
}

/* dw[e] = dys[e rows]^T . xs[e rows]: A(m, r) = dys[r][m] (col), B(r, k) = xs[r][k] (row) */
__global__ void __launch_bounds__(256, 2) k_tc_dw(const kc_bf16 *dys, const kc_bf16 *xs,
                                               const int32_t *expert_rows, kc_bf16 *dw, int64_t R,
                                               int64_t K, int64_t M, int *st)
{
    int64_t e = blockIdx.z, r0, cnt;
    if (!gm_block(expert_rows, e, R, st, &r0, &cnt))
        r0 = cnt = 0;   /* still overwrite dw[e] */
    tc_tile<true, false>(dys + r0 * M, M, xs + r0 * K, K, dw + e * M * K, K, M, K, cnt,
                         (int64_t)blockIdx.y * TC_BM, (int64_t)blockIdx.x * TC_BN);
}

/* rows of Y that no expert block covers get zeros (the product never writes
 * them); one warp per row, nothing written in dropless routing */
template <typename T>
__global__ void k_zero_uncovered(T *Y, int64_t ld, int64_t R, const int32_t *expert_rows, int64_t E)
{
    int64_t row = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= R)
        return;
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = expert_rows[2 * e], cnt = expert_rows[2 * e + 1];
        if (row >= r0 && row < r0 + cnt)
            return;
    }
    for (int64_t c = threadIdx.x & 31; c < ld; c += 32)
        kc_st(Y + row * ld + c, 0.0f);
}

static bool tc_al(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* the tensor-core path applies: bf16 storage, 16-byte chunks everywhere */
static bool tc_fits(int64_t K, int64_t M, const void *a, const void *b, const void *c)
{
    return K % 8 == 0 && M % 8 == 0 && tc_al(a) && tc_al(b) && tc_al(c);
}

template <bool ACOL, bool BCOL>
static bool tc_smem(const moek_ctx *ctx, const void *kernel)
{
    return kc_ok(ctx, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)tc_smem_bytes(ACOL, BCOL)));
}

/* true when it handled the call (launched or failed with a recorded error) */
static bool tc_rows(const moek_ctx *ctx, const kc_bf16 *X, int64_t ldx, const kc_bf16 *W,
                    bool wcol, int64_t ldw, int64_t wstride, const int32_t *expert_rows,
                    kc_bf16 *Y, int64_t ldy, int64_t R, int64_t cols, int64_t depth, int64_t E)
{
    if (!kc_shape(ctx, (R + TC_BM - 1) / TC_BM + E <= 65535 && (cols + TC_BN - 1) / TC_BN <= INT_MAX))
        return true;
    k_zero_uncovered<kc_bf16><<<(unsigned)((R + 7) / 8), 256, 0, kc_stream(ctx)>>>(Y, ldy, R,
                                                                                 expert_rows, E);
    if (!kc_launched(ctx))
        return true;
    dim3 grid((unsigned)((cols + TC_BN - 1) / TC_BN), (unsigned)((R + TC_BM - 1) / TC_BM + E));
    if (wcol) {
        if (!tc_smem<false, true>(ctx, (const void *)k_tc_rows<false, true>))
            return true;
        k_tc_rows<false, true><<<grid, 256, tc_smem_bytes(false, true), kc_stream(ctx)>>>(
            X, ldx, W, ldw, wstride, expert_rows, Y, ldy, R, cols, depth, E, kc_dev_status(ctx));
    } else {
        if (!tc_smem<false, false>(ctx, (const void *)k_tc_rows<false, false>))
            return true;
        k_tc_rows<false, false><<<grid, 256, tc_smem_bytes(false, false), kc_stream(ctx)>>>(
            X, ldx, W, ldw, wstride, expert_rows, Y, ldy, R, cols, depth, E, kc_dev_status(ctx));
    }
    kc_launched(ctx);
    return true;
}

static void tc_grouped_fwd(const moek_ctx *ctx, const kc_bf16 *xs, const kc_bf16 *w,
                           const int32_t *expert_rows, kc_bf16 *ys, int64_t R, int64_t K,
                           int64_t M, int64_t E)
{
    if (!kc_shape(ctx, R >= 0 && K >= 0 && M >= 0 && E >= 0) || R == 0 || M == 0)
        return;
    if (E == 0 || K == 0 || !tc_fits(K, M, xs, w, ys)) {
        kc_grouped_fwd(ctx, xs, w, expert_rows, ys, R, K, M, E);
        return;
    }
    /* ys[r, m] = sum_k xs[r, k] w[e][m][k]: B(k, m) = w[m*K + k], column-major */
    tc_rows(ctx, xs, K, w, true, K, M * K, expert_rows, ys, M, R, M, K, E);
}

static void tc_grouped_bwd(const moek_ctx *ctx, const kc_bf16 *dys, const kc_bf16 *xs,
                           const kc_bf16 *w, const int32_t *expert_rows, kc_bf16 *dxs, kc_bf16 *dw,
                           int64_t R, int64_t K, int64_t M, int64_t E)
{
    if (!kc_shape(ctx, R >= 0 && K >= 0 && M >= 0 && E >= 0) || K == 0)
        return;
    if (E == 0 || M == 0 || !tc_fits(K, M, dys, xs, w) || (dxs && !tc_al(dxs)) ||
        (dw && !tc_al(dw))) {
        kc_grouped_bwd(ctx, dys, xs, w, expert_rows, dxs, dw, R, K, M, E);
        return;
    }
    /* dxs[r, k] = sum_m dys[r, m] w[e][m][k]: B(m, k) = w[m*K + k], row-major */
    if (dxs && R > 0)
        tc_rows(ctx, dys, M, w, false, K, M * K, expert_rows, dxs, K, R, K, M, E);
    if (dw) {
        if (!kc_shape(ctx, E <= 65535 && (M + TC_BM - 1) / TC_BM <= 65535))
            return;
        if (!tc_smem<true, false>(ctx, (const void *)k_tc_dw))
            return;
        dim3 grid((unsigned)((K + TC_BN - 1) / TC_BN), (unsigned)((M + TC_BM - 1) / TC_BM),
                  (unsigned)E);
        k_tc_dw<<<grid, 256, tc_smem_bytes(true, false), kc_stream(ctx)>>>(dys, xs, expert_rows, dw,
                                                                            R, K, M,
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

/* bf16: tensor cores (tc_grouped_*) when K and M are multiples of 8 and the
 * bases 16-byte aligned, else the fp32-FMA tiles; each output is one fp32 sum
 * rounded once */
void moek_grouped_matmul_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *xs, const moek_bf16 *w,
                                  const int32_t *expert_rows, moek_bf16 *ys, int64_t R, int64_t K,
                                  int64_t M, int64_t E)
{
    tc_grouped_fwd(ctx, kc_bf(xs), kc_bf(w), expert_rows, kc_bf(ys), R, K, M, E);
}

void moek_grouped_matmul_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dys, const moek_bf16 *xs,
                                  const moek_bf16 *w, const int32_t *expert_rows, moek_bf16 *dxs,
                                  moek_bf16 *dw, int64_t R, int64_t K, int64_t M, int64_t E)
{
    tc_grouped_bwd(ctx, kc_bf(dys), kc_bf(xs), kc_bf(w), expert_rows, kc_bf(dxs), kc_bf(dw),
                   R, K, M, E);
}


/* ---- fp16 storage: the bf16 exports above instantiated with __half; the
 * grouped products take the fp32-FMA tiles (the tensor-core path is bf16) */
void moek_matmul_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w,
                          moek_f16 *y, int64_t N, int64_t K, int64_t M)
{
    kc_matmul_fwd(ctx, kc_hf(x), kc_hf(w), kc_hf(y), N, K, M);
}

void moek_matmul_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                          const moek_f16 *w, moek_f16 *dx, moek_f16 *dw, int64_t N, int64_t K,
                          int64_t M)
{
    kc_matmul_bwd(ctx, kc_hf(dy), kc_hf(x), kc_hf(w), kc_hf(dx), kc_hf(dw), N, K,
                  M);
}

void moek_grouped_matmul_fwd_f16(const moek_ctx *ctx, const moek_f16 *xs, const moek_f16 *w,
                                  const int32_t *expert_rows, moek_f16 *ys, int64_t R, int64_t K,
                                  int64_t M, int64_t E)
{
    kc_grouped_fwd(ctx, kc_hf(xs), kc_hf(w), expert_rows, kc_hf(ys), R, K, M, E);
}

void moek_grouped_matmul_bwd_f16(const moek_ctx *ctx, const moek_f16 *dys, const moek_f16 *xs,
                                  const moek_f16 *w, const int32_t *expert_rows, moek_f16 *dxs,
                                  moek_f16 *dw, int64_t R, int64_t K, int64_t M, int64_t E)
{
    kc_grouped_bwd(ctx, kc_hf(dys), kc_hf(xs), kc_hf(w), expert_rows, kc_hf(dxs), kc_hf(dw),
                   R, K, M, E);
}

} /* extern "C" */
