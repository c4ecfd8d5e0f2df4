/* bf16.c - the bf16-storage variants of the CPU kernels (precision = bf16).
 *
 * Each variant widens its bf16 inputs to fp32 exactly, runs the fp32 kernel
 * of the same name and rounds each bf16 output once (RNE).  The code is
 * half_variants.inc, shared with f16.c; this file picks the storage type and
 * the two conversions.  The bf16 SiLU, repeat_kv and bias_add variants are in
 * layer_ops.c. */

#define KH_T moek_bf16
#define KH_FN(name) name##_bf16
#define KH_CAST_TO_F32 moek_cast_bf16_f32
#define KH_ROUND(f) moek_bf16_from_f32(f)
#define KH_WIDEN(h) moek_bf16_to_f32(h)
#include "half_variants.inc"
