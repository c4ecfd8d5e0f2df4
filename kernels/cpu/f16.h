/* f16.h - helpers private to the CPU fp16 variants (f16.c): the two
 * conversions between fp32 and IEEE half.  Nothing here is ABI. */
#ifndef KF16_H
#define KF16_H

#include <stdint.h>
#include <string.h>

#include "../moek.h"

/* fp32 -> half, round to nearest even.  Three ranges:
 *  - from 65520 up (the midpoint between 65504, the largest half with an odd
 *    mantissa, and 2^16): Inf, as RNE says; Inf stays Inf;
 *  - normal halves (>= 2^-14): rebias the exponent (127 -> 15) and round the
 *    13 dropped mantissa bits as kbf16_round does its 16 (a carry into the
 *    exponent is the next binade, correct);
 *  - below 2^-14: a subnormal count of 2^-24 units, rounded by hand.
 * NaN is quieted and keeps the top of its payload (never becomes Inf). */
static inline moek_f16 kf16_round(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (moek_f16)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u)
        return (moek_f16)(sign | 0x7c00u);
    if (a >= 0x38800000u) {
        uint32_t r = a - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (moek_f16)(sign | (r >> 13));
    }
    uint32_t e = a >> 23;
    uint32_t shift = 126u - e;                  /* >= 14 here */
    if (shift > 24u)
        return (moek_f16)sign;                  /* below a quarter unit: 0 */
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t k = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (k & 1u)))
        k++;                                    /* may reach 0x400: the smallest normal */
    return (moek_f16)(sign | k);
}

/* half -> fp32 is exact (every half is an fp32). */
static inline float kf16_widen(moek_f16 h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0x1fu) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        u = sign | ((e + 112u) << 23) | (m << 13);
    } else {
        float v = (float)m * 5.9604644775390625e-8f;   /* m * 2^-24, exact */
        memcpy(&u, &v, sizeof u);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#endif
