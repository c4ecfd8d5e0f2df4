/* memplan.h - what the memory planner shares with emit, dump, explain and
 * the tests.  After pass_memplan, a value is in the plan iff its pool >= 0;
 * pool index == storage class (enum plan_storage). */
#ifndef MOEC_MEMPLAN_H
#define MOEC_MEMPLAN_H

#include <stddef.h>

#include "ir.h"

/* Activation recompute policy, train { recompute = ... } (docs/memory.md):
 * which forward values backward reads are re-computed inside the backward
 * phase (compiler/recompute.c) instead of being kept from the forward pass. */
enum memplan_recompute {
    MEMPLAN_RECOMPUTE_NONE = 0,       /* keep everything backward reads */
    MEMPLAN_RECOMPUTE_SELECTIVE = 1,  /* re-run cheap elementwise / per-row ops */
    MEMPLAN_RECOMPUTE_FULL = 2,       /* keep only the residual stream (add outputs) */
};
/* "none", "selective", "full" ("?" for anything else) */
const char *memplan_recompute_name(int policy);

/* first[v] / last[v]: first and last node whose kernel template touches
 * value v (read or write), -1 when none does.  Arrays of g->nvalues. */
void memplan_liveness(const ir_graph *g, int *first, int *last);
/* An activation kept for the whole step: loss, logits, metrics, norm_sq. */
int memplan_pinned(const ir_graph *g, int v);
/* Bytes a value takes in its pool: its size rounded up to PLAN_ALIGN. */
uint64_t memplan_size(const ir_value *v);
/* Largest sum of simultaneously live activation sizes (a lower bound for the
 * activation pool; the pool adds fragmentation). */
uint64_t memplan_peak_live(const ir_graph *g);
/* Checks the plan: every offset aligned and inside its pool, no two values
 * that are live at the same time overlap.  0, or -1 with a reason in why. */
int memplan_verify(const ir_graph *g, char *why, size_t whylen);

#endif
