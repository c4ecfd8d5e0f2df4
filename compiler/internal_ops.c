/* internal_ops.c - the compiler's own opdefs (see internal_ops.h). */
#include "internal_ops.h"

#include <string.h>

static const char *const iop_names[IOP_COUNT] = {
    "__fill", "__fill_inplace", "__copy", "__add", "__accumulate", "__sumsq_accum",
    "__adamw", "__sgd", "__fill_bf16", "__add_bf16", "__accumulate_bf16", "__adamw_bf16",
    "__sgd_bf16", "__fill_f16", "__add_f16", "__accumulate_f16", "__adamw_f16", "__sgd_f16",
};

/* The half variants' kernels, by kind (NULL: not a half variant) */
static const char *const iop_half_symbols[IOP_COUNT] = {
    [IOP_FILL_BF16] = "moek_fill_bf16", [IOP_ADD_BF16] = "moek_add_fwd_bf16",
    [IOP_ACCUMULATE_BF16] = "moek_accumulate_bf16", [IOP_ADAMW_BF16] = "moek_adamw_bf16",
    [IOP_SGD_BF16] = "moek_sgd_bf16",
    [IOP_FILL_F16] = "moek_fill_f16", [IOP_ADD_F16] = "moek_add_fwd_f16",
    [IOP_ACCUMULATE_F16] = "moek_accumulate_f16", [IOP_ADAMW_F16] = "moek_adamw_f16",
    [IOP_SGD_F16] = "moek_sgd_f16",
};

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

