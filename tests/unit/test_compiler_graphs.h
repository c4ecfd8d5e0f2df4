/* test_compiler_graphs.h - hand-built forward graphs for the compiler pass
 * tests (no parser needed).  The opdefs mirror kernels/moek.h the way the
 * stdlib's `extern op` declarations do. */
#ifndef TEST_COMPILER_GRAPHS_H
#define TEST_COMPILER_GRAPHS_H

#include <string.h>

#include "../../compiler/internal_ops.h"
#include "../../compiler/ir.h"
#include "../../compiler/passes.h"

#define T_IN(i) {IR_REF_IN, (i), 0, 0}
#define T_OUT(i) {IR_REF_OUT, (i), 0, 0}
#define T_DIN(i) {IR_REF_DIN, (i), 0, 0}
#define T_DOUT(i) {IR_REF_DOUT, (i), 0, 0}
#define T_DIM(i) {IR_REF_DIM, (i), 0, 0}
#define T_ATTR(i) {IR_REF_ATTR, (i), 0, 0}

/* registers d, or returns the def already registered under its name */
static inline const ir_opdef *tg_reg(ir_graph *g, const ir_opdef *d)
{
    const ir_opdef *old = ir_def_find(g, d->name);
    return old ? old : ir_def_add(g, d);
}

static inline const ir_opdef *tg_def_embedding(ir_graph *g)
{
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = "embedding";
    d.ninputs = 2; d.noutputs = 1; d.ndims = 3;
    d.input_names[0] = "ids"; d.input_names[1] = "table"; d.output_names[0] = "out";
    d.input_diff[1] = true; d.output_diff[0] = true;
    d.dim_names[0] = "N"; d.dim_names[1] = "V"; d.dim_names[2] = "D";
    d.fwd_symbol = "moek_embedding_fwd";
    const ir_ref f[] = {T_IN(0), T_IN(1), T_OUT(0), T_DIM(0), T_DIM(1), T_DIM(2)};
    d.nfwd = 6; memcpy(d.fwd, f, sizeof f);
    d.bwd_kind = IR_BWD_KERNEL;
    d.bwd_symbol = "moek_embedding_bwd";
    const ir_ref b[] = {T_DOUT(0), T_IN(0), T_DIN(1), T_DIM(0), T_DIM(1), T_DIM(2)};
    d.nbwd = 6; memcpy(d.bwd, b, sizeof b);
    return tg_reg(g, &d);
}

static inline const ir_opdef *tg_def_matmul(ir_graph *g)
{
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = "matmul";
    d.ninputs = 2; d.noutputs = 1; d.ndims = 3;
    d.input_names[0] = "x"; d.input_names[1] = "w"; d.output_names[0] = "y";
    d.input_diff[0] = d.input_diff[1] = true; d.output_diff[0] = true;
    d.dim_names[0] = "N"; d.dim_names[1] = "K"; d.dim_names[2] = "M";
    d.fwd_symbol = "moek_matmul_fwd";
    const ir_ref f[] = {T_IN(0), T_IN(1), T_OUT(0), T_DIM(0), T_DIM(1), T_DIM(2)};
    d.nfwd = 6; memcpy(d.fwd, f, sizeof f);
    d.bwd_kind = IR_BWD_KERNEL;
    d.bwd_symbol = "moek_matmul_bwd";
    const ir_ref b[] = {T_DOUT(0), T_IN(0), T_IN(1), T_DIN(0), T_DIN(1), T_DIM(0), T_DIM(1), T_DIM(2)};
    d.nbwd = 8; memcpy(d.bwd, b, sizeof b);
    return tg_reg(g, &d);
}

static inline const ir_opdef *tg_def_rmsnorm(ir_graph *g)
{
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = "rmsnorm";
    d.ninputs = 2; d.noutputs = 2; d.ndims = 2; d.nattrs = 1;
    d.input_names[0] = "x"; d.input_names[1] = "w";
    d.output_names[0] = "y"; d.output_names[1] = "rstd";
    d.input_diff[0] = d.input_diff[1] = true; d.output_diff[0] = true;
    d.dim_names[0] = "N"; d.dim_names[1] = "D";
    d.attr_names[0] = "eps"; d.attr_kinds[0] = PLAN_ARG_F32;
    d.fwd_symbol = "moek_rmsnorm_fwd";
    const ir_ref f[] = {T_IN(0), T_IN(1), T_OUT(0), T_OUT(1), T_DIM(0), T_DIM(1), T_ATTR(0)};
    d.nfwd = 7; memcpy(d.fwd, f, sizeof f);
    d.bwd_kind = IR_BWD_KERNEL;
    d.bwd_symbol = "moek_rmsnorm_bwd";
    const ir_ref b[] = {T_DOUT(0), T_IN(0), T_IN(1), T_OUT(1), T_DIN(0), T_DIN(1), T_DIM(0), T_DIM(1)};
    d.nbwd = 8; memcpy(d.bwd, b, sizeof b);
    return tg_reg(g, &d);
}

