/* test_compiler_pass_fuse.c - the fuse pass (compiler/pass_fuse.c) on a
 * hand-built forward graph, before and after.
 *
 * Two GPT-2 MLPs side by side: in the first, matmul -> bias_add -> gelu ->
 * matmul -> bias_add must become matmul_bias_gelu then matmul_bias; in the
 * second the first matmul's output has a second reader, so nothing of it may
 * fuse.  matmul_bias is registered before matmul_bias_gelu on purpose: the
 * pass must still try the longer rule first, or matmul_bias would take the
 * first matmul and bias_add of the GELU pattern. */
#include <stdio.h>
#include <string.h>

#include "../../compiler/fuse.h"
#include "check.h"
#include "test_compiler_graphs.h"

static const ir_opdef *tf_def(ir_graph *g, const char *name, int nin, int nout, const char *const *ins,
                              const char *const *outs, const bool *out_diff, int ndims, const char *const *dims,
                              const ir_fuse *rule)
{
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = name;
    d.ninputs = nin;
    d.noutputs = nout;
    d.ndims = ndims;
    for (int i = 0; i < nin; i++) {
        d.input_names[i] = ins[i];
        d.input_diff[i] = true;
    }
    for (int i = 0; i < nout; i++) {
        d.output_names[i] = outs[i];
        d.output_diff[i] = out_diff[i];
    }
    for (int i = 0; i < ndims; i++)
        d.dim_names[i] = dims[i];
    d.fwd_symbol = name;   /* never emitted; the pass counts reads off the template */
    for (int i = 0; i < nin; i++)
        d.fwd[d.nfwd++] = (ir_ref){IR_REF_IN, i, 0, 0};
    for (int i = 0; i < nout; i++)
        d.fwd[d.nfwd++] = (ir_ref){IR_REF_OUT, i, 0, 0};
    d.bwd_kind = IR_BWD_NONE;
    d.fuse = rule;
    return tg_reg(g, &d);
}

/* slots: 0 x, 1 w, 2 b, then h, and pre/y as the rule names them */
static void tf_rule(ir_fuse *r, bool gelu)
{
    memset(r, 0, sizeof *r);
    const char *names[] = {"x", "w", "b", "h", gelu ? "pre" : "y", "y"};
    r->nslots = gelu ? 6 : 5;
    for (int s = 0; s < r->nslots; s++) {
        r->slot_name[s] = names[s];
        r->slot_in[s] = s < 3 ? s : -1;
        r->slot_out[s] = -1;
    }
    r->slot_out[4] = gelu ? 1 : 0;   /* pre (saved) or y */
    if (gelu)
        r->slot_out[5] = 0;
    r->nops = gelu ? 3 : 2;
    r->ops[0] = (ir_fuse_op){.op = "matmul", .nin = 2, .nout = 1, .in = {0, 1}, .out = {3}};
    r->ops[1] = (ir_fuse_op){.op = "bias_add", .nin = 2, .nout = 1, .in = {3, 2}, .out = {4}};
    if (gelu)
        r->ops[2] = (ir_fuse_op){.op = "gelu", .nin = 1, .nout = 1, .in = {4}, .out = {5}};
    /* N: the leading dims of x; K: x's last; M: w's first of two */
    r->dim_in[0] = 0, r->dim_star[0] = true, r->dim_back[0] = 2;
    r->dim_in[1] = 0, r->dim_back[1] = 1;
    r->dim_in[2] = 1, r->dim_back[2] = 2;
}

