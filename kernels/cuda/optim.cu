/* optim.cu - AdamW and SGD with momentum, elementwise; twin of
 * kernels/cpu/optim.c, operation for operation in fp32 so the two agree to
 * rounding.  The hyper-parameters and the squared global norm are read on
 * the device, so a captured step replays with each step's values. */
#include "kcuda.cuh"

/* torch's clip_grad_norm_ factor: min(1, max_norm / (norm + 1e-6)) */
__device__ inline float op_clip(const float *hyper, const float *norm_sq)
{
    float max_norm = hyper[MOEK_HYPER_MAX_NORM];
    if (!(max_norm > 0.0f) || !norm_sq)
        return 1.0f;
    float c = max_norm / (sqrtf(norm_sq[0]) + 1e-6f);
    return c < 1.0f ? c : 1.0f;
}

template <typename T>
__global__ void k_adamw(T *p, const T *g, float *m, float *v, int64_t n, const float *hyper,
                        const float *norm_sq, float weight_decay)
{
    float lr = hyper[MOEK_HYPER_LR], b1 = hyper[MOEK_HYPER_BETA1], b2 = hyper[MOEK_HYPER_BETA2];
    float eps = hyper[MOEK_HYPER_EPS];
    float step = lr / hyper[MOEK_HYPER_BC1];
    float bc2_sqrt = sqrtf(hyper[MOEK_HYPER_BC2]);
    float clip = op_clip(hyper, norm_sq);
    float decay = 1.0f - lr * weight_decay;
    KC_GRID_STRIDE(i, n) {
        float gi = kc_ld(g + i) * clip;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float pi = kc_ld(p + i) * decay;
        kc_st(p + i, pi - step * mi / (sqrtf(vi) / bc2_sqrt + eps));
    }
}

template <typename T>
__global__ void k_sgd(T *p, const T *g, float *buf, int64_t n, const float *hyper,
                      const float *norm_sq, float weight_decay)
{
    float lr = hyper[MOEK_HYPER_LR], mom = hyper[MOEK_HYPER_MOMENTUM];
    float clip = op_clip(hyper, norm_sq);
    KC_GRID_STRIDE(i, n) {
        float pi = kc_ld(p + i);
        float gi = kc_ld(g + i) * clip + weight_decay * pi;
        float bi = mom * buf[i] + gi;
        buf[i] = bi;
        kc_st(p + i, pi - lr * bi);
    }
}

extern "C" void moek_adamw(const moek_ctx *ctx, float *p, const float *g, float *m, float *v,
                           int64_t n, const float *hyper, const float *norm_sq, float weight_decay)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    k_adamw<float><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(p, g, m, v, n, hyper,
                                                                       norm_sq, weight_decay);
    kc_launched(ctx);
}

extern "C" void moek_sgd(const moek_ctx *ctx, float *p, const float *g, float *buf, int64_t n,
                         const float *hyper, const float *norm_sq, float weight_decay)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    k_sgd<float><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(p, g, buf, n, hyper, norm_sq,
                                                                     weight_decay);
    kc_launched(ctx);
}
