/* bf16.h - helpers private to the CPU bf16 variants (bf16.c): the two
 * conversions.  Nothing here is ABI. */
#ifndef KBF16_H
#define KBF16_H

#include <stdint.h>
#include <string.h>

#include "../moek.h"

/* fp32 -> bf16, round to nearest even: adding 0x7FFF plus the lowest kept
 * bit carries into bit 16 exactly when the dropped half is above one half,
 * or equal to it with an odd kept part.  The carry may run into the
 * exponent (correct: the next binade) and turn the largest finite values
 * into Inf (correct under RNE).  A NaN would carry the same way into Inf or
 * lose its payload to zero, so it is truncated and quieted instead. */
static inline moek_bf16 kbf16_round(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (moek_bf16)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (moek_bf16)(u >> 16);
}

/* bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32. */
static inline float kbf16_widen(moek_bf16 h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#endif