/* the stdlib's residual add: elementwise, gradient passes through */
static inline const ir_opdef *tg_def_add(ir_graph *g)
{
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = "add";
    d.ninputs = 2; d.noutputs = 1; d.ndims = 1;
    d.input_names[0] = "a"; d.input_names[1] = "b"; d.output_names[0] = "y";
    d.input_diff[0] = d.input_diff[1] = true; d.output_diff[0] = true;
    d.dim_names[0] = "n";
    d.fwd_symbol = "moek_add_fwd";
    const ir_ref f[] = {T_IN(0), T_IN(1), T_OUT(0), T_DIM(0)};
    d.nfwd = 4; memcpy(d.fwd, f, sizeof f);
    d.bwd_kind = IR_BWD_PASSTHROUGH;
    return tg_reg(g, &d);
}

static inline const ir_opdef *tg_def_ce(ir_graph *g)
{
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = "cross_entropy";
    d.ninputs = 2; d.noutputs = 2; d.ndims = 2;
    d.input_names[0] = "logits"; d.input_names[1] = "targets";
    d.output_names[0] = "loss"; d.output_names[1] = "lse";
    d.input_diff[0] = true; d.output_diff[0] = true;
    d.dim_names[0] = "N"; d.dim_names[1] = "V";
    d.fwd_symbol = "moek_cross_entropy_fwd";
    const ir_ref f[] = {T_IN(0), T_IN(1), T_OUT(0), T_OUT(1), T_DIM(0), T_DIM(1)};
    d.nfwd = 6; memcpy(d.fwd, f, sizeof f);
    d.bwd_kind = IR_BWD_KERNEL;
    d.bwd_symbol = "moek_cross_entropy_bwd";
    const ir_ref b[] = {T_DOUT(0), T_IN(0), T_IN(1), T_OUT(1), T_DIN(0), T_DIM(0), T_DIM(1)};
    d.nbwd = 7; memcpy(d.bwd, b, sizeof b);
    return tg_reg(g, &d);
}

static inline const ir_opdef *tg_def_attention(ir_graph *g)
{
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = "attention";
    d.ninputs = 3; d.noutputs = 2; d.ndims = 4;
    d.input_names[0] = "q"; d.input_names[1] = "k"; d.input_names[2] = "v";
    d.output_names[0] = "o"; d.output_names[1] = "lse";
    d.input_diff[0] = d.input_diff[1] = d.input_diff[2] = true; d.output_diff[0] = true;
    d.dim_names[0] = "B"; d.dim_names[1] = "T"; d.dim_names[2] = "H"; d.dim_names[3] = "Dh";
    d.fwd_symbol = "moek_attention_fwd";
    const ir_ref f[] = {T_IN(0), T_IN(1), T_IN(2), T_OUT(0), T_OUT(1), T_DIM(0), T_DIM(1),
                        T_DIM(2), T_DIM(3)};
    d.nfwd = 9; memcpy(d.fwd, f, sizeof f);
    d.bwd_kind = IR_BWD_KERNEL;
    d.bwd_symbol = "moek_attention_bwd";
    const ir_ref b[] = {T_DOUT(0), T_IN(0), T_IN(1), T_IN(2), T_OUT(0), T_OUT(1), T_DIN(0),
                        T_DIN(1), T_DIN(2), T_DIM(0), T_DIM(1), T_DIM(2), T_DIM(3)};
    d.nbwd = 13; memcpy(d.bwd, b, sizeof b);
    return tg_reg(g, &d);
}

static inline int tg_value(ir_graph *g, const char *name, int dtype, int storage, int64_t d0, int64_t d1)
{
    int64_t shape[2] = {d0, d1};
    return ir_value_add(g, name, dtype, storage, d1 > 0 ? 2 : 1, shape);
}

