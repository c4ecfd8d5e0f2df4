/* dump.c - `moec --dump=ir`: the graph as stable text, one line per value,
 * node and param (golden-tested, so the format only changes on purpose;
 * documented in docs/plan-format.md).
 *
 *   value v3 h f32[16,32] act @act+128
 *   node n2 forward "rmsnorm" moek_rmsnorm_fwd(v3, v1, v4, v5, N=16, D=32, eps=1e-05) at m.moe:4:9
 *   param p0 wte value=v1 grad=v9 state=v10,v11 init=normal(0.02) decay
 */
#include <inttypes.h>
#include <stdlib.h>

#include "internal_ops.h"
#include "passes.h"

static const char *dump_role(int role)
{
    static const char *const names[] = {"", "tokens", "targets", "hyper", "loss_seed", "loss",
                                        "logits", "norm_sq", "metric"};
    return role >= 0 && role <= PLAN_ROLE_METRIC ? names[role] : "?";
}

static const char *dump_phase(int phase)
{
    static const char *const names[] = {"forward", "backward", "optimizer"};
    return phase >= 0 && phase <= PLAN_PHASE_OPTIMIZER ? names[phase] : "?";
}

/* Shortest %g form that reads back as the same float: 0.1, not 0.100000001. */
static void dump_float(FILE *out, double x)
{
    char buf[32];
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, x);
        if ((float)strtod(buf, NULL) == (float)x)
            break;
    }
    fputs(buf, out);
}

static void dump_value(const ir_graph *g, int i, FILE *out)
{
    const ir_value *v = &g->values[i];
    fprintf(out, "value v%d %s %s[", i, v->name[0] ? v->name : "_", ir_dtype_name(v->dtype));
    for (int d = 0; d < v->ndim; d++)
        fprintf(out, "%s%" PRId64, d ? "," : "", v->shape[d]);
    fprintf(out, "] %s", ir_storage_name(v->storage));
    if (v->role)
        fprintf(out, " role=%s", dump_role(v->role));
    if (v->param >= 0)
        fprintf(out, " param=p%d", v->param);
    if (v->view_of >= 0)   /* a member of a flat buffer (pass_multi_tensor) */
        fprintf(out, " view=v%d+%" PRIu64, v->view_of, v->view_offset);
    if (v->pool >= 0)
        fprintf(out, " @%s+%" PRIu64, ir_storage_name(v->pool), v->offset);
    fputc('\n', out);
}

static void dump_node(const ir_graph *g, int i, FILE *out)
{
    const ir_node *n = &g->nodes[i];
    const ir_opdef *d = n->def;
    int count;
    const ir_ref *t = iop_template(n, &count);
    const char *sym = iop_symbol(n);
    fprintf(out, "node n%d %s \"%s\" %s(", i, dump_phase(n->phase), n->what ? n->what : d->name,
            sym ? sym : "?");
    for (int a = 0; a < count; a++) {
        const ir_ref *r = &t[a];
        fputs(a ? ", " : "", out);
        switch (r->kind) {
        case IR_REF_IN: case IR_REF_OUT: case IR_REF_DIN: case IR_REF_DOUT: {
            int v = iop_ref_value(n, r);
            if (v >= 0)
                fprintf(out, "v%d", v);
            else
                fputs("v?", out);
            break;
        }
        case IR_REF_DIM:
            if (r->index >= 0 && r->index < IR_MAX_SYMS)
                fprintf(out, "%s=%" PRId64, d->dim_names[r->index] ? d->dim_names[r->index] : "?",
                        n->dims[r->index]);
            break;
        case IR_REF_ATTR:
            if (r->index >= 0 && r->index < IR_MAX_SYMS) {
                const char *name = d->attr_names[r->index] ? d->attr_names[r->index] : "?";
                if (d->attr_kinds[r->index] == PLAN_ARG_I64)
                    fprintf(out, "%s=%" PRId64, name, n->attrs[r->index].i);
                else {
                    fprintf(out, "%s=", name);
                    dump_float(out, n->attrs[r->index].f);
                }
            }
            break;
        case IR_REF_INT:
            fprintf(out, "%" PRId64, r->i);
            break;
        case IR_REF_FLOAT:
            dump_float(out, r->f);
            break;
        }
    }
    fputc(')', out);
    if (n->is_backward)
        fprintf(out, " grad_of=n%d", n->grad_of);
    if (d->lib)
        fprintf(out, " from %s", d->lib);
    if (n->loc.file && n->loc.line > 0)
        fprintf(out, " at %s:%d:%d", n->loc.file, n->loc.line, n->loc.col);
    fputc('\n', out);
}

static void dump_param(const ir_graph *g, int i, FILE *out)
{
    const ir_param *p = &g->params[i];
    static const char *const inits[] = {"none", "zeros", "ones", "normal"};
    fprintf(out, "param p%d %s value=v%d", i, g->values[p->value].name, p->value);
    if (p->grad >= 0)
        fprintf(out, " grad=v%d", p->grad);
    if (p->state0 >= 0)
        fprintf(out, " state=v%d", p->state0);
    if (p->state1 >= 0)
        fprintf(out, ",v%d", p->state1);
    /* bf16/f16 params only: ir_param.master is set by the optimizer pass */
    if ((g->values[p->value].dtype == PLAN_BF16 || g->values[p->value].dtype == PLAN_F16) && p->master >= 0 && p->master < g->nvalues)
        fprintf(out, " master=v%d", p->master);
    fprintf(out, " init=%s", p->init <= PLAN_INIT_NORMAL ? inits[p->init] : "?");
    if (p->init == PLAN_INIT_NORMAL)
        fprintf(out, "(%.6g)", p->init_std);
    if (p->decay)
        fputs(" decay", out);
    if (p->frozen)
        fputs(" frozen", out);
    if (p->expert_axis >= 0)
        fprintf(out, " expert_axis=%d", p->expert_axis);
    if (p->tied_to >= 0)
        fprintf(out, " tied_to=p%d", p->tied_to);
    if (p->active_fraction > 0 && p->active_fraction != 1.0f)
        fprintf(out, " active=%.6g", p->active_fraction);
    fputc('\n', out);
}

void ir_dump(const ir_graph *g, FILE *out)
{
    fprintf(out, "graph %s: %d values, %d nodes, %d params\n", g->model_name, g->nvalues,
            g->nnodes, g->nparams);
    if (g->loss >= 0)
        fprintf(out, "loss v%d\n", g->loss);
    if (g->logits >= 0)
        fprintf(out, "logits v%d\n", g->logits);
    if (g->train.precision == PLAN_BF16)
        fputs("precision bf16\n", out);
    else if (g->train.precision == PLAN_F16)
        fputs("precision fp16\n", out);
    for (int i = 0; i < g->nvalues; i++)
        dump_value(g, i, out);
    for (int i = 0; i < g->nnodes; i++)
        dump_node(g, i, out);
    for (int i = 0; i < g->nparams; i++)
        dump_param(g, i, out);
    bool planned = false;
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        planned |= g->pool_bytes[s] != 0;
    if (planned) {
        fputs("pools", out);
        for (int s = 0; s < PLAN_ST_COUNT; s++)
            fprintf(out, " %s=%" PRId64, ir_storage_name(s), g->pool_bytes[s]);
        fputc('\n', out);
    }
}
