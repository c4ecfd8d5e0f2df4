/* explain.h - the model counts --explain prints and the plan records. */
#ifndef MOEC_EXPLAIN_H
#define MOEC_EXPLAIN_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

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

/* Kernel workspace the plan needs on the CPU (plan_train.workspace_bytes):
 * the CPU half-precision kernels widen their tensors into ctx->workspace,
 * and fused ops over weight matrices keep fp32 scratch there, so the op
 * with the most such elements decides (MOEK_BF16_WORKSPACE_BYTES); 0 for
 * an fp32 plan without fused weight ops. */
uint64_t explain_workspace_bytes(const ir_graph *g);

/* ... and on a GPU (plan_train.gpu_workspace_bytes): the CUDA kernels
 * compute in the tensors' own precision, so only the fused ops' scratch
 * counts (kernels/moek.h: swiglu_proj_bwd 2NM + NK, matmul_bias_gelu_bwd NM,
 * softmax_topk_bwd NE fp32 elements; no forward kernel keeps any),
 * bounded by the bytes of each fused backward op's activation tensors
 * (every argument that is not a weight) plus alignment, and attention's
 * backward (D: one float per row, lse's size). */
uint64_t explain_gpu_workspace_bytes(const ir_graph *g);

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

/* One row of the per-pass table `moec --explain` ends with: the plan as it
 * stands after one pass of the pipeline (compiler/main.c). */
typedef struct explain_pass_row {
    const char *pass;
    int ops;                  /* nodes */
    uint64_t launches;        /* kernel calls per optimizer step: forward + backward ops
                                 x grad_accum, + optimizer ops */
    uint64_t peak_act;        /* live activation bytes at the worst op, current order */
    int64_t act_pool;         /* the act pool, -1 before memplan */
    double flops;             /* per optimizer step (explain_node_flops) */
} explain_pass_row;

/* FLOPs of one op: 2 x output elements x K for an op with a weight matrix
 * (matmul, grouped matmul), 4 x B x T x T x C for attention, one per
 * element written otherwise; a backward op twice its forward's. */
double explain_node_flops(const ir_graph *g, const ir_node *n);
void explain_pass_fill(const ir_graph *g, const char *pass, explain_pass_row *r);
void explain_pass_table(const explain_pass_row *rows, int n, FILE *out);

/* --layout ranks=R,expert=E,zero=Z: --explain for a parallel layout other
 * than parallel { }'s (the plan itself keeps parallel { }'s). */
typedef struct explain_layout {
    int64_t ranks, expert, zero;   /* -1 after parse: not given, parallel { }'s */
} explain_layout;

/* 0, or -1 with a one-line message naming the bad field in err. */
int explain_layout_parse(const char *spec, explain_layout *lay, char *err, size_t errlen);
/* Fills the fields not given from parallel { } and checks the layout
 * against the model as elaboration does (ranks % expert, experts % expert);
 * 0, or -1 with a message in err. */
int explain_layout_resolve(const ir_graph *g, explain_layout *lay, char *err, size_t errlen);
/* explain_print with lay's layout in the per-rank model-state table (NULL:
 * parallel { }'s). */
void explain_print_layout(const ir_graph *g, const explain_layout *lay, FILE *out);

/* Communication overlap at the final schedule (docs/parallel.md, "Overlap").
 * A model, not a measurement: compute ops run one after another at
 * EXPLAIN_OV_FLOPS FLOP/s (explain_node_flops); each collective starts on a
 * stream of its own when the compute reaches it and the link is free, moves
 * its ring-algorithm bytes at EXPLAIN_OV_LINK bytes/s, and the first later op
 * that touches one of its tensors waits for it.  The step is simulated three
 * times back to back (micro-steps: min(grad_accum, 4)) and the middle one
 * counted, so collectives at the end of a step overlap the next one. */
#define EXPLAIN_OV_FLOPS 50e12
#define EXPLAIN_OV_LINK 25e9

enum explain_ov_kind {
    EXPLAIN_OV_GRAD_ALLREDUCE,    /* gradient buckets (moec_comm_allreduce_f32_multi, bucket >= 0) */
    EXPLAIN_OV_REDUCE_SCATTER,    /* ZeRO-2 gradients */
    EXPLAIN_OV_ALLGATHER,         /* ZeRO parameters */
    EXPLAIN_OV_EP_EXCHANGE,       /* expert-parallel counts and rows */
    EXPLAIN_OV_OTHER,             /* small all-reduces: norms, expert loads */
    EXPLAIN_OV_KINDS
};

typedef struct explain_ov_row {
    int count;                /* per step (ops in forward/backward count once per micro-step) */
    double bytes;             /* tensor bytes the collectives carry per step */
    double window_flops;      /* compute between each issue and its first consumer, summed */
    double comm_s, hidden_s;  /* link time, and the part of it compute covers */
} explain_ov_row;

/* The kind of node ni, or -1 for a compute op (a ZeRO slice is a local copy). */
int explain_ov_kind_of(const ir_graph *g, int ni);
/* Fills rows[EXPLAIN_OV_KINDS]; all zero for a one-rank plan. */
void explain_overlap(const ir_graph *g, explain_ov_row *rows);
void explain_overlap_print(const ir_graph *g, FILE *out);

#endif