static inline int tg_param(ir_graph *g, const char *name, int64_t d0, int64_t d1, bool decay)
{
    int v = tg_value(g, name, PLAN_F32, PLAN_ST_PARAM, d0, d1);
    ir_param p;
    memset(&p, 0, sizeof p);
    p.grad = p.state0 = p.state1 = -1;
    p.init = PLAN_INIT_NORMAL;
    p.init_std = 0.02f;
    p.decay = decay;
    p.expert_axis = -1;
    p.tied_to = -1;
    p.active_fraction = 1.0f;
    p.loc.file = "t.moe";
    p.loc.line = 1;
    p.loc.col = 1;
    ir_param_add(g, v, &p);
    return v;
}

/* Appends a forward node; ins/outs terminated by -2; dims in def order. */
static inline int tg_node(ir_graph *g, const ir_opdef *def, const int *ins, const int *outs,
                   const int64_t *dims, double attr0, int line)
{
    ir_node n;
    memset(&n, 0, sizeof n);
    n.def = def;
    for (int i = 0; i < IR_MAX_PORTS; i++)
        n.inputs[i] = n.outputs[i] = n.grads_in[i] = n.grads_out[i] = -1;
    for (int i = 0; i < def->ninputs; i++)
        n.inputs[i] = ins[i];
    for (int i = 0; i < def->noutputs; i++)
        n.outputs[i] = outs[i];
    for (int i = 0; i < def->ndims; i++)
        n.dims[i] = dims[i];
    n.attrs[0].f = attr0;
    n.phase = PLAN_PHASE_FORWARD;
    n.grad_of = -1;
    n.loc.file = "t.moe";
    n.loc.line = line;
    n.loc.col = 5;
    n.what = def->name;
    return ir_node_add(g, &n);
}

/* The sizes every graph below uses: N tokens (B=2 x T=3), vocab V, width D. */
enum { TG_B = 2, TG_T = 3, TG_N = 6, TG_V = 5, TG_D = 4 };

typedef struct tg_ids {
    int tokens, targets, wte, w1, gnorm, lm_head;
    int h, a, r, n, rstd, logits, loss, lse;
    int n_embed, n_mm1, n_add, n_mm2, n_ce, n_norm;
} tg_ids;

static inline void tg_inputs(ir_graph *g, tg_ids *t)
{
    g->model_name = "test";
    t->tokens = tg_value(g, "tokens", PLAN_I32, PLAN_ST_INPUT, TG_B, TG_T);
    g->values[t->tokens].role = PLAN_ROLE_TOKENS;
    t->targets = tg_value(g, "targets", PLAN_I32, PLAN_ST_INPUT, TG_B, TG_T);
    g->values[t->targets].role = PLAN_ROLE_TARGETS;
    g->train.optimizer = PLAN_OPT_ADAMW;
    g->train.weight_decay = 0.1f;
    g->train.batch = TG_B;
    g->train.seq = TG_T;
    g->train.grad_accum = 1;
    g->train.vocab = TG_V;
}

static inline void tg_loss(ir_graph *g, tg_ids *t, int logits_src)
{
    t->loss = tg_value(g, "loss", PLAN_F32, PLAN_ST_ACT, 1, 0);
    g->values[t->loss].role = PLAN_ROLE_LOSS;
    t->lse = tg_value(g, "ce.lse", PLAN_F32, PLAN_ST_ACT, TG_N, 0);
    int ins[] = {logits_src, t->targets}, outs[] = {t->loss, t->lse};
    int64_t dims[] = {TG_N, TG_V};
    t->n_ce = tg_node(g, tg_def_ce(g), ins, outs, dims, 0, 9);
    g->loss = t->loss;
}