/* Fills in one opdef; every internal op has the single dim "n". */
static void iop_build(ir_opdef *d, iop_kind kind)
{
    memset(d, 0, sizeof *d);
    d->name = iop_names[kind];
    d->ndims = 1;
    d->dim_names[0] = "n";
    d->bwd_kind = IR_BWD_NONE;
    switch (kind) {
    case IOP_FILL_BF16:
    case IOP_ADD_BF16:
    case IOP_ACCUMULATE_BF16:
    case IOP_FILL_F16:
    case IOP_ADD_F16:
    case IOP_ACCUMULATE_F16:
        /* same template as the fp32 op, the half kernel */
        iop_build(d, kind == IOP_FILL_BF16 || kind == IOP_FILL_F16 ? IOP_FILL
                     : kind == IOP_ADD_BF16 || kind == IOP_ADD_F16 ? IOP_ADD
                                                                  : IOP_ACCUMULATE);
        d->name = iop_names[kind];
        d->fwd_symbol = iop_half_symbols[kind];
        break;
    case IOP_ADAMW_BF16:
    case IOP_ADAMW_F16: {
        /* moek_adamw_<half>(p, master, g, m, v, n, hyper, norm_sq, weight_decay) */
        const ir_ref t[] = {R_IN(0), R_IN(1), R_IN(2), R_IN(3), R_IN(4), R_DIM(0), R_IN(5), R_IN(6),
                            R_ATTR(0)};
        static const char *const in[] = {"p", "master", "g", "m", "v", "hyper", "norm_sq"};
        d->ninputs = 7;
        memcpy(d->input_names, in, sizeof in);
        d->nattrs = 1;
        d->attr_names[0] = "weight_decay";
        d->attr_kinds[0] = PLAN_ARG_F32;
        d->fwd_symbol = iop_half_symbols[kind];
        d->nfwd = 9;
        memcpy(d->fwd, t, sizeof t);
        break;
    }
    case IOP_SGD_BF16:
    case IOP_SGD_F16: {
        /* moek_sgd_<half>(p, master, g, buf, n, hyper, norm_sq, weight_decay) */
        const ir_ref t[] = {R_IN(0), R_IN(1), R_IN(2), R_IN(3), R_DIM(0), R_IN(4), R_IN(5), R_ATTR(0)};
        static const char *const in[] = {"p", "master", "g", "buf", "hyper", "norm_sq"};
        d->ninputs = 6;
        memcpy(d->input_names, in, sizeof in);
        d->nattrs = 1;
        d->attr_names[0] = "weight_decay";
        d->attr_kinds[0] = PLAN_ARG_F32;
        d->fwd_symbol = iop_half_symbols[kind];
        d->nfwd = 8;
        memcpy(d->fwd, t, sizeof t);
        break;
    }
    case IOP_FILL: {
        const ir_ref t[] = {R_OUT(0), R_DIM(0), R_ATTR(0)};
        d->noutputs = 1;
        d->output_names[0] = "y";
        d->nattrs = 1;
        d->attr_names[0] = "value";
        d->attr_kinds[0] = PLAN_ARG_F32;
        d->fwd_symbol = "moek_fill";
        d->nfwd = 3;
        memcpy(d->fwd, t, sizeof t);
        break;
    }
    case IOP_FILL_INPLACE: {
        const ir_ref t[] = {R_IN(0), R_DIM(0), R_ATTR(0)};
        d->ninputs = 1;
        d->input_names[0] = "x";
        d->nattrs = 1;
        d->attr_names[0] = "value";
        d->attr_kinds[0] = PLAN_ARG_F32;
        d->fwd_symbol = "moek_fill";
        d->nfwd = 3;
        memcpy(d->fwd, t, sizeof t);
        break;
    }
    case IOP_COPY: {
        const ir_ref t[] = {R_IN(0), R_OUT(0), R_DIM(0)};
        d->ninputs = 1;
        d->input_names[0] = "x";
        d->noutputs = 1;
        d->output_names[0] = "y";
        d->fwd_symbol = "moek_copy";
        d->nfwd = 3;
        memcpy(d->fwd, t, sizeof t);
        break;
    }
    case IOP_ADD: {
        const ir_ref t[] = {R_IN(0), R_IN(1), R_OUT(0), R_DIM(0)};
        d->ninputs = 2;
        d->input_names[0] = "a";
        d->input_names[1] = "b";
        d->noutputs = 1;
        d->output_names[0] = "y";
        d->fwd_symbol = "moek_add_fwd";
        d->nfwd = 4;
        memcpy(d->fwd, t, sizeof t);
        break;
    }
    case IOP_ACCUMULATE:
    case IOP_SUMSQ_ACCUM: {
        const ir_ref t[] = {R_IN(0), R_IN(1), R_DIM(0)};
        d->ninputs = 2;
        d->input_names[0] = kind == IOP_ACCUMULATE ? "dst" : "x";
        d->input_names[1] = kind == IOP_ACCUMULATE ? "src" : "acc";
        d->fwd_symbol = kind == IOP_ACCUMULATE ? "moek_accumulate" : "moek_sumsq_accum";
        d->nfwd = 3;
        memcpy(d->fwd, t, sizeof t);
        break;
    }
    case IOP_ADAMW: {
        /* moek_adamw(p, g, m, v, n, hyper, norm_sq, weight_decay) */
        const ir_ref t[] = {R_IN(0), R_IN(1), R_IN(2), R_IN(3), R_DIM(0), R_IN(4), R_IN(5),
                            R_ATTR(0)};
        static const char *const in[] = {"p", "g", "m", "v", "hyper", "norm_sq"};
        d->ninputs = 6;
        memcpy(d->input_names, in, sizeof in);
        d->nattrs = 1;
        d->attr_names[0] = "weight_decay";
        d->attr_kinds[0] = PLAN_ARG_F32;
        d->fwd_symbol = "moek_adamw";
        d->nfwd = 8;
        memcpy(d->fwd, t, sizeof t);
        break;
    }
    case IOP_SGD: {
        /* moek_sgd(p, g, buf, n, hyper, norm_sq, weight_decay) */
        const ir_ref t[] = {R_IN(0), R_IN(1), R_IN(2), R_DIM(0), R_IN(3), R_IN(4), R_ATTR(0)};
        static const char *const in[] = {"p", "g", "buf", "hyper", "norm_sq"};
        d->ninputs = 5;
        memcpy(d->input_names, in, sizeof in);
        d->nattrs = 1;
        d->attr_names[0] = "weight_decay";
        d->attr_kinds[0] = PLAN_ARG_F32;
        d->fwd_symbol = "moek_sgd";
        d->nfwd = 7;
        memcpy(d->fwd, t, sizeof t);
        break;
    }
    case IOP_COUNT:
        break;
    }
}

const ir_opdef *iop_def(ir_graph *g, iop_kind kind)
{
    const ir_opdef *d = ir_def_find(g, iop_names[kind]);
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
