/* kcpu.h - helpers private to the CPU reference kernels (kernels/cpu/).
 * Nothing here is part of the ABI; moek.h is. */
#ifndef KCPU_H
#define KCPU_H

#include <stdint.h>
#include <string.h>

#include <cblas.h>
#include <omp.h>

#include "../moek.h"

/* Below this many scalar operations a kernel runs on one thread: forking
 * the OpenMP team costs more than the work. */
#define KCPU_PAR_MIN 32768

/* Threads a kernel may use: ctx->num_threads, or the OpenMP default. */
static inline int kcpu_threads(const moek_ctx *ctx)
{
    return (ctx && ctx->num_threads > 0) ? ctx->num_threads : omp_get_max_threads();
}

/* Threads for a loop doing `work` scalar operations in total. */
static inline int kcpu_team(const moek_ctx *ctx, int64_t work)
{
    return work < KCPU_PAR_MIN ? 1 : kcpu_threads(ctx);
}

/* Records a data error; the first one wins, also across threads. */
static inline void kcpu_fail(const moek_ctx *ctx, int code)
{
    if (ctx && ctx->status) {
        int zero = 0;
        __atomic_compare_exchange_n(ctx->status, &zero, code, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    }
}

/* e^x in fp32 without a libm call or a branch, so loops over it vectorise
 * (glibc's expf does not at -O2): x = n ln2 + r with |r| <= ln2/2 (ln2 split
 * in a part exact in n and a remainder), e^r by its Taylor series up to r^7
 * (truncation below 1e-8 relative, under half an ulp), 2^n built from the
 * exponent bits.  Within 1.2 ulp of exp over the whole range (measured).
 * Below -87.33 (where expf goes subnormal) it returns 0, above 88.72 +inf;
 * NaN gives NaN.  Clamp and out-of-range results are blended with integer
 * masks: gcc will not if-convert (so not vectorise) a select that guards a
 * floating-point operation which may trap (-ftrapping-math, the default). */
static inline float kcpu_expf(float x)
{
    const float lo = -87.33654f, hi = 88.72283f;
    int32_t below = x < lo, above = x > hi; /* NaN: neither, and p is NaN */
    uint32_t mb = 0u - (uint32_t)below, ma = 0u - (uint32_t)above, xu, lu, hu;
    memcpy(&xu, &x, sizeof xu);
    memcpy(&lu, &lo, sizeof lu);
    memcpy(&hu, &hi, sizeof hu);
    xu = (xu & ~(mb | ma)) | (lu & mb) | (hu & ma); /* x clamped to [lo, hi] */
    float xc;
    memcpy(&xc, &xu, sizeof xc);
    float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f; /* round(x log2 e): 1.5 * 2^23 trick */
    float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* n runs from -126 to 128: 2^n = 2^(n-up) 2^up with up = (n > 0), so
     * neither exponent field reaches 255 */
    int32_t ni = (int32_t)n, up = ni > 0;
    int32_t b1 = (ni - up + 127) << 23, b2 = (up + 127) << 23;
    float f1, f2;
    memcpy(&f1, &b1, sizeof f1);
    memcpy(&f2, &b2, sizeof f2);
    float y = p * f1 * f2;
    uint32_t u;
    memcpy(&u, &y, sizeof u);
    u = (u & ~(mb | ma)) | (0x7f800000u & ma); /* below: +0, above: +inf */
    memcpy(&y, &u, sizeof y);
    return y;
}

/* Row-major C[m,n] = A[m,k] . B[k,n] (op(A), op(B) by the trans flags).
 * Handles empty products (BLAS rejects a leading dimension of 0) and sizes
 * that do not fit BLAS's int (MOEK_E_SHAPE). */
/* log-sum-exp of a row of n floats (max-shifted, summed in double) */
__attribute__((visibility("hidden"))) double kcpu_row_lse(const float *x, int64_t n);

__attribute__((visibility("hidden"))) void kcpu_gemm(const moek_ctx *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
               const float *a, int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc);

#endif
