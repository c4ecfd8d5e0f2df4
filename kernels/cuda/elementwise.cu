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

/* dst and src may differ: the bf16 variant adds a bf16 gradient into fp32 */
template <typename D, typename S> __global__ void k_accumulate(D *dst, const S *src, int64_t n)
{
    KC_GRID_STRIDE(i, n) kc_st(dst + i, kc_ld(dst + i) + kc_ld(src + i));
}

template <typename T> __global__ void k_scale(const T *x, T *y, int64_t n, float s)
{
    KC_GRID_STRIDE(i, n) kc_st(y + i, kc_ld(x + i) * s);
}

/* storage conversion either way (moek_cast_*) */
template <typename S, typename D> __global__ void k_cast(const S *x, D *y, int64_t n)
{
    KC_GRID_STRIDE(i, n) kc_st(y + i, kc_ld(x + i));
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

/* one thread per element over n; a template so k_cast<float, kc_bf16> needs
 * no macro tricks */
template <typename... P, typename... A>
static void kc_launch_1d(const moek_ctx *ctx, int64_t n, void (*kernel)(P...), A... args)
{
    if (!kc_shape(ctx, n >= 0) || n == 0)
        return;
    kernel<<<kc_blocks(n), KCUDA_THREADS, 0, kc_stream(ctx)>>>(args...);
    kc_launched(ctx);
}

extern "C" {

void moek_fill(const moek_ctx *ctx, float *x, int64_t n, float value)
{
    kc_launch_1d(ctx, n, k_fill<float>, x, n, value);
}

void moek_copy(const moek_ctx *ctx, const float *x, float *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_copy<float>, x, y, n);
}

void moek_add_fwd(const moek_ctx *ctx, const float *a, const float *b, float *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_add<float>, a, b, y, n);
}

void moek_accumulate(const moek_ctx *ctx, float *dst, const float *src, int64_t n)
{
    kc_launch_1d(ctx, n, k_accumulate<float, float>, dst, src, n);
}

void moek_scale_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n, float s)
{
    kc_launch_1d(ctx, n, k_scale<float>, x, y, n, s);
}

void moek_scale_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t n, float s)
{
    kc_launch_1d(ctx, n, k_scale<float>, dy, dx, n, s);
}

void moek_gelu_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_gelu_fwd<float>, x, y, n);
}

void moek_gelu_bwd(const moek_ctx *ctx, const float *dy, const float *x, float *dx, int64_t n)
{
    kc_launch_1d(ctx, n, k_gelu_bwd<float>, dy, x, dx, n);
}

void moek_swiglu_fwd(const moek_ctx *ctx, const float *gate, const float *up, float *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_swiglu_fwd<float>, gate, up, y, n);
}

void moek_swiglu_bwd(const moek_ctx *ctx, const float *dy, const float *gate, const float *up,
                     float *dgate, float *dup, int64_t n)
{
    kc_launch_1d(ctx, n, k_swiglu_bwd<float>, dy, gate, up, dgate, dup, n);
}

/* ---- bf16 storage: the same kernels on __nv_bfloat16 ------------------- */
void moek_cast_f32_bf16(const moek_ctx *ctx, const float *x, moek_bf16 *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_cast<float, kc_bf16>, x, kc_bf(y), n);
}

void moek_cast_bf16_f32(const moek_ctx *ctx, const moek_bf16 *x, float *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_cast<kc_bf16, float>, kc_bf(x), y, n);
}

void moek_fill_bf16(const moek_ctx *ctx, moek_bf16 *x, int64_t n, float value)
{
    kc_launch_1d(ctx, n, k_fill<kc_bf16>, kc_bf(x), n, value);
}

void moek_copy_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_copy<kc_bf16>, kc_bf(x), kc_bf(y), n);
}

void moek_add_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *a, const moek_bf16 *b, moek_bf16 *y,
                       int64_t n)
{
    kc_launch_1d(ctx, n, k_add<kc_bf16>, kc_bf(a), kc_bf(b), kc_bf(y), n);
}

void moek_accumulate_bf16(const moek_ctx *ctx, float *dst, const moek_bf16 *src, int64_t n)
{
    kc_launch_1d(ctx, n, k_accumulate<float, kc_bf16>, dst, kc_bf(src), n);
}

