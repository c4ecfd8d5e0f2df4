/* rng.h - a counter-based generator (splitmix64): the whole state is one
 * uint64, so it is trivially saved in checkpoints and resumed exactly. */
#ifndef MOEC_RNG_H
#define MOEC_RNG_H

#include <stdint.h>

typedef struct rng { uint64_t s; } rng;

rng rng_seeded(uint64_t seed, const char *stream);   /* independent stream per name */
uint64_t rng_next(rng *r);
double rng_uniform(rng *r);          /* [0, 1), 53 bits */
double rng_normal(rng *r);           /* N(0, 1), Box-Muller */
uint64_t rng_below(rng *r, uint64_t n);   /* [0, n), n > 0 */

#endif
