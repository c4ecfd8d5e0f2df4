/* test_compiler_autodiff.c - the backward graph and the optimizer step built
 * by pass_autodiff and pass_optimizer on hand-built graphs: which backward
 * nodes exist, where gradients are summed, what frozen and tied params get,
 * and every error message of the two passes. */
#include "check.h"
#include "../../kernels/moek.h"
#include "test_compiler_graphs.h"

/* the node producing value v */
static const ir_node *producer(const ir_graph *g, int v)
{
    return v >= 0 && g->values[v].producer >= 0 ? &g->nodes[g->values[v].producer] : NULL;
}

static int param_of(const ir_graph *g, int v)
{
    return g->values[v].param;
}

/* the node of def name whose input slot `slot` is v, -1 if none */
static int find_user(const ir_graph *g, const char *def, int slot, int v)
{
    for (int i = 0; i < g->nnodes; i++)
        if (strcmp(g->nodes[i].def->name, def) == 0 && g->nodes[i].inputs[slot] == v)
            return i;
    return -1;
}

static void test_chain(void)
{
    tg_ids t;
    ir_graph *g = tg_chain(&t);
    moec_error err;
    int nfwd = g->nnodes;
    CHECK("chain: autodiff ok", pass_autodiff(g, &err) == 0, "%s", err.msg);
    /* one backward per forward node: ce, matmul x2, embedding */
    int bce = tg_bwd_of(g, t.n_ce), bm2 = tg_bwd_of(g, t.n_mm2), bm1 = tg_bwd_of(g, t.n_mm1),
        be = tg_bwd_of(g, t.n_embed);
    CHECK("chain: backward nodes exist", bce >= 0 && bm2 >= 0 && bm1 >= 0 && be >= 0,
          "%d %d %d %d", bce, bm2, bm1, be);
    CHECK("chain: reverse order", bce < bm2 && bm2 < bm1 && bm1 < be && bce >= nfwd,
          "%d %d %d %d", bce, bm2, bm1, be);
    const ir_node *n = &g->nodes[bce];
    CHECK("chain: seed is d(loss)", n->grads_in[0] >= 0 &&
          g->values[n->grads_in[0]].role == PLAN_ROLE_LOSS_SEED &&
          g->values[n->grads_in[0]].storage == PLAN_ST_INPUT &&
          ir_value_numel(&g->values[n->grads_in[0]]) == 1, "grads_in[0]=%d", n->grads_in[0]);
    CHECK("chain: no grad for targets", n->grads_out[1] == -1, "%d", n->grads_out[1]);
    CHECK("chain: backward metadata", n->phase == PLAN_PHASE_BACKWARD && n->is_backward &&
          strcmp(n->what, "cross_entropy (backward)") == 0 && n->loc.line == 9,
          "phase %d what %s line %d", n->phase, n->what, n->loc.line);
    /* matmul 2's DOUT is ce's DIN */
    CHECK("chain: dlogits flows", g->nodes[bm2].grads_in[0] == n->grads_out[0] &&
          g->values[n->grads_out[0]].shape[1] == TG_V, "%d vs %d", g->nodes[bm2].grads_in[0],
          n->grads_out[0]);
    /* embedding backward: no DIN for ids, DIN table */
    CHECK("chain: embedding grads", g->nodes[be].grads_out[0] == -1 &&
          g->nodes[be].grads_out[1] >= 0 && g->nodes[be].grads_in[0] == g->nodes[bm1].grads_out[0],
          "%d %d", g->nodes[be].grads_out[0], g->nodes[be].grads_out[1]);
    /* param grads and accumulate nodes */
    int ok = 1;
    for (int p = 0; p < g->nparams; p++) {
        int gv = g->params[p].grad;
        ok &= gv >= 0 && g->values[gv].storage == PLAN_ST_GRAD &&
              g->values[gv].shape[0] == g->values[g->params[p].value].shape[0];
        int acc = find_user(g, "__accumulate", 0, gv);
        ok &= acc >= 0 && g->nodes[acc].phase == PLAN_PHASE_BACKWARD;
    }
    CHECK("chain: every param has a GRAD and an accumulate", ok, "wrong structure");
    CHECK("chain: grad name", strcmp(g->values[g->params[0].grad].name, "wte.grad") == 0, "%s",
          g->values[g->params[0].grad].name);
    CHECK("chain: no sums without fan-out", tg_count_def(g, "add") == 0 &&
          tg_count_def(g, "__add") == 0, "wrong structure");
    ir_graph_free(g);
}

