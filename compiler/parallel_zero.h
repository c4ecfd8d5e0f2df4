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

/* ZeRO-3 prefetch groups, for the schedule pass: grp[v] (nvalues entries)
 * is the group of the gathered copy v - the layer of its param, per phase -
 * numbered in the order the groups' gathers first appear in g's node order,
 * and -1 for every other value.  The compiler issues the gathers of group
 * k + 1 before the first reader of group k (one layer ahead); a schedule
 * keeps that when every gather of group k + 1 precedes every reader of
 * group k.  Returns the number of groups (0 without ZeRO-3). */
int zero3_prefetch_groups(const ir_graph *g, int *grp);

/* Whether node ni is a ZeRO-3 gather (its output is the gathered copy). */
bool zero3_is_gather(const ir_graph *g, int ni);
/* Whether value v is a ZeRO-3 gathered copy of a param (an activation that
 * stands for the weight: fused-op workspace sizing treats it as one). */
bool zero3_is_gathered(const ir_graph *g, int v);

#endif
