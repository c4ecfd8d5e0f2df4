/* parallel_ep.h - expert parallelism in the compiler (compiler/parallel_ep.c,
 * docs/parallel.md "Expert parallelism"). */
#ifndef MOEC_PARALLEL_EP_H
#define MOEC_PARALLEL_EP_H

#include "passes.h"

/* Called by pass_parallel when parallel { expert > 1 }: shards every expert
 * param (expert_axis 0) to its experts_per_rank slice, puts a count
 * all-to-all and a token all-to-all between each dispatch and its expert
 * matmuls and the reverse all-to-all before combine, then differentiates
 * the rewritten forward graph again (the backward of each exchange is the
 * opposite exchange).  0, or -1 with err. */
int parallel_ep_rewrite(ir_graph *g, moec_error *err);

/* Called by the optimizer pass after its grad-norm ops: with expert
 * parallelism each rank holds only its experts' gradients, so their sum of
 * squares is taken apart, summed over the expert-parallel group and added
 * to the norm, which then counts every expert once.  No-op otherwise. */
int parallel_ep_norm(ir_graph *g, int norm, moec_error *err);

#endif
