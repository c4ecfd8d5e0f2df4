/* explain.h - the model counts --explain prints and the plan records. */
#ifndef MOEC_EXPLAIN_H
#define MOEC_EXPLAIN_H

#include <stdint.h>

#include "ir.h"

typedef struct explain_counts {
    uint64_t params;          /* trainable + frozen weights, tied ones once, no buffers */
    uint64_t expert_params;   /* of which expert-sharded (expert_axis >= 0) */
    uint64_t active_params;   /* sum of numel * active_fraction */
    int attn_layers;          /* forward attention nodes (L) */
    uint64_t attn_ct;         /* sum over them of C*T = H*Dh*T */
    uint64_t flops_per_token; /* 6 * active + 6 * sum(C*T) */
} explain_counts;

void explain_count(const ir_graph *g, explain_counts *c);

#endif