static void test_fanout_same_value(void)
{
    tg_ids t;
    ir_graph *g = tg_fanout(&t, false, true);
    moec_error err;
    CHECK("fanout: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    /* add passes d(r) through to both h and a: a's grad IS d(r) */
    int bm2 = tg_bwd_of(g, t.n_mm2), bm1 = tg_bwd_of(g, t.n_mm1);
    int dr = g->nodes[bm2].grads_out[0];
    CHECK("fanout: passthrough, no add backward node", tg_bwd_of(g, t.n_add) == -1 &&
          g->nodes[bm1].grads_in[0] == dr, "bm1 dout %d dr %d", g->nodes[bm1].grads_in[0], dr);
    /* h fans out to rmsnorm and add: the embedding backward reads a sum */
    int be = tg_bwd_of(g, t.n_embed);
    const ir_node *sum = producer(g, g->nodes[be].grads_in[0]);
    CHECK("fanout: d(h) is summed with the stdlib add", sum && strcmp(sum->def->name, "add") == 0 &&
          sum->phase == PLAN_PHASE_BACKWARD && !sum->is_backward, "%s",
          sum ? sum->def->name : "no producer");
    int bn = tg_bwd_of(g, t.n_norm);
    CHECK("fanout: sum of d(r) and d(h) from rmsnorm", sum &&
          ((sum->inputs[0] == dr && sum->inputs[1] == g->nodes[bn].grads_out[0]) ||
           (sum->inputs[1] == dr && sum->inputs[0] == g->nodes[bn].grads_out[0])),
          "inputs %d %d", sum ? sum->inputs[0] : -9, sum ? sum->inputs[1] : -9);
    /* rmsnorm backward: rstd has no gradient, none is needed */
    CHECK("fanout: rmsnorm rstd gets no grad", g->nodes[bn].grads_in[1] == -1 &&
          g->nodes[bn].grads_out[1] >= 0, "wrong structure");
    /* wte used twice (embedding, logits): its accumulate reads a sum */
    int wg = g->params[param_of(g, t.wte)].grad;
    int acc = find_user(g, "__accumulate", 0, wg);
    const ir_node *wsum = acc >= 0 ? producer(g, g->nodes[acc].inputs[1]) : NULL;
    CHECK("fanout: tied (same value) weight grads summed", wsum && strcmp(wsum->def->name, "add") == 0 &&
          ((wsum->inputs[0] == g->nodes[bm2].grads_out[1] && wsum->inputs[1] == g->nodes[be].grads_out[1]) ||
           (wsum->inputs[1] == g->nodes[bm2].grads_out[1] && wsum->inputs[0] == g->nodes[be].grads_out[1])),
          "acc %d", acc);
    CHECK("fanout: two sums in total", tg_count_def(g, "add") == 3 /* 1 fwd + 2 sums */,
          "%d", tg_count_def(g, "add"));
    /* optimizer phase */
    int nadam = tg_count_def(g, "__adamw");
    CHECK("optimizer: one adamw per param", nadam == 3, "%d", nadam);
    int gn = g->params[param_of(g, t.gnorm)].value;
    int an = find_user(g, "__adamw", 0, gn);
    CHECK("optimizer: no decay on the norm weight", an >= 0 && g->nodes[an].attrs[0].f == 0.0,
          "%g", an >= 0 ? g->nodes[an].attrs[0].f : -1);
    int aw = find_user(g, "__adamw", 0, t.w1);
    CHECK("optimizer: decay on w1", aw >= 0 && check_close(g->nodes[aw].attrs[0].f, 0.1, 1e-7, 0),
          "%g", aw >= 0 ? g->nodes[aw].attrs[0].f : -1);
    const ir_param *pw = &g->params[param_of(g, t.w1)];
    CHECK("optimizer: adam states", pw->state0 >= 0 && pw->state1 >= 0 &&
          g->values[pw->state0].storage == PLAN_ST_OPTSTATE &&
          strcmp(g->values[pw->state1].name, "w1.adam_v") == 0 &&
          aw >= 0 && g->nodes[aw].inputs[2] == pw->state0 && g->nodes[aw].inputs[3] == pw->state1 &&
          g->nodes[aw].inputs[1] == pw->grad, "wrong structure");
    const ir_node *hn = aw >= 0 ? &g->nodes[aw] : NULL;
    CHECK("optimizer: hyper and norm inputs", hn &&
          g->values[hn->inputs[4]].role == PLAN_ROLE_HYPER &&
          g->values[hn->inputs[4]].shape[0] == MOEK_HYPER_COUNT &&
          g->values[hn->inputs[5]].role == PLAN_ROLE_NORM_SQ, "wrong structure");
    /* order in the optimizer phase: fill(norm), sumsq x3, adamw x3, zero x3 */
    int first_opt = -1;
    for (int i = 0; i < g->nnodes && first_opt < 0; i++)
        if (g->nodes[i].phase == PLAN_PHASE_OPTIMIZER)
            first_opt = i;
    const char *want[] = {"__fill", "__sumsq_accum", "__sumsq_accum", "__sumsq_accum", "__adamw",
                          "__adamw", "__adamw", "__fill_inplace", "__fill_inplace",
                          "__fill_inplace"};
    int order_ok = first_opt >= 0 && g->nnodes - first_opt == 10;
    for (int i = 0; order_ok && i < 10; i++)
        order_ok &= strcmp(g->nodes[first_opt + i].def->name, want[i]) == 0;
    CHECK("optimizer: phase order", order_ok, "first %d of %d", first_opt, g->nnodes);
    ir_graph_free(g);
}

static void test_tied_param(void)
{
    tg_ids t;
    ir_graph *g = tg_fanout(&t, true, false);
    moec_error err;
    CHECK("tied: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    const ir_param *head = &g->params[param_of(g, t.lm_head)];
    const ir_param *wte = &g->params[param_of(g, t.wte)];
    CHECK("tied: one grad shared", wte->grad >= 0 && head->grad == wte->grad, "%d %d", wte->grad,
          head->grad);
    CHECK("tied: one adamw per untied param", tg_count_def(g, "__adamw") == 2, "%d",
          tg_count_def(g, "__adamw"));
    int acc = find_user(g, "__accumulate", 0, wte->grad);
    const ir_node *s = acc >= 0 ? producer(g, g->nodes[acc].inputs[1]) : NULL;
    CHECK("tied: contributions summed", s && strcmp(s->def->name, "add") == 0, "wrong structure");
    CHECK("tied: shares storage", g->values[t.lm_head].pool == g->values[t.wte].pool &&
          g->values[t.lm_head].offset == g->values[t.wte].offset, "%llu vs %llu",
          (unsigned long long)g->values[t.lm_head].offset, (unsigned long long)g->values[t.wte].offset);
    ir_graph_free(g);
}

/* no "add" op in the graph: gradient sums use the internal one */
static void test_internal_add(void)
{
    tg_ids t;
    ir_graph *g = tg_chain(&t);
    g->nodes[t.n_mm2].inputs[1] = t.wte;   /* reuse wte as the output head */
    moec_error err;
    CHECK("internal add: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    int acc = find_user(g, "__accumulate", 0, g->params[param_of(g, t.wte)].grad);
    const ir_node *s = acc >= 0 ? producer(g, g->nodes[acc].inputs[1]) : NULL;
    CHECK("internal add: sum uses __add", s && strcmp(s->def->name, "__add") == 0 &&
          strcmp(s->def->fwd_symbol, "moek_add_fwd") == 0 && s->dims[0] == TG_V * TG_D &&
          tg_count_def(g, "__add") == 1, "%s", s ? s->def->name : "none");
    ir_graph_free(g);
}

static void test_frozen(void)
{
    tg_ids t;
    ir_graph *g = tg_chain(&t);
    g->params[param_of(g, t.wte)].frozen = true;
    moec_error err;
    CHECK("frozen: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    CHECK("frozen: no grad", g->params[param_of(g, t.wte)].grad == -1 &&
          g->params[param_of(g, t.wte)].state0 == -1, "wrong structure");
    CHECK("frozen: embedding gets no backward", tg_bwd_of(g, t.n_embed) == -1, "wrong structure");
    /* matmul 1 still needs dw1; its dx is a scratch value nothing reads */
    int bm1 = tg_bwd_of(g, t.n_mm1);
    CHECK("frozen: unwanted DIN is scratch", bm1 >= 0 && g->nodes[bm1].grads_out[0] >= 0 &&
          strstr(g->values[g->nodes[bm1].grads_out[0]].name, "unused") != NULL, "wrong structure");
    CHECK("frozen: no adamw for it", find_user(g, "__adamw", 0, t.wte) == -1 &&
          tg_count_def(g, "__adamw") == 2, "wrong structure");
    /* everything frozen: no backward work at all */
    ir_graph_free(g);
    g = tg_chain(&t);
    for (int p = 0; p < g->nparams; p++)
        g->params[p].frozen = true;
    int nf = g->nnodes;
    CHECK("all frozen: compiles", pass_autodiff(g, &err) == 0, "%s", err.msg);
    CHECK("all frozen: no backward nodes", g->nnodes == nf, "%d vs %d", g->nnodes, nf);
    ir_graph_free(g);
}

static void test_sgd(void)
{
    tg_ids t;
    ir_graph *g = tg_chain(&t);
    g->train.optimizer = PLAN_OPT_SGD;
    moec_error err;
    CHECK("sgd: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    const ir_param *p = &g->params[param_of(g, t.w1)];
    int s = find_user(g, "__sgd", 0, t.w1);
    CHECK("sgd: momentum buffer", s >= 0 && p->state0 >= 0 && p->state1 == -1 &&
          g->nodes[s].inputs[2] == p->state0 &&
          strcmp(g->values[p->state0].name, "w1.momentum") == 0, "wrong structure");
    CHECK("sgd: no adamw", tg_count_def(g, "__adamw") == 0 && tg_count_def(g, "__sgd") == 3, "wrong structure");
    ir_graph_free(g);
}

/* a two-output op whose backward reads d(output 1), which nothing uses */
static void test_zero_fill(void)
{
    ir_graph *g = ir_graph_new();
    tg_ids t;
    memset(&t, -1, sizeof t);
    tg_inputs(g, &t);
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = "split2";
    d.ninputs = 1; d.noutputs = 2; d.ndims = 1;
    d.input_diff[0] = true; d.output_diff[0] = d.output_diff[1] = true;
    d.dim_names[0] = "n";
    d.fwd_symbol = "my_split_fwd";
    const ir_ref f[] = {T_IN(0), T_OUT(0), T_OUT(1), T_DIM(0)};
    d.nfwd = 4; memcpy(d.fwd, f, sizeof f);
    d.bwd_kind = IR_BWD_KERNEL;
    d.bwd_symbol = "my_split_bwd";
    const ir_ref b[] = {T_DOUT(0), T_DOUT(1), T_DIN(0), T_DIM(0)};
    d.nbwd = 4; memcpy(d.bwd, b, sizeof b);
    const ir_opdef *split = ir_def_add(g, &d);
    int w = tg_param(g, "w", TG_N, TG_V, true);
    int y0 = tg_value(g, "y0", PLAN_F32, PLAN_ST_ACT, TG_N, TG_V);
    int y1 = tg_value(g, "y1", PLAN_F32, PLAN_ST_ACT, TG_N, TG_V);
    int in[] = {w}, out[] = {y0, y1};
    int64_t dims[] = {TG_N * TG_V};
    int ns = tg_node(g, split, in, out, dims, 0, 2);
    tg_loss(g, &t, y0);
    moec_error err;
    CHECK("zero fill: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    int bs = tg_bwd_of(g, ns);
    const ir_node *z = bs >= 0 ? producer(g, g->nodes[bs].grads_in[1]) : NULL;
    CHECK("zero fill: d(y1) from a fill", z && strcmp(z->def->name, "__fill") == 0 &&
          z->attrs[0].f == 0.0 && z->dims[0] == TG_N * TG_V && z->phase == PLAN_PHASE_BACKWARD, "wrong structure");
    ir_graph_free(g);
}

static void test_errors(void)
{
    moec_error err;
    tg_ids t;
    ir_graph *g = tg_chain(&t);
    g->loss = -1;
    CHECK("error: no loss", pass_autodiff(g, &err) == -1 &&
          strstr(err.msg, "returns no loss") != NULL, "%s", err.msg);
    printf("# message: %s (hint: %s)\n", err.msg, err.hint);
    ir_graph_free(g);

    g = tg_chain(&t);
    g->loss = t.logits;
    CHECK("error: non-scalar loss", pass_autodiff(g, &err) == -1 &&
          strstr(err.msg, "'logits' is f32 with 30 elements") != NULL && err.loc.line == 4,
          "%s (line %d)", err.msg, err.loc.line);
    printf("# message: %s (hint: %s)\n", err.msg, err.hint);
    ir_graph_free(g);

    /* pass-through with different sizes (a broadcasting add) */
    g = ir_graph_new();
    memset(&t, -1, sizeof t);
    tg_inputs(g, &t);
    int w = tg_param(g, "w", TG_N, TG_V, true);
    int bias = tg_param(g, "bias", TG_V, 0, false);
    int y = tg_value(g, "y", PLAN_F32, PLAN_ST_ACT, TG_N, TG_V);
    int in[] = {w, bias}, out[] = {y};
    int64_t dims[] = {TG_N * TG_V};
    tg_node(g, tg_def_add(g), in, out, dims, 0, 7);
    tg_loss(g, &t, y);
    CHECK("error: passthrough size mismatch", pass_autodiff(g, &err) == -1 &&
          strstr(err.msg, "sizes differ (5 vs 30 elements)") != NULL && err.loc.line == 7,
          "%s", err.msg);
    printf("# message: %s (hint: %s)\n", err.msg, err.hint);
    ir_graph_free(g);

    /* differentiable op with no backward kernel symbol */
    g = tg_chain(&t);
    ((ir_opdef *)g->nodes[t.n_mm1].def)->bwd_symbol = NULL;
    CHECK("error: no backward kernel", pass_autodiff(g, &err) == -1 &&
          strstr(err.msg, "op 'matmul' is differentiable but declares no backward kernel") != NULL,
          "%s", err.msg);
    printf("# message: %s (hint: %s)\n", err.msg, err.hint);
    ir_graph_free(g);

    /* a backward template that writes a gradient into the integer ids */
    g = tg_chain(&t);
    ir_opdef *emb = (ir_opdef *)g->nodes[t.n_embed].def;
    emb->bwd[1].kind = IR_REF_DIN;
    emb->bwd[1].index = 0;
    CHECK("error: gradient for integer input", pass_autodiff(g, &err) == -1 &&
          strstr(err.msg, "input 'ids', which has integer type i32") != NULL, "%s", err.msg);
    printf("# message: %s (hint: %s)\n", err.msg, err.hint);
    ir_graph_free(g);

    g = tg_chain(&t);
    g->train.optimizer = 7;
    CHECK("error: unknown optimizer", pass_autodiff(g, &err) == 0 &&
          pass_optimizer(g, &err) == -1 && strstr(err.msg, "unknown optimizer (code 7)") != NULL,
          "%s", err.msg);
    printf("# message: %s (hint: %s)\n", err.msg, err.hint);
    ir_graph_free(g);
}

int main(void)
{
    test_chain();
    test_fanout_same_value();
    test_tied_param();
    test_internal_add();
    test_frozen();
    test_sgd();
    test_zero_fill();
    test_errors();
    CHECK_DONE();
}
