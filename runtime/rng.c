/* rng.c - splitmix64 and the distributions built on it. */
#include "rng.h"

#include <math.h>

#include "plan.h"

rng rng_seeded(uint64_t seed, const char *stream)
{
    uint64_t h = PLAN_FNV_OFFSET;
    for (const char *p = stream; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    rng r = {seed * 0x9E3779B97F4A7C15ull ^ h};
    rng_next(&r);    /* decorrelate nearby seeds */
    return r;
}

uint64_t rng_next(rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double rng_uniform(rng *r)
{
    return (double)(rng_next(r) >> 11) * 0x1.0p-53;
}

double rng_normal(rng *r)
{
    /* one output per pair keeps the state a single counter */
    double u1 = 1.0 - rng_uniform(r);    /* (0, 1]: log is finite */
    double u2 = rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

uint64_t rng_below(rng *r, uint64_t n)
{
    /* 128-bit multiply-shift: fast and bias below 2^-64 * n */
    return (uint64_t)(((unsigned __int128)rng_next(r) * n) >> 64);
}
