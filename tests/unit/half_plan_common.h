/* half_plan_common.h - what test_bf16_plan.c and test_f16_plan.c share:
 * compiling a model (file or text) through every pass the plan tests need,
 * and counting the kernels a graph calls. */
#ifndef MOEC_HALF_PLAN_COMMON_H
#define MOEC_HALF_PLAN_COMMON_H

#include <stdio.h>
#include <string.h>

#include "diag.h"
#include "../../compiler/elaborate.h"
#include "../../compiler/internal_ops.h"
#include "../../compiler/passes.h"

/* Elaborates path (or text, named path) with stdlib_dir and runs autodiff,
 * optimizer and memplan; NULL on failure.  Diagnostics go to diag_out
 * (NULL: stderr). */
static ir_graph *hp_compile(const char *stdlib_dir, const char *path, const char *text,
                            FILE *diag_out)
{
    diag_ctx *d = diag_new(diag_out ? diag_out : stderr, 20);
    elab_options opt;
    memset(&opt, 0, sizeof opt);
    opt.stdlib_dir = stdlib_dir;
    if (text) {
        opt.text = text;
        opt.text_len = strlen(text);
    }
    ir_graph *g = elaborate(path, &opt, d);
    diag_free(d);
    if (!g)
        return NULL;
    moec_error err;
    memset(&err, 0, sizeof err);
    if (pass_autodiff(g, &err) || pass_optimizer(g, &err) || pass_memplan(g, &err)) {
        fprintf(stderr, "pass failed: %s\n", err.msg);
        ir_graph_free(g);
        return NULL;
    }
    return g;
}

static inline int hp_ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* nodes whose kernel is sym */
static inline int hp_count_sym(const ir_graph *g, const char *sym)
{
    int n = 0;
    for (int i = 0; i < g->nnodes; i++) {
        const char *s = iop_symbol(&g->nodes[i]);
        n += s && strcmp(s, sym) == 0;
    }
    return n;
}

/* nodes whose kernel ends with suffix */
static inline int hp_count_suffix(const ir_graph *g, const char *suffix)
{
    int n = 0;
    for (int i = 0; i < g->nnodes; i++) {
        const char *s = iop_symbol(&g->nodes[i]);
        n += s && hp_ends_with(s, suffix);
    }
    return n;
}

#endif
