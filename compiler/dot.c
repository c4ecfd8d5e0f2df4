/* dot.c - `moec --dot`: the graph as Graphviz (compiler/dot.h).
 *
 * A node reads every tensor argument of its kernel call that it does not
 * write; it writes its outputs (forward) or the input gradients (backward).
 * Internal ops that update in place (accumulate, the optimizer) write their
 * first argument too, so walking the ops in order and remembering each
 * tensor's last writer gives the edges of the step as it runs. */
#include "dot.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"

static const char *const dot_phase_color[] = {"#cfe2ff", "#ffd8b1", "#c8f7c5"};

/* A DOT string body: quotes and backslashes escaped, newlines as \n. */
static void dot_str(FILE *out, const char *s)
{
    for (; s && *s; s++) {
        if (*s == '"' || *s == '\\')
            fputc('\\', out);
        if (*s == '\n')
            fputs("\\n", out);
        else
            fputc(*s, out);
    }
}

static void dot_shape(FILE *out, const ir_value *v)
{
    fprintf(out, "%s[", ir_dtype_name(v->dtype));
    for (int d = 0; d < v->ndim; d++)
        fprintf(out, "%s%" PRId64, d ? "," : "", v->shape[d]);
    fputc(']', out);
}

/* The argument an internal op updates in place (read, then written), or -1:
 * the destination of accumulate, the sum of sumsq_accum, the parameter of
 * an optimizer step, the tensor an in-place fill clears. */
static int dot_inplace_arg(const ir_node *n, const ir_ref *t, int count)
{
    const char *s = iop_symbol(n);
    if (!iop_is_internal(n->def) || !s || count < 2)
        return -1;
    if (strncmp(s, "moek_sumsq_accum", 16) == 0)
        return 1;
    if (strncmp(s, "moek_accumulate", 15) == 0 || strncmp(s, "moek_adamw", 10) == 0 ||
        strncmp(s, "moek_sgd", 8) == 0 || (strncmp(s, "moek_fill", 9) == 0 && t[0].kind == IR_REF_IN))
        return 0;
    return -1;
}

/* Does argument a of n's template write its tensor? */
static bool dot_writes(const ir_node *n, const ir_ref *t, int a, int inplace)
{
    if (n->is_backward)
        return t[a].kind == IR_REF_DIN;
    return t[a].kind == IR_REF_OUT || a == inplace;
}

/* A tensor nobody computed before it is read: a box of its own. */
static void dot_source(const ir_graph *g, int v, bool *declared, FILE *out)
{
    if (declared[v])
        return;
    declared[v] = true;
    const ir_value *x = &g->values[v];
    bool param = x->storage == PLAN_ST_PARAM || x->storage == PLAN_ST_BUFFER;
    fprintf(out, "  v%d [shape=box, style=filled, fillcolor=\"%s\", label=\"", v,
            param ? "#fff3b0" : "#eeeeee");
    dot_str(out, x->name && x->name[0] ? x->name : "_");
    fputs("\\n", out);
    dot_shape(out, x);
    fprintf(out, " %s\"];\n", ir_storage_name(x->storage));
}

void dot_write(const ir_graph *g, FILE *out)
{
    int *writer = malloc((size_t)(g->nvalues > 0 ? g->nvalues : 1) * sizeof *writer);
    bool *declared = calloc((size_t)(g->nvalues > 0 ? g->nvalues : 1), sizeof *declared);
    if (!writer || !declared)
        abort();   /* out of memory: nothing useful to report */
    for (int v = 0; v < g->nvalues; v++)
        writer[v] = -1;
    fputs("digraph \"", out);
    dot_str(out, g->model_name ? g->model_name : "model");
    fputs("\" {\n  rankdir=TB;\n  node [fontname=\"Helvetica\", fontsize=10];\n"
          "  edge [fontname=\"Helvetica\", fontsize=8];\n", out);
    fprintf(out, "  legend [shape=plaintext, label=\"forward: blue   backward: orange   "
            "optimizer: green   params: yellow boxes\"];\n");
    for (int i = 0; i < g->nnodes; i++) {
        const ir_node *n = &g->nodes[i];
        int phase = n->phase <= PLAN_PHASE_OPTIMIZER ? n->phase : PLAN_PHASE_FORWARD;
        const char *sym = iop_symbol(n);
        fprintf(out, "  n%d [shape=ellipse, style=filled, fillcolor=\"%s\", label=\"", i,
                dot_phase_color[phase]);
        dot_str(out, n->what ? n->what : n->def->name);
        fputs("\\n", out);
        dot_str(out, sym ? sym : "?");
        fputs("\"];\n", out);
        int count;
        const ir_ref *t = iop_template(n, &count);
        int inplace = dot_inplace_arg(n, t, count);
        /* reads first (an in-place op reads its old value), then writes */
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v < 0 || v >= g->nvalues || (dot_writes(n, t, a, inplace) && a != inplace))
                continue;
            if (writer[v] >= 0) {
                fprintf(out, "  n%d -> n%d", writer[v], i);
            } else {
                dot_source(g, v, declared, out);
                fprintf(out, "  v%d -> n%d", v, i);
            }
            fputs(" [label=\"", out);
            dot_shape(out, &g->values[v]);
            fputs("\"];\n", out);
        }
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v < 0 || v >= g->nvalues || !dot_writes(n, t, a, inplace))
                continue;
            writer[v] = i;
            const ir_value *x = &g->values[v];
            if (phase == PLAN_PHASE_OPTIMIZER && (x->storage == PLAN_ST_PARAM || x->storage == PLAN_ST_BUFFER)) {
                dot_source(g, v, declared, out);
                fprintf(out, "  n%d -> v%d [style=dashed, constraint=false, label=\"update\"];\n", i, v);
            }
        }
    }
    fputs("}\n", out);
    free(writer);
    free(declared);
}
