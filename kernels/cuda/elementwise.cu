/* elementwise.cu - one thread per element, grid-stride: fill, copy, add,
 * accumulate, scale, GELU (tanh approximation) and SwiGLU.  Each kernel is a
 * template on the storage type with fp32 arithmetic. */
#include "kcuda.cuh"

template <typename T> __global__ void k_fill(T *x, int64_t n, float v)
{
    KC_GRID_STRIDE(i, n) kc_st(x + i, v);
}

template <typename T> __global__ void k_copy(const T *x, T *y, int64_t n)
{
    KC_GRID_STRIDE(i, n) y[i] = x[i];
}

template <typename T> __global__ void k_add(const T *a, const T *b, T *y, int64_t n)
{
    KC_GRID_STRIDE(i, n) kc_st(y + i, kc_ld(a + i) + kc_ld(b + i));
}

template <typename T> __global__ void k_accumulate(T *dst, const T *src, int64_t n)
{
    KC_GRID_STRIDE(i, n) kc_st(dst + i, kc_ld(dst + i) + kc_ld(src + i));
}

template <typename T> __global__ void k_scale(const T *x, T *y, int64_t n, float s)
{
    KC_GRID_STRIDE(i, n) kc_st(y + i, kc_ld(x + i) * s);
}

#define KC_GELU_C 0.7978845608028654f   /* sqrt(2/pi) */
#define KC_GELU_A 0.044715f

template <typename T> __global__ void k_gelu_fwd(const T *x, T *y, int64_t n)
{
    KC_GRID_STRIDE(i, n) {
        float v = kc_ld(x + i);
        float u = KC_GELU_C * (v + KC_GELU_A * v * v * v);
        kc_st(y + i, 0.5f * v * (1.0f + tanhf(u)));
    }
}

template <typename T> __global__ void k_gelu_bwd(const T *dy, const T *x, T *dx, int64_t n)
{
    KC_GRID_STRIDE(i, n) {
        float v = kc_ld(x + i);
        float u = KC_GELU_C * (v + KC_GELU_A * v * v * v);
        float t = tanhf(u);
        float du = KC_GELU_C * (1.0f + 3.0f * KC_GELU_A * v * v);
        float g = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du;
        kc_st(dx + i, kc_ld(dy + i) * g);
    }
}

/* y = silu(gate) * up,  silu(g) = g * sigmoid(g) */
template <typename T> __global__ void k_swiglu_fwd(const T *gate, const T *up, T *y, int64_t n)
{
    KC_GRID_STRIDE(i, n) {
        float g = kc_ld(gate + i);
        float sg = 1.0f / (1.0f + expf(-g));
        kc_st(y + i, g * sg * kc_ld(up + i));
    }
}

template <typename T>
__global__ void k_swiglu_bwd(const T *dy, const T *gate, const T *up, T *dgate, T *dup, int64_t n)
{
    KC_GRID_STRIDE(i, n) {
        float g = kc_ld(gate + i), u = kc_ld(up + i), d = kc_ld(dy + i);
        float sg = 1.0f / (1.0f + expf(-g));
        kc_st(dgate + i, d * u * sg * (1.0f + g * (1.0f - sg)));
        kc_st(dup + i, d * g * sg);
    }
}

#define KC_LAUNCH_1D(n, kernel, ...)                                                      \
    do {                                                                                  \
        if (!kc_shape(ctx, (n) >= 0) || (n) == 0)                                         \
            return;                                                                       \
        kernel<float><<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(__VA_ARGS__); \
        kc_launched(ctx);                                                                 \
    } while (0)

extern "C" {

void moek_fill(const moek_ctx *ctx, float *x, int64_t n, float value)
{
    KC_LAUNCH_1D(n, k_fill, x, n, value);
}

void moek_copy(const moek_ctx *ctx, const float *x, float *y, int64_t n)
{
    KC_LAUNCH_1D(n, k_copy, x, y, n);
}

void moek_add_fwd(const moek_ctx *ctx, const float *a, const float *b, float *y, int64_t n)
{
    KC_LAUNCH_1D(n, k_add, a, b, y, n);
}

void moek_accumulate(const moek_ctx *ctx, float *dst, const float *src, int64_t n)
{
    KC_LAUNCH_1D(n, k_accumulate, dst, src, n);
}

void moek_scale_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n, float s)
{
    KC_LAUNCH_1D(n, k_scale, x, y, n, s);
}

void moek_scale_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t n, float s)
{
    KC_LAUNCH_1D(n, k_scale, dy, dx, n, s);
}

void moek_gelu_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n)
{
    KC_LAUNCH_1D(n, k_gelu_fwd, x, y, n);
}

void moek_gelu_bwd(const moek_ctx *ctx, const float *dy, const float *x, float *dx, int64_t n)
{
    KC_LAUNCH_1D(n, k_gelu_bwd, dy, x, dx, n);
}

void moek_swiglu_fwd(const moek_ctx *ctx, const float *gate, const float *up, float *y, int64_t n)
{
    KC_LAUNCH_1D(n, k_swiglu_fwd, gate, up, y, n);
}

void moek_swiglu_bwd(const moek_ctx *ctx, const float *dy, const float *gate, const float *up,
                     float *dgate, float *dup, int64_t n)
{
    KC_LAUNCH_1D(n, k_swiglu_bwd, dy, gate, up, dgate, dup, n);
}

} /* extern "C" */
