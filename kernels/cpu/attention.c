/* attention.c - causal multi-head self-attention in tiles, without a T x T
 * matrix.
 *
 * Both directions cut the sequence of one (batch, head) into blocks of
 * BLK rows and work on BLK x BLK score tiles held on the stack (16 KB), so
 * the products are small sgemm calls (OpenBLAS's AVX kernels) and only the
 * softmax is scalar code.  Tiles above the diagonal are skipped, the
 * diagonal tile is masked.
 *
 * Forward, per (b, h, query block): an online softmax over the key blocks
 * (running max m, running sum l per row, the output rows themselves as the
 * accumulator, rescaled when the max grows); lse = m + log l is kept for
 * backward.
 * Backward, per (b, h): the probabilities are recomputed from lse,
 * P = exp(S - lse), dP = dO V^T, dS = P (dP - D) scale with D_t = dO_t.O_t;
 * dV += P^T dO, dK += dS^T Q, dQ += dS K.  One (batch, head) pair is one
 * task, so the dk/dv sums never race and neither their order nor the tiling
 * depends on the thread count: results are bit-identical on any team.
 *
 * sgemm is called inside the OpenMP region: the tile is kept below
 * OpenBLAS's threading threshold (m n k < 65536 * 4), so every call runs
 * on the calling thread and never on OpenBLAS's own pool. */
#include <limits.h>
#include <math.h>

#include "kcpu.h"

#define KCPU_ATT_MAXBLK 64

/* Largest power-of-two block (<= 64) whose tile products stay under
 * OpenBLAS's single-thread threshold; a function of Dh only. */
static int64_t kcpu_att_blk(int64_t Dh)
{
    int64_t blk = KCPU_ATT_MAXBLK;
    while (blk > 4 && blk * blk * Dh >= (int64_t)65536 * 4)
        blk /= 2;
    return blk;
}

static inline void kcpu_sgemm(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha,
                              const float *a, int64_t lda, const float *b, int64_t ldb, float beta,
                              float *c, int64_t ldc)
{
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (int)m, (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
}

/* Sizes BLAS takes as int; false (and MOEK_E_SHAPE) when they do not fit. */
static int kcpu_att_ok(const moek_ctx *ctx, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    if (B <= 0 || T <= 0 || H <= 0 || Dh <= 0)
        return 0;
    if (H * Dh > INT_MAX) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return 0;
    }
    return 1;
}

void moek_attention_fwd(const moek_ctx *ctx, const float *q, const float *k, const float *v,
                        float *o, float *lse, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    if (!kcpu_att_ok(ctx, B, T, H, Dh))
        return;
    int64_t W = H * Dh, blk = kcpu_att_blk(Dh), nb = (T + blk - 1) / blk;
    float scale = 1.0f / sqrtf((float)Dh);
    int64_t tasks = B * H * nb;
#pragma omp parallel for schedule(dynamic, 1) num_threads(kcpu_team(ctx, B * H * T * T * Dh))
    for (int64_t task = 0; task < tasks; task++) {
        /* the last query blocks (the most keys) first: better balance */
        int64_t qb = nb - 1 - task % nb, bh = task / nb, h = bh % H, b = bh / H;
        int64_t t0 = qb * blk, nq = T - t0 < blk ? T - t0 : blk;
        const float *qp = q + (b * T + t0) * W + h * Dh;
        float *op = o + (b * T + t0) * W + h * Dh;
        float s[KCPU_ATT_MAXBLK * KCPU_ATT_MAXBLK], m[KCPU_ATT_MAXBLK], l[KCPU_ATT_MAXBLK];
        for (int64_t i = 0; i < nq; i++) {
            memset(op + i * W, 0, (size_t)Dh * sizeof *op);
            m[i] = -INFINITY;
            l[i] = 0.0f;
        }
        for (int64_t kb = 0; kb <= qb; kb++) {
            int64_t j0 = kb * blk, nk = T - j0 < blk ? T - j0 : blk;
            const float *kp = k + (b * T + j0) * W + h * Dh, *vp = v + (b * T + j0) * W + h * Dh;
            kcpu_sgemm(0, 1, nq, nk, Dh, scale, qp, W, kp, W, 0.0f, s, blk);
            for (int64_t i = 0; i < nq; i++) {
                float *si = s + i * blk;
                int64_t valid = kb < qb ? nk : i + 1; /* causal: key j0+j <= query t0+i */
                float mx = m[i];
#pragma omp simd reduction(max : mx)
                for (int64_t j = 0; j < valid; j++)
                    mx = si[j] > mx ? si[j] : mx;
                float sum = 0.0f; /* lanes summed in a fixed order: still deterministic */
#pragma omp simd reduction(+ : sum)
                for (int64_t j = 0; j < valid; j++) {
                    float e = kcpu_expf(si[j] - mx);
                    si[j] = e;
                    sum += e;
                }
                for (int64_t j = valid; j < nk; j++)
                    si[j] = 0.0f;
                if (mx > m[i] && l[i] > 0.0f) { /* new maximum: rescale what was summed */
                    float c = kcpu_expf(m[i] - mx);
                    l[i] *= c;
                    float *oi = op + i * W;
                    for (int64_t d = 0; d < Dh; d++)
                        oi[d] *= c;
                }
                m[i] = mx;
                l[i] += sum;
            }
            kcpu_sgemm(0, 0, nq, Dh, nk, 1.0f, s, blk, vp, W, 1.0f, op, W);
        }
        for (int64_t i = 0; i < nq; i++) {
            float inv = 1.0f / l[i], *oi = op + i * W;
            for (int64_t d = 0; d < Dh; d++)
                oi[d] *= inv;
            lse[bh * T + t0 + i] = m[i] + logf(l[i]);
        }
    }
}

