/* optim.cu - AdamW and SGD with momentum, elementwise; twin of
 * kernels/cpu/optim.c, operation for operation in fp32 so the two agree to
 * rounding.  The hyper-parameters and the squared global norm are read on
 * the device, so a captured step replays with each step's values. */
#include "kcuda.cuh"

/* The factor every gradient is multiplied by, as kcpu_grad_factor: 1/S
 * undoes the loss scale (S = hyper[MOEK_HYPER_LOSS_SCALE] > 0, fp16), then
 * torch's clip_grad_norm_ factor min(1, max_norm / (norm + 1e-6)) on the
 * unscaled norm.  False when *norm_sq is not finite: the kernel then writes
 * nothing (every thread of every param reads the same norm). */
__device__ inline bool op_factor(const float *hyper, const float *norm_sq, float *factor)
{
    float s = hyper[MOEK_HYPER_LOSS_SCALE];
    float inv = s > 0.0f ? 1.0f / s : 1.0f;
    *factor = inv;
    if (!norm_sq)
        return true;
    if (!isfinite(norm_sq[0]))
        return false;
    float max_norm = hyper[MOEK_HYPER_MAX_NORM];
    if (max_norm > 0.0f) {
        float c = max_norm / (sqrtf(norm_sq[0]) * inv + 1e-6f);
        if (c < 1.0f)
            *factor = inv * c;
    }
    return true;
}

/* AdamW on one element, fp32 as on the CPU; returns the new parameter */
struct op_adamw_k {
    float b1, b2, eps, step, bc2_sqrt, clip, decay;
    bool skip;   /* non-finite norm: no update */
};

__device__ inline op_adamw_k op_adamw_consts(const float *hyper, const float *norm_sq,
                                             float weight_decay)
{
    float lr = hyper[MOEK_HYPER_LR];
    op_adamw_k c;
    c.b1 = hyper[MOEK_HYPER_BETA1];
    c.b2 = hyper[MOEK_HYPER_BETA2];
    c.eps = hyper[MOEK_HYPER_EPS];
    c.step = lr / hyper[MOEK_HYPER_BC1];
    c.bc2_sqrt = sqrtf(hyper[MOEK_HYPER_BC2]);
    c.skip = !op_factor(hyper, norm_sq, &c.clip);
    c.decay = 1.0f - lr * weight_decay;
    return c;
}

__device__ inline float op_adamw_one(const op_adamw_k &c, float p, float g, float *m, float *v)
{
    float gi = g * c.clip;
    float mi = c.b1 * *m + (1.0f - c.b1) * gi;
    float vi = c.b2 * *v + (1.0f - c.b2) * gi * gi;
    *m = mi;
    *v = vi;
    return p * c.decay - c.step * mi / (sqrtf(vi) / c.bc2_sqrt + c.eps);
}

/* SGD with momentum on one element */
__device__ inline float op_sgd_one(float lr, float mom, float clip, float wd, float p, float g,
                                   float *buf)
{
    float gi = g * clip + wd * p;
    float bi = mom * *buf + gi;
    *buf = bi;
    return p - lr * bi;
}

/* The parameter is read from and written to `master` (fp32 here); when p is
 * not null the new value is also stored into p in its storage type: the bf16
 * working copy of an fp32 master (moek_adamw_bf16). */
template <typename T>
__global__ void k_adamw(float *master, T *p, const float *g, float *m, float *v, int64_t n,
                        const float *hyper, const float *norm_sq, float weight_decay)
{
    op_adamw_k c = op_adamw_consts(hyper, norm_sq, weight_decay);
    if (c.skip)
        return;
    KC_GRID_STRIDE(i, n) {
        float pi = op_adamw_one(c, master[i], g[i], m + i, v + i);
        master[i] = pi;
        if (p)
            kc_st(p + i, pi);
    }
}

template <typename T>
__global__ void k_sgd(float *master, T *p, const float *g, float *buf, int64_t n,
                      const float *hyper, const float *norm_sq, float weight_decay)
{
    float lr = hyper[MOEK_HYPER_LR], mom = hyper[MOEK_HYPER_MOMENTUM];
    float clip;
    if (!op_factor(hyper, norm_sq, &clip))
        return;
    KC_GRID_STRIDE(i, n) {
        float pi = op_sgd_one(lr, mom, clip, weight_decay, master[i], g[i], buf + i);
        master[i] = pi;
        if (p)
            kc_st(p + i, pi);
    }
}

extern "C" {

void moek_adamw(const moek_ctx *ctx, float *p, const float *g, float *m, float *v, int64_t n,
                const float *hyper, const float *norm_sq, float weight_decay)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    k_adamw<float><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(p, nullptr, g, m, v, n,
                                                                       hyper, norm_sq, weight_decay);
    kc_launched(ctx);
}

void moek_sgd(const moek_ctx *ctx, float *p, const float *g, float *buf, int64_t n,
              const float *hyper, const float *norm_sq, float weight_decay)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    k_sgd<float><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(p, nullptr, g, buf, n, hyper,
                                                                     norm_sq, weight_decay);
    kc_launched(ctx);
}

/* the step on the fp32 master copy, then p = bf16(master) */
void moek_adamw_bf16(const moek_ctx *ctx, moek_bf16 *p, float *master, const float *g, float *m,
                     float *v, int64_t n, const float *hyper, const float *norm_sq,
                     float weight_decay)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    k_adamw<kc_bf16><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        master, kc_bf(p), g, m, v, n, hyper, norm_sq, weight_decay);
    kc_launched(ctx);
}

void moek_sgd_bf16(const moek_ctx *ctx, moek_bf16 *p, float *master, const float *g, float *buf,
                   int64_t n, const float *hyper, const float *norm_sq, float weight_decay)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    k_sgd<kc_bf16><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        master, kc_bf(p), g, buf, n, hyper, norm_sq, weight_decay);
    kc_launched(ctx);
}


/* ---- fp16 storage: the bf16 exports above instantiated with __half ---- */
void moek_adamw_f16(const moek_ctx *ctx, moek_f16 *p, float *master, const float *g, float *m,
                     float *v, int64_t n, const float *hyper, const float *norm_sq,
                     float weight_decay)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    k_adamw<kc_f16><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        master, kc_hf(p), g, m, v, n, hyper, norm_sq, weight_decay);
    kc_launched(ctx);
}

void moek_sgd_f16(const moek_ctx *ctx, moek_f16 *p, float *master, const float *g, float *buf,
                   int64_t n, const float *hyper, const float *norm_sq, float weight_decay)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    k_sgd<kc_f16><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(
        master, kc_hf(p), g, buf, n, hyper, norm_sq, weight_decay);
    kc_launched(ctx);
}

} /* extern "C" */