void moek_scale_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n, float s)
{
    kc_launch_1d(ctx, n, k_scale<kc_bf16>, kc_bf(x), kc_bf(y), n, s);
}

void moek_scale_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, int64_t n,
                         float s)
{
    kc_launch_1d(ctx, n, k_scale<kc_bf16>, kc_bf(dy), kc_bf(dx), n, s);
}

void moek_gelu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_gelu_fwd<kc_bf16>, kc_bf(x), kc_bf(y), n);
}

void moek_gelu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                        moek_bf16 *dx, int64_t n)
{
    kc_launch_1d(ctx, n, k_gelu_bwd<kc_bf16>, kc_bf(dy), kc_bf(x), kc_bf(dx), n);
}

void moek_swiglu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *gate, const moek_bf16 *up,
                          moek_bf16 *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_swiglu_fwd<kc_bf16>, kc_bf(gate), kc_bf(up), kc_bf(y), n);
}

void moek_swiglu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *gate,
                          const moek_bf16 *up, moek_bf16 *dgate, moek_bf16 *dup, int64_t n)
{
    kc_launch_1d(ctx, n, k_swiglu_bwd<kc_bf16>, kc_bf(dy), kc_bf(gate), kc_bf(up), kc_bf(dgate),
                 kc_bf(dup), n);
}


/* ---- fp16 storage: the bf16 exports above instantiated with __half ---- */
void moek_cast_f16_f32(const moek_ctx *ctx, const moek_f16 *x, float *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_cast<kc_f16, float>, kc_hf(x), y, n);
}

void moek_cast_f32_f16(const moek_ctx *ctx, const float *x, moek_f16 *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_cast<float, kc_f16>, x, kc_hf(y), n);
}

void moek_fill_f16(const moek_ctx *ctx, moek_f16 *x, int64_t n, float value)
{
    kc_launch_1d(ctx, n, k_fill<kc_f16>, kc_hf(x), n, value);
}

void moek_copy_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_copy<kc_f16>, kc_hf(x), kc_hf(y), n);
}

void moek_add_fwd_f16(const moek_ctx *ctx, const moek_f16 *a, const moek_f16 *b, moek_f16 *y,
                       int64_t n)
{
    kc_launch_1d(ctx, n, k_add<kc_f16>, kc_hf(a), kc_hf(b), kc_hf(y), n);
}

void moek_accumulate_f16(const moek_ctx *ctx, float *dst, const moek_f16 *src, int64_t n)
{
    kc_launch_1d(ctx, n, k_accumulate<float, kc_f16>, dst, kc_hf(src), n);
}

void moek_scale_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n, float s)
{
    kc_launch_1d(ctx, n, k_scale<kc_f16>, kc_hf(x), kc_hf(y), n, s);
}

void moek_scale_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, int64_t n,
                         float s)
{
    kc_launch_1d(ctx, n, k_scale<kc_f16>, kc_hf(dy), kc_hf(dx), n, s);
}

void moek_gelu_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_gelu_fwd<kc_f16>, kc_hf(x), kc_hf(y), n);
}

void moek_gelu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                        moek_f16 *dx, int64_t n)
{
    kc_launch_1d(ctx, n, k_gelu_bwd<kc_f16>, kc_hf(dy), kc_hf(x), kc_hf(dx), n);
}

void moek_swiglu_fwd_f16(const moek_ctx *ctx, const moek_f16 *gate, const moek_f16 *up,
                          moek_f16 *y, int64_t n)
{
    kc_launch_1d(ctx, n, k_swiglu_fwd<kc_f16>, kc_hf(gate), kc_hf(up), kc_hf(y), n);
}

void moek_swiglu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *gate,
                          const moek_f16 *up, moek_f16 *dgate, moek_f16 *dup, int64_t n)
{
    kc_launch_1d(ctx, n, k_swiglu_bwd<kc_f16>, kc_hf(dy), kc_hf(gate), kc_hf(up), kc_hf(dgate),
                 kc_hf(dup), n);
}

} /* extern "C" */
