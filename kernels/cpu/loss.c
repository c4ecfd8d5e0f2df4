/* loss.c - softmax cross-entropy over the vocabulary, mean over rows. */
#include <math.h>

#include "kcpu.h"

/* log-sum-exp of one row, shifted by the max, summed in double */
double kcpu_row_lse(const float *x, int64_t n)
{
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    if (m == -INFINITY)
        return -INFINITY;
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += exp((double)(x[i] - m));
    return (double)m + log(s);
}

/* loss = mean_n (lse_n - logits[n, target_n]) */
void moek_cross_entropy_fwd(const moek_ctx *ctx, const float *logits, const int32_t *targets,
                            float *loss, float *lse, int64_t N, int64_t V)
{
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(kcpu_team(ctx, 4 * N * V))
    for (int64_t n = 0; n < N; n++) {
        const float *row = logits + n * V;
        /* the row's log-sum-exp: fp32 exponentials (vectorised), summed in double */
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t i = 0; i < V; i++)
            m = row[i] > m ? row[i] : m;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < V; i++)
            s += (double)kcpu_expf(row[i] - m);
        double l = m == -INFINITY ? -INFINITY : (double)m + log(s);
        lse[n] = (float)l;
        int64_t y = targets[n];
        if (y < 0 || y >= V) {
            kcpu_fail(ctx, MOEK_E_INDEX);
            continue;
        }
        total += l - (double)row[y];
    }
    loss[0] = N > 0 ? (float)(total / (double)N) : 0.0f;
}

/* dlogits = (softmax - onehot(target)) * dloss / N */
void moek_cross_entropy_bwd(const moek_ctx *ctx, const float *dloss, const float *logits,
                            const int32_t *targets, const float *lse, float *dlogits,
                            int64_t N, int64_t V)
{
    float g = N > 0 ? (float)((double)dloss[0] / (double)N) : 0.0f;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 4 * N * V))
    for (int64_t n = 0; n < N; n++) {
        const float *row = logits + n * V;
        float *drow = dlogits + n * V;
        float l = lse[n];
#pragma omp simd
        for (int64_t i = 0; i < V; i++)
            drow[i] = kcpu_expf(row[i] - l) * g;
        int64_t y = targets[n];
        if (y < 0 || y >= V) {
            kcpu_fail(ctx, MOEK_E_INDEX);
            continue;
        }
        drow[y] -= g;
    }
}