void moek_attention_bwd(const moek_ctx *ctx, const float *dout, const float *q, const float *k,
                        const float *v, const float *o, const float *lse,
                        float *dq, float *dk, float *dv, int64_t B, int64_t T, int64_t H, int64_t Dh)
{
    if (!kcpu_att_ok(ctx, B, T, H, Dh))
        return;
    int64_t W = H * Dh, blk = kcpu_att_blk(Dh), nb = (T + blk - 1) / blk;
    float scale = 1.0f / sqrtf((float)Dh);
#pragma omp parallel for schedule(dynamic, 1) num_threads(kcpu_team(ctx, B * H * T * T * Dh))
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t h = bh % H, b = bh / H, base = b * T * W + h * Dh;
        float p[KCPU_ATT_MAXBLK * KCPU_ATT_MAXBLK], ds[KCPU_ATT_MAXBLK * KCPU_ATT_MAXBLK];
        float dt[KCPU_ATT_MAXBLK];
        for (int64_t t = 0; t < T; t++) {
            memset(dk + base + t * W, 0, (size_t)Dh * sizeof *dk);
            memset(dv + base + t * W, 0, (size_t)Dh * sizeof *dv);
            memset(dq + base + t * W, 0, (size_t)Dh * sizeof *dq);
        }
        for (int64_t qb = 0; qb < nb; qb++) {
            int64_t t0 = qb * blk, nq = T - t0 < blk ? T - t0 : blk, qoff = base + t0 * W;
            const float *lq = lse + bh * T + t0;
            for (int64_t i = 0; i < nq; i++) {
                const float *a = dout + qoff + i * W, *c = o + qoff + i * W;
                float acc = 0.0f;
                for (int64_t d = 0; d < Dh; d++)
                    acc += a[d] * c[d];
                dt[i] = acc;
            }
            for (int64_t kb = 0; kb <= qb; kb++) {
                int64_t j0 = kb * blk, nk = T - j0 < blk ? T - j0 : blk, koff = base + j0 * W;
                kcpu_sgemm(0, 1, nq, nk, Dh, scale, q + qoff, W, k + koff, W, 0.0f, p, blk);
                kcpu_sgemm(0, 1, nq, nk, Dh, 1.0f, dout + qoff, W, v + koff, W, 0.0f, ds, blk);
                for (int64_t i = 0; i < nq; i++) {
                    float *pi = p + i * blk, *dsi = ds + i * blk, L = lq[i], D = dt[i];
                    int64_t valid = kb < qb ? nk : i + 1;
#pragma omp simd
                    for (int64_t j = 0; j < valid; j++) {
                        float pj = kcpu_expf(pi[j] - L);
                        pi[j] = pj;
                        dsi[j] = pj * (dsi[j] - D) * scale;
                    }
                    for (int64_t j = valid; j < nk; j++)
                        pi[j] = dsi[j] = 0.0f;
                }
                kcpu_sgemm(1, 0, nk, Dh, nq, 1.0f, p, blk, dout + qoff, W, 1.0f, dv + koff, W);
                kcpu_sgemm(1, 0, nk, Dh, nq, 1.0f, ds, blk, q + qoff, W, 1.0f, dk + koff, W);
                kcpu_sgemm(0, 0, nq, Dh, nk, 1.0f, ds, blk, k + koff, W, 1.0f, dq + qoff, W);
            }
        }
    }
}
