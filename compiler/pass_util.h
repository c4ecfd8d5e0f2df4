/* pass_util.h - what the optimisation passes (compiler/pass_*.c) share:
 * which kernel arguments a node writes, a node's side effects, and putting
 * the nodes in a new order (or dropping some) while keeping producer and
 * grad_of indices right. */
#ifndef MOEC_PASS_UTIL_H
#define MOEC_PASS_UTIL_H

#include <stdbool.h>

#include "ir.h"

/* True if the kernel writes the tensor that argument r of node n names:
 * a forward op's outputs, a backward op's input gradients, and every tensor
 * argument of an internal op without outputs (accumulate, fill in place,
 * the optimizer updates write their inputs). */
bool pu_writes(const ir_node *n, const ir_ref *r);
/* True if the kernel reads that tensor (an op without outputs both reads
 * and writes its inputs: accumulate reads its source). */
bool pu_reads(const ir_node *n, const ir_ref *r);

/* A node that must stay even if nothing reads what it writes: it writes a
 * value outside the activation pool or one the runtime reads (a role), it
 * has no outputs (it updates its inputs in place), or it reads a BUFFER
 * (the only state a forward op may update). */
bool pu_side_effect(const ir_graph *g, int ni);

/* True if value v is an activation no one outside the op list reads. */
bool pu_plain_act(const ir_graph *g, int v);

/* Rebuilds g->nodes as order[0..n) (old indices, each at most once; nodes
 * not listed are dropped), then resets every value's producer and every
 * backward node's grad_of (-1 when its forward node was dropped). */
void pu_reorder(ir_graph *g, const int *order, int n);

/* Largest sum of activation bytes (memplan_size) live at one node, by
 * first/last touch in the current order, pinned ones counted throughout.
 * Needs no memory plan, so it can compare orders before memplan runs. */
uint64_t pu_peak_bytes(const ir_graph *g);

/* The def of an op of the "@comm" library (runtime/comm.h), registered once
 * under name: int64 attributes, no backward.  ins, outs, dims and attrs are
 * NULL-terminated name lists (outs may be NULL: an op without outputs
 * updates its inputs in place); tmpl[0..nt) is the kernel's argument list. */
const ir_opdef *pu_comm_def(ir_graph *g, const char *name, const char *sym,
                            const char *const *ins, const char *const *outs,
                            const char *const *dims, const char *const *attrs,
                            const ir_ref *tmpl, int nt);
/* ... and the same def filled into *def, not registered: for an @comm op
 * that goes on to declare a backward (the expert exchange). */
void pu_comm_def_fill(ir_opdef *def, const char *name, const char *sym,
                      const char *const *ins, const char *const *outs,
                      const char *const *dims, const char *const *attrs,
                      const ir_ref *tmpl, int nt);

#endif
