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

/* Row-major C[m,n] = A[m,k] . B[k,n] (op(A), op(B) by the trans flags).
 * Handles empty products (BLAS rejects a leading dimension of 0) and sizes
 * that do not fit BLAS's int (MOEK_E_SHAPE). */
/* log-sum-exp of a row of n floats (max-shifted, summed in double) */
__attribute__((visibility("hidden"))) double kcpu_row_lse(const float *x, int64_t n);

__attribute__((visibility("hidden"))) void kcpu_gemm(const moek_ctx *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
               const float *a, int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc);

#endif
