/* explain.h - the model counts --explain prints and the plan records. */
#ifndef MOEC_EXPLAIN_H
#define MOEC_EXPLAIN_H

#include <stdbool.h>
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

/* Kernel workspace the plan needs (plan_train.workspace_bytes): the CPU bf16
 * kernels widen their bf16 tensors into ctx->workspace, so the op with the
 * most bf16 elements decides (MOEK_BF16_WORKSPACE_BYTES); 0 without bf16. */
uint64_t explain_workspace_bytes(const ir_graph *g);

/* A forward attention node: its kernel symbol contains "attention" (the
 * test the 6LCT term and the recompute policy both use). */
bool explain_is_attention(const ir_node *n);

/* What the recompute pass added: forward ops re-run in the backward phase
 * (label suffix " (recompute)") and their forward FLOPs per token. */
typedef struct explain_recompute {
    int ops;                  /* re-run forward ops */
    uint64_t flops_dense;     /* per token, matmul + attention, the 2N + 2LCT convention */
    uint64_t flops_elementwise; /* per token, other ops: one FLOP per output element */
} explain_recompute;

void explain_recompute_cost(const ir_graph *g, explain_recompute *r);

#endif
