/* internal_ops.c - the compiler's own opdefs (see internal_ops.h). */
#include "internal_ops.h"

#include <string.h>

const char *iop_half_suffix(int dtype)
{
    return dtype == PLAN_BF16 ? "_bf16" : dtype == PLAN_F16 ? "_f16" : NULL;
}

const char *iop_half_name(int dtype)
{
    return dtype == PLAN_BF16 ? "bf16" : dtype == PLAN_F16 ? "fp16" : NULL;
}

#define R_IN(i) {IR_REF_IN, (i), 0, 0}
#define R_OUT(i) {IR_REF_OUT, (i), 0, 0}
#define R_DIM(i) {IR_REF_DIM, (i), 0, 0}
#define R_ATTR(i) {IR_REF_ATTR, (i), 0, 0}

/* One row per internal op: its name, kernel, port names, at most one fp32
 * attribute, and the kernel's argument list.  Every internal op has the
 * single dim "n" and no backward.  A half variant differs from its fp32 op
 * in the kernel only, except the optimizers, which also take the fp32
 * master copy. */
typedef struct iop_spec {
    const char *name, *symbol;
    const char *in[IR_MAX_PORTS], *out[IR_MAX_PORTS];   /* NULL-terminated */
    const char *attr;
    int nargs;
    ir_ref args[PLAN_MAX_KERNEL_ARGS];
} iop_spec;

#define FILL(name, sym) {name, sym, {NULL}, {"y"}, "value", 3, {R_OUT(0), R_DIM(0), R_ATTR(0)}}
#define ADD(name, sym) {name, sym, {"a", "b"}, {"y"}, NULL, 4, {R_IN(0), R_IN(1), R_OUT(0), R_DIM(0)}}
#define ACCUMULATE(name, sym) {name, sym, {"dst", "src"}, {NULL}, NULL, 3, {R_IN(0), R_IN(1), R_DIM(0)}}
/* moek_adamw_<half>(p, master, g, m, v, n, hyper, norm_sq, weight_decay) */
#define ADAMW_HALF(name, sym)                                                               \
    {name, sym, {"p", "master", "g", "m", "v", "hyper", "norm_sq"}, {NULL}, "weight_decay", 9, \
     {R_IN(0), R_IN(1), R_IN(2), R_IN(3), R_IN(4), R_DIM(0), R_IN(5), R_IN(6), R_ATTR(0)}}
/* moek_sgd_<half>(p, master, g, buf, n, hyper, norm_sq, weight_decay) */
#define SGD_HALF(name, sym)                                                                 \
    {name, sym, {"p", "master", "g", "buf", "hyper", "norm_sq"}, {NULL}, "weight_decay", 8,    \
     {R_IN(0), R_IN(1), R_IN(2), R_IN(3), R_DIM(0), R_IN(4), R_IN(5), R_ATTR(0)}}

static const iop_spec iop_specs[IOP_COUNT] = {
    [IOP_FILL] = FILL("__fill", "moek_fill"),
    [IOP_FILL_INPLACE] = {"__fill_inplace", "moek_fill", {"x"}, {NULL}, "value", 3,
                          {R_IN(0), R_DIM(0), R_ATTR(0)}},
    [IOP_COPY] = {"__copy", "moek_copy", {"x"}, {"y"}, NULL, 3, {R_IN(0), R_OUT(0), R_DIM(0)}},
    [IOP_ADD] = ADD("__add", "moek_add_fwd"),
    [IOP_ACCUMULATE] = ACCUMULATE("__accumulate", "moek_accumulate"),
    [IOP_SUMSQ_ACCUM] = {"__sumsq_accum", "moek_sumsq_accum", {"x", "acc"}, {NULL}, NULL, 3,
                         {R_IN(0), R_IN(1), R_DIM(0)}},
    /* moek_adamw(p, g, m, v, n, hyper, norm_sq, weight_decay) */
    [IOP_ADAMW] = {"__adamw", "moek_adamw", {"p", "g", "m", "v", "hyper", "norm_sq"}, {NULL},
                   "weight_decay", 8,
                   {R_IN(0), R_IN(1), R_IN(2), R_IN(3), R_DIM(0), R_IN(4), R_IN(5), R_ATTR(0)}},
    /* moek_sgd(p, g, buf, n, hyper, norm_sq, weight_decay) */
    [IOP_SGD] = {"__sgd", "moek_sgd", {"p", "g", "buf", "hyper", "norm_sq"}, {NULL}, "weight_decay",
                 7, {R_IN(0), R_IN(1), R_IN(2), R_DIM(0), R_IN(3), R_IN(4), R_ATTR(0)}},
    [IOP_FILL_BF16] = FILL("__fill_bf16", "moek_fill_bf16"),
    [IOP_ADD_BF16] = ADD("__add_bf16", "moek_add_fwd_bf16"),
    [IOP_ACCUMULATE_BF16] = ACCUMULATE("__accumulate_bf16", "moek_accumulate_bf16"),
    [IOP_ADAMW_BF16] = ADAMW_HALF("__adamw_bf16", "moek_adamw_bf16"),
    [IOP_SGD_BF16] = SGD_HALF("__sgd_bf16", "moek_sgd_bf16"),
    [IOP_FILL_F16] = FILL("__fill_f16", "moek_fill_f16"),
    [IOP_ADD_F16] = ADD("__add_f16", "moek_add_fwd_f16"),
    [IOP_ACCUMULATE_F16] = ACCUMULATE("__accumulate_f16", "moek_accumulate_f16"),
    [IOP_ADAMW_F16] = ADAMW_HALF("__adamw_f16", "moek_adamw_f16"),
    [IOP_SGD_F16] = SGD_HALF("__sgd_f16", "moek_sgd_f16"),
};