int main(void)
{
    ir_graph *g = ir_graph_new();
    ir_fuse rmb, rmbg;
    tf_rule(&rmb, false);
    tf_rule(&rmbg, true);
    const char *xwb[] = {"x", "w", "b"}, *xb[] = {"x", "b"}, *x1[] = {"x"}, *y[] = {"y"}, *ypre[] = {"y", "pre"};
    const char *nkm[] = {"N", "K", "M"}, *nd[] = {"N", "D"}, *n1[] = {"N"};
    const bool d1[] = {true}, d2[] = {true, false};
    const ir_opdef *mm = tg_def_matmul(g);
    const ir_opdef *mb = tf_def(g, "matmul_bias", 3, 1, xwb, y, d1, 3, nkm, &rmb);
    const ir_opdef *ba = tf_def(g, "bias_add", 2, 1, xb, y, d1, 2, nd, NULL);
    const ir_opdef *ge = tf_def(g, "gelu", 1, 1, x1, y, d1, 1, n1, NULL);
    const ir_opdef *mbg = tf_def(g, "matmul_bias_gelu", 3, 2, xwb, ypre, d2, 3, nkm, &rmbg);

    enum { N = 6, K = 4, M = 8 };
    int x = tg_value(g, "x", PLAN_F32, PLAN_ST_ACT, N, K);
    int w1 = tg_param(g, "w1", M, K, true), b1 = tg_param(g, "b1", M, 0, false);
    int w2 = tg_param(g, "w2", K, M, true), b2 = tg_param(g, "b2", K, 0, false);
    int w3 = tg_param(g, "w3", M, K, true), b3 = tg_param(g, "b3", M, 0, false);
    int h1 = tg_value(g, "h1", PLAN_F32, PLAN_ST_ACT, N, M), p1 = tg_value(g, "p1", PLAN_F32, PLAN_ST_ACT, N, M);
    int y1 = tg_value(g, "y1", PLAN_F32, PLAN_ST_ACT, N, M), h2 = tg_value(g, "h2", PLAN_F32, PLAN_ST_ACT, N, K);
    int o = tg_value(g, "o", PLAN_F32, PLAN_ST_ACT, N, K);
    int h3 = tg_value(g, "h3", PLAN_F32, PLAN_ST_ACT, N, M), p3 = tg_value(g, "p3", PLAN_F32, PLAN_ST_ACT, N, M);
    int g3 = tg_value(g, "g3", PLAN_F32, PLAN_ST_ACT, N, M);
    const int64_t dnkm[] = {N, K, M}, dnmk[] = {N, M, K}, dnm[] = {N, M}, dnk[] = {N, K}, dall[] = {N * M};
    tg_node(g, mm, (int[]){x, w1}, (int[]){h1}, dnkm, 0, 1);
    tg_node(g, ba, (int[]){h1, b1}, (int[]){p1}, dnm, 0, 2);
    tg_node(g, ge, (int[]){p1}, (int[]){y1}, dall, 0, 3);
    tg_node(g, mm, (int[]){y1, w2}, (int[]){h2}, dnmk, 0, 4);
    tg_node(g, ba, (int[]){h2, b2}, (int[]){o}, dnk, 0, 5);
    tg_node(g, mm, (int[]){x, w3}, (int[]){h3}, dnkm, 0, 6);
    tg_node(g, ba, (int[]){h3, b3}, (int[]){p3}, dnm, 0, 7);
    tg_node(g, ge, (int[]){h3}, (int[]){g3}, dall, 0, 8);   /* h3's second reader */
    CHECK("fuse before: 8 nodes (3 matmul, 3 bias_add, 2 gelu)", g->nnodes == 8 && tg_count_def(g, "matmul") == 3,
          "%d nodes", g->nnodes);

    moec_error err;
    int rc = pass_fuse(g, &err);
    const ir_node *n0 = &g->nodes[0], *n1n = &g->nodes[1];
    CHECK("fuse after: 5 nodes, the first MLP as matmul_bias_gelu then matmul_bias",
          rc == 0 && g->nnodes == 5 && n0->def == mbg && n1n->def == mb, "rc %d, %d nodes, first %s, second %s", rc,
          g->nnodes, g->nnodes > 0 ? n0->def->name : "-", g->nnodes > 1 ? n1n->def->name : "-");
    CHECK("fused matmul_bias_gelu: inputs x w1 b1, outputs y1 and the saved pre p1, dims N K M",
          n0->inputs[0] == x && n0->inputs[1] == w1 && n0->inputs[2] == b1 && n0->outputs[0] == y1 &&
              n0->outputs[1] == p1 && n0->dims[0] == N && n0->dims[1] == K && n0->dims[2] == M &&
              g->values[p1].producer == 0 && g->values[y1].producer == 0,
          "in %d %d %d out %d %d dims %lld %lld %lld", n0->inputs[0], n0->inputs[1], n0->inputs[2], n0->outputs[0],
          n0->outputs[1], (long long)n0->dims[0], (long long)n0->dims[1], (long long)n0->dims[2]);
    CHECK("fused matmul_bias: inputs y1 w2 b2, output o, dims N M K",
          n1n->inputs[0] == y1 && n1n->inputs[1] == w2 && n1n->inputs[2] == b2 && n1n->outputs[0] == o &&
              n1n->dims[0] == N && n1n->dims[1] == M && n1n->dims[2] == K,
          "in %d %d %d out %d", n1n->inputs[0], n1n->inputs[1], n1n->inputs[2], n1n->outputs[0]);
    CHECK("an intermediate with two readers fuses nothing (matmul, bias_add, gelu stay)",
          tg_count_def(g, "matmul") == 1 && tg_count_def(g, "bias_add") == 1 && tg_count_def(g, "gelu") == 1,
          "matmul %d bias_add %d gelu %d", tg_count_def(g, "matmul"), tg_count_def(g, "bias_add"),
          tg_count_def(g, "gelu"));
    ir_graph_free(g);
    CHECK_DONE();
}
