/* f16.c - the fp16-storage variants of the CPU kernels (precision = fp16).
 *
 * The twin of bf16.c with IEEE half storage (moek.h "fp16 storage"): each
 * variant widens its half inputs to fp32 exactly, runs the fp32 kernel of the
 * same name and rounds each half output once (RNE, overflow to Inf), so the
 * CPU results are the definition the CUDA __half variants are compared with.
 * The code is half_variants.inc, shared with bf16.c; this file picks the
 * storage type and the two conversions, and adds the issue 2 layer ops
 * (silu, repeat_kv, bias_add) whose bf16 variants are in layer_ops.c, by the
 * same workspace recipe.
 * Loss scaling lives in the optimizer (optim.c): nothing here knows of it. */

#define KH_T moek_f16
#define KH_FN(name) name##_f16
#define KH_CAST_TO_F32 moek_cast_f16_f32
#define KH_ROUND(f) moek_f16_from_f32(f)
#define KH_WIDEN(h) moek_f16_to_f32(h)
#include "half_variants.inc"

/* ---- issue 2 layer ops ---------------------------------------------------- */
void moek_silu_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n)
{
    kh_call c = {0};
    kh_in(&c, x, n);
    kh_out(&c, y, n);
    if (!kh_widen_all(ctx, &c))
        return;
    moek_silu_fwd(ctx, c.f[0], c.f[1], n);
    kh_round_all(ctx, &c);
}

void moek_silu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x, moek_f16 *dx,
                       int64_t n)
{
    kh_call c = {0};
    kh_in(&c, dy, n);
    kh_in(&c, x, n);
    kh_out(&c, dx, n);
    if (!kh_widen_all(ctx, &c))
        return;
    moek_silu_bwd(ctx, c.f[0], c.f[1], c.f[2], n);
    kh_round_all(ctx, &c);
}

void moek_repeat_kv_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t N,
                            int64_t Hkv, int64_t H, int64_t Dh)
{
    kh_call c = {0};
    kh_in(&c, x, N * Hkv * Dh);
    kh_out(&c, y, N * H * Dh);
    if (!kh_widen_all(ctx, &c))
        return;
    moek_repeat_kv_fwd(ctx, c.f[0], c.f[1], N, Hkv, H, Dh);
    kh_round_all(ctx, &c);
}

void moek_repeat_kv_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, int64_t N,
                            int64_t Hkv, int64_t H, int64_t Dh)
{
    kh_call c = {0};
    kh_in(&c, dy, N * H * Dh);
    kh_out(&c, dx, N * Hkv * Dh);
    if (!kh_widen_all(ctx, &c))
        return;
    moek_repeat_kv_bwd(ctx, c.f[0], c.f[1], N, Hkv, H, Dh);
    kh_round_all(ctx, &c);
}

void moek_bias_add_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *b, moek_f16 *y,
                           int64_t N, int64_t D)
{
    kh_call c = {0};
    kh_in(&c, x, N * D);
    kh_in(&c, b, D);
    kh_out(&c, y, N * D);
    if (!kh_widen_all(ctx, &c))
        return;
    moek_bias_add_fwd(ctx, c.f[0], c.f[1], c.f[2], N, D);
    kh_round_all(ctx, &c);
}

void moek_bias_add_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, moek_f16 *db,
                           int64_t N, int64_t D)
{
    kh_call c = {0};
    kh_in(&c, dy, N * D);
    kh_out(&c, dx, N * D);
    kh_out(&c, db, D);
    if (!kh_widen_all(ctx, &c))
        return;
    moek_bias_add_bwd(ctx, c.f[0], c.f[1], c.f[2], N, D);
    kh_round_all(ctx, &c);
}