static void iop_build(ir_opdef *d, iop_kind kind)
{
    const iop_spec *sp = &iop_specs[kind];
    memset(d, 0, sizeof *d);
    d->name = sp->name;
    d->ndims = 1;
    d->dim_names[0] = "n";
    d->bwd_kind = IR_BWD_NONE;
    for (int i = 0; i < IR_MAX_PORTS && sp->in[i]; i++)
        d->input_names[d->ninputs++] = sp->in[i];
    for (int i = 0; i < IR_MAX_PORTS && sp->out[i]; i++)
        d->output_names[d->noutputs++] = sp->out[i];
    if (sp->attr) {
        d->nattrs = 1;
        d->attr_names[0] = sp->attr;
        d->attr_kinds[0] = PLAN_ARG_F32;
    }
    d->fwd_symbol = sp->symbol;
    d->nfwd = sp->nargs;
    memcpy(d->fwd, sp->args, sizeof sp->args);
}

const ir_opdef *iop_def(ir_graph *g, iop_kind kind)
{
    const ir_opdef *d = ir_def_find(g, iop_specs[kind].name);
    if (d)
        return d;
    ir_opdef def;
    iop_build(&def, kind);
    return ir_def_add(g, &def);
}

iop_kind iop_for_dtype(iop_kind kind, int dtype)
{
    bool f16 = dtype == PLAN_F16;
    if (dtype != PLAN_BF16 && !f16)
        return kind;
    switch (kind) {
    case IOP_FILL: return f16 ? IOP_FILL_F16 : IOP_FILL_BF16;
    case IOP_ADD: return f16 ? IOP_ADD_F16 : IOP_ADD_BF16;
    case IOP_ACCUMULATE: return f16 ? IOP_ACCUMULATE_F16 : IOP_ACCUMULATE_BF16;
    case IOP_ADAMW: return f16 ? IOP_ADAMW_F16 : IOP_ADAMW_BF16;
    case IOP_SGD: return f16 ? IOP_SGD_F16 : IOP_SGD_BF16;
    default: return kind;
    }
}

int iop_is_internal(const ir_opdef *def)
{
    return def && def->name && strncmp(def->name, "__", 2) == 0;
}

iop_kind iop_kind_of(const ir_opdef *def)
{
    if (!iop_is_internal(def))
        return IOP_COUNT;
    for (int k = 0; k < IOP_COUNT; k++)
        if (strcmp(def->name, iop_specs[k].name) == 0)
            return (iop_kind)k;
    return IOP_COUNT;
}

int iop_node(ir_graph *g, iop_kind kind, const int *inputs, const int *outputs, int64_t n,
             double a0, int phase, ir_srcloc loc, const char *what)
{
    ir_node node;
    memset(&node, 0, sizeof node);
    node.def = iop_def(g, kind);
    for (int i = 0; i < IR_MAX_PORTS; i++) {
        node.inputs[i] = i < node.def->ninputs ? inputs[i] : -1;
        node.outputs[i] = i < node.def->noutputs ? outputs[i] : -1;
        node.grads_in[i] = node.grads_out[i] = -1;
    }
    node.dims[0] = n;
    node.attrs[0].f = a0;
    node.phase = (uint8_t)phase;
    node.grad_of = -1;
    node.loc = loc;
    node.what = what;
    return ir_node_add(g, &node);
}

const ir_ref *iop_template(const ir_node *n, int *count)
{
    *count = n->is_backward ? n->def->nbwd : n->def->nfwd;
    return n->is_backward ? n->def->bwd : n->def->fwd;
}

const char *iop_symbol(const ir_node *n)
{
    return n->is_backward ? n->def->bwd_symbol : n->def->fwd_symbol;
}

int iop_ref_value(const ir_node *n, const ir_ref *r)
{
    if (r->index < 0 || r->index >= IR_MAX_PORTS)
        return r->kind <= IR_REF_DOUT ? -1 : -2;
    switch (r->kind) {
    case IR_REF_IN: return n->inputs[r->index];
    case IR_REF_OUT: return n->outputs[r->index];
    case IR_REF_DIN: return n->is_backward ? n->grads_out[r->index] : -1;
    case IR_REF_DOUT: return n->is_backward ? n->grads_in[r->index] : -1;
    default: return -2;
    }
}
