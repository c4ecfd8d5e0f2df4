/* fuse.h - fusion rules and the fusion pass.
 *
 * A fused op declares, next to its kernels, the forward pattern it replaces:
 *
 *   extern op add_rms_norm(a: float[*N, D], b: float[*N, D], w: float[D], eps: float = 1e-5)
 *       -> (s: float[*N, D], y: float[*N, D], rstd: f32[N] saved) {
 *     forward  = ...   backward = ...
 *     fuses {
 *       s = add(a, b)
 *       y, rstd = rms_norm(s, w, eps = eps)
 *     }
 *   }
 *
 * Elaboration lowers the `fuses { }` body into an ir_fuse (fuse_rule_lower)
 * hung on the opdef; pass_fuse (compiler/pass_fuse.c) finds the pattern in
 * the forward graph and puts one node of the fused op in its place, before
 * autodiff, so the backward is the fused op's backward kernel.  The
 * compiler knows no pattern by name. */
#ifndef MOEC_FUSE_H
#define MOEC_FUSE_H

#include "ast.h"
#include "ir.h"
#include "passes.h"

#define IR_FUSE_MAX_OPS 4
#define IR_FUSE_MAX_SLOTS (IR_FUSE_MAX_OPS * 2 * IR_MAX_PORTS)

/* One call of the pattern.  A slot is a value of the pattern: a fused
 * input, a fused output or an intermediate. */
typedef struct ir_fuse_op {
    const char *op;                     /* the fp32 opdef name; its <bf16>/<f16> instances
                                           match the fused op's instance of the same dtype */
    int nin, nout, nattr;
    int in[IR_MAX_PORTS];               /* slot of each input */
    int out[IR_MAX_PORTS];              /* slot of each output; -1 unnamed: must be unused */
    int attr_src[IR_MAX_SYMS];          /* per attribute: the fused attr it equals, or -1 */
    ir_scalar attr_lit[IR_MAX_SYMS];    /* attr_src -1: the literal it must equal */
} ir_fuse_op;

typedef struct ir_fuse {
    int nops, nslots;
    ir_fuse_op ops[IR_FUSE_MAX_OPS];    /* in statement order: each reads only earlier slots */
    const char *slot_name[IR_FUSE_MAX_SLOTS];
    int slot_in[IR_FUSE_MAX_SLOTS];     /* the fused input it is, or -1 */
    int slot_out[IR_FUSE_MAX_SLOTS];    /* the fused output it is, or -1 (an intermediate) */
    /* each dim symbol of the fused op, read off the shape of fused input
     * dim_in: `*N` (star) is the product of the leading dims, a named dim
     * sits dim_back places from the end */
    int dim_in[IR_MAX_SYMS];
    bool dim_star[IR_MAX_SYMS];
    int dim_back[IR_MAX_SYMS];
} ir_fuse;

/* Lowers `fuses { ... }` (entry, inside extern op op_ast, whose lowered def
 * is fused) into *rule.  The pattern ops are looked up in g by name, so
 * every extern op must be lowered first.  Returns 0, or -1 after reporting
 * through d. */
int fuse_rule_lower(ir_graph *g, diag_ctx *d, const ast_node *op_ast, const ast_node *entry,
                    const ir_opdef *fused, ir_fuse *rule);

/* The pass: before autodiff (-O2). */
int pass_fuse(ir_graph *g, moec_error *err);

#endif
