/* passes.h - the compiler passes after elaboration, in the order moec runs
 * them (compiler/main.c):
 *
 *   elaborate   AST -> forward graph            (compiler/elaborate.c)
 *   autodiff    + backward nodes, param grads   (compiler/autodiff.c)
 *   parallel    + gradient all-reduce (ranks>1) (compiler/parallel.c)
 *   optimizer   + grad norm, AdamW/SGD, zeroing (compiler/optimizer.c)
 *   memplan     liveness -> pool offsets        (compiler/memplan.c)
 *   emit        graph -> plan.bin               (compiler/emit.c)
 *
 * Each pass returns 0 on success, or -1 after filling *err; the caller
 * prints err through the one diagnostic helper (lang/diag.h).
 */
#ifndef MOEC_PASSES_H
#define MOEC_PASSES_H

#include <stdio.h>

#include "ir.h"

typedef struct moec_error {
    ir_srcloc loc;        /* file NULL when the error has no source location */
    char msg[512];        /* what is wrong */
    char hint[256];       /* how to fix it ("" if none) */
} moec_error;

int pass_autodiff(ir_graph *g, moec_error *err);
int pass_parallel(ir_graph *g, moec_error *err);    /* compiler/parallel.c: collectives */
int pass_optimizer(ir_graph *g, moec_error *err);
int pass_recompute(ir_graph *g, moec_error *err);   /* compiler/recompute.c, before memplan */
int pass_memplan(ir_graph *g, moec_error *err);
int pass_emit(const ir_graph *g, const char *path, moec_error *err);

/* Optimisation passes (-O1: cse, dce; -O2 adds fuse, multi_tensor, schedule, inplace), one file
 * each, compiler/pass_<name>.c; docs/passes.md says what each does. */
int pass_cse(ir_graph *g, moec_error *err);        /* before autodiff: merge duplicate forward ops */
int pass_multi_tensor(ir_graph *g, moec_error *err); /* after optimizer: one update per group,
                                                        params as views of flat buffers */
int pass_dce(ir_graph *g, moec_error *err);        /* after optimizer: drop ops nothing reads */
int pass_schedule(ir_graph *g, moec_error *err);   /* after recompute: order for a lower peak */
int pass_inplace(ir_graph *g, moec_error *err);    /* last before memplan: outputs over inputs */
/* The in-place whitelist, by kernel symbol: entry i, NULL past the end. */
const char *pass_inplace_rule(int i);

/* --dump=ir: one line per value and per node, stable (golden-tested) */
void ir_dump(const ir_graph *g, FILE *out);
/* --explain: parameters, FLOPs per token, memory per pool, peak activations */
void explain_print(const ir_graph *g, FILE *out);
/* --explain: the process groups and collectives of parallel { } */
void parallel_explain(const ir_graph *g, FILE *out);

#endif