/* embedding -> matmul(w1) -> matmul(lm_head) -> cross_entropy */
static inline ir_graph *tg_chain(tg_ids *t)
{
    ir_graph *g = ir_graph_new();
    memset(t, -1, sizeof *t);
    tg_inputs(g, t);
    t->wte = tg_param(g, "wte", TG_V, TG_D, true);
    t->w1 = tg_param(g, "w1", TG_D, TG_D, true);
    t->lm_head = tg_param(g, "lm_head", TG_V, TG_D, true);
    t->h = tg_value(g, "h", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int e_in[] = {t->tokens, t->wte}, e_out[] = {t->h};
    int64_t e_dims[] = {TG_N, TG_V, TG_D};
    t->n_embed = tg_node(g, tg_def_embedding(g), e_in, e_out, e_dims, 0, 2);
    t->a = tg_value(g, "a", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int m_in[] = {t->h, t->w1}, m_out[] = {t->a};
    int64_t m_dims[] = {TG_N, TG_D, TG_D};
    t->n_mm1 = tg_node(g, tg_def_matmul(g), m_in, m_out, m_dims, 0, 3);
    t->logits = tg_value(g, "logits", PLAN_F32, PLAN_ST_ACT, TG_N, TG_V);
    int l_in[] = {t->a, t->lm_head}, l_out[] = {t->logits};
    int64_t l_dims[] = {TG_N, TG_D, TG_V};
    t->n_mm2 = tg_node(g, tg_def_matmul(g), l_in, l_out, l_dims, 0, 4);
    tg_loss(g, t, t->logits);
    return g;
}

/* h = embedding(tokens, wte); a = matmul(h, w1); r = h + a;
 * logits = matmul(r, head) where head is wte itself (same value) or, when
 * tied_param, a separate param tied_to wte; loss = cross_entropy. */
static inline ir_graph *tg_fanout(tg_ids *t, bool tied_param, bool with_norm)
{
    ir_graph *g = ir_graph_new();
    memset(t, -1, sizeof *t);
    tg_inputs(g, t);
    t->wte = tg_param(g, "wte", TG_V, TG_D, true);
    t->w1 = tg_param(g, "w1", TG_D, TG_D, true);
    int head = t->wte;
    if (tied_param) {
        t->lm_head = tg_param(g, "lm_head", TG_V, TG_D, true);
        g->params[g->values[t->lm_head].param].tied_to = g->values[t->wte].param;
        head = t->lm_head;
    }
    t->h = tg_value(g, "h", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int e_in[] = {t->tokens, t->wte}, e_out[] = {t->h};
    int64_t e_dims[] = {TG_N, TG_V, TG_D};
    t->n_embed = tg_node(g, tg_def_embedding(g), e_in, e_out, e_dims, 0, 2);
    int x = t->h;
    if (with_norm) {
        t->gnorm = tg_param(g, "gnorm", TG_D, 0, false);
        g->params[g->values[t->gnorm].param].init = PLAN_INIT_ONES;
        t->n = tg_value(g, "n", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
        t->rstd = tg_value(g, "rstd", PLAN_F32, PLAN_ST_ACT, TG_N, 0);
        int n_in[] = {t->h, t->gnorm}, n_out[] = {t->n, t->rstd};
        int64_t n_dims[] = {TG_N, TG_D};
        t->n_norm = tg_node(g, tg_def_rmsnorm(g), n_in, n_out, n_dims, 1e-5, 3);
        x = t->n;
    }
    t->a = tg_value(g, "a", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int m_in[] = {x, t->w1}, m_out[] = {t->a};
    int64_t m_dims[] = {TG_N, TG_D, TG_D};
    t->n_mm1 = tg_node(g, tg_def_matmul(g), m_in, m_out, m_dims, 0, 4);
    t->r = tg_value(g, "r", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int a_in[] = {t->h, t->a}, a_out[] = {t->r};
    int64_t a_dims[] = {TG_N * TG_D};
    t->n_add = tg_node(g, tg_def_add(g), a_in, a_out, a_dims, 0, 5);
    t->logits = tg_value(g, "logits", PLAN_F32, PLAN_ST_ACT, TG_N, TG_V);
    g->logits = t->logits;
    g->values[t->logits].role = PLAN_ROLE_LOGITS;
    int l_in[] = {t->r, head}, l_out[] = {t->logits};
    int64_t l_dims[] = {TG_N, TG_D, TG_V};
    t->n_mm2 = tg_node(g, tg_def_matmul(g), l_in, l_out, l_dims, 0, 6);
    tg_loss(g, t, t->logits);
    return g;
}

/* autodiff + optimizer + memplan; returns 0 or -1 (message in err) */
static inline int tg_compile(ir_graph *g, moec_error *err)
{
    if (pass_autodiff(g, err) < 0)
        return -1;
    if (pass_optimizer(g, err) < 0)
        return -1;
    return pass_memplan(g, err);
}

/* Index of the node with this grad_of, -1 if none. */
static inline int tg_bwd_of(const ir_graph *g, int fwd)
{
    for (int i = 0; i < g->nnodes; i++)
        if (g->nodes[i].is_backward && g->nodes[i].grad_of == fwd)
            return i;
    return -1;
}

static inline int tg_count_def(const ir_graph *g, const char *name)
{
    int c = 0;
    for (int i = 0; i < g->nnodes; i++)
        c += strcmp(g->nodes[i].def->name, name) == 0;
    return c;
}

#endif
