/* parallel_zero.h - ZeRO stages 1-3 over the data-parallel ranks
 * (compiler/parallel_zero.c, docs/parallel.md "ZeRO"). */
#ifndef MOEC_PARALLEL_ZERO_H
#define MOEC_PARALLEL_ZERO_H

#include "passes.h"

/* Checks parallel { zero } against the rest of the layout; called by
 * pass_parallel before it emits anything.  0, or -1 with err. */
int zero_check(const ir_graph *g, moec_error *err);

/* Shards the optimizer step the optimizer pass built: runs at its end (the
 * updates, the norm and the zeroing must exist), and only changes a plan
 * with parallel { zero >= 1 } and ranks > 1. */
int pass_zero(ir_graph *g, moec_error *err);

/* Elements of param p in the whole model, whatever the layout did to its
 * value: all experts (expert parallelism keeps this rank's), the whole
 * tensor (ZeRO-3 keeps a slice).  For parameter counts and --explain. */
int64_t zero_param_numel(const ir_graph *g, int p);

#endif
