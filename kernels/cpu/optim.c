/* optim.c - global-norm pieces and the optimizer updates (AdamW, SGD with
 * momentum), written to match torch.optim step for step. */
#include <math.h>

#include "kcpu.h"

void moek_sumsq_accum(const moek_ctx *ctx, const float *x, float *acc, int64_t n)
{
    double s = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : s) num_threads(kcpu_team(ctx, n))
    for (int64_t i = 0; i < n; i++)
        s += (double)x[i] * x[i];
    acc[0] = (float)((double)acc[0] + s);
}

/* The factor every gradient is multiplied by: 1/S undoes the loss scale
 * (S = hyper[MOEK_HYPER_LOSS_SCALE] > 0, fp16), then torch's
 * clip_grad_norm_ factor min(1, max_norm / (norm + 1e-6)) on the unscaled
 * norm sqrt(*norm_sq) / S.  Returns 0 when *norm_sq is not finite: the
 * caller skips the update (an fp16 overflow; every param reads the same
 * norm, so they all skip together). */
static int kcpu_grad_factor(const float *hyper, const float *norm_sq, float *factor)
{
    float s = hyper[MOEK_HYPER_LOSS_SCALE];
    float inv = s > 0.0f ? 1.0f / s : 1.0f;
    *factor = inv;
    if (!norm_sq)
        return 1;
    if (!isfinite(norm_sq[0]))
        return 0;
    float max_norm = hyper[MOEK_HYPER_MAX_NORM];
    if (max_norm > 0.0f) {
        float c = max_norm / (sqrtf(norm_sq[0]) * inv + 1e-6f);
        if (c < 1.0f)
            *factor = inv * c;
    }
    return 1;
}

/* torch.optim.AdamW: p *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps). */
void moek_adamw(const moek_ctx *ctx, float *p, const float *g, float *m, float *v, int64_t n,
                const float *hyper, const float *norm_sq, float weight_decay)
{
    float lr = hyper[MOEK_HYPER_LR], b1 = hyper[MOEK_HYPER_BETA1], b2 = hyper[MOEK_HYPER_BETA2];
    float eps = hyper[MOEK_HYPER_EPS];
    float step = lr / hyper[MOEK_HYPER_BC1];
    float bc2_sqrt = sqrtf(hyper[MOEK_HYPER_BC2]);
    float clip;
    if (!kcpu_grad_factor(hyper, norm_sq, &clip))
        return;
    float decay = 1.0f - lr * weight_decay;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 8 * n))
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] * clip;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float pi = p[i] * decay;
        p[i] = pi - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

/* torch.optim.SGD (dampening 0, not Nesterov): g'' = g' + wd p;
 * buf = momentum buf + g'' (buf starts at 0, so the first step is buf = g'');
 * p -= lr buf.  With momentum 0, buf is just the last step's g''. */
void moek_sgd(const moek_ctx *ctx, float *p, const float *g, float *buf, int64_t n,
              const float *hyper, const float *norm_sq, float weight_decay)
{
    float lr = hyper[MOEK_HYPER_LR], mom = hyper[MOEK_HYPER_MOMENTUM];
    float clip;
    if (!kcpu_grad_factor(hyper, norm_sq, &clip))
        return;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 4 * n))
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] * clip + weight_decay * p[i];
        float bi = mom * buf[i] + gi;
        buf[i] = bi;
        p[i] -= lr * bi;
    }
}
