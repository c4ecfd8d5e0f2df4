/* test_elab.c - elaboration: parameter names and counts, shapes, roles, train config. */
#include <string.h>

#include "check.h"
#include "diag.h"
#include "../../compiler/elaborate.h"

static ir_graph *elab_file(const char *path, diag_ctx *d)
{
    elab_options o = {.stdlib_dir = "stdlib"};
    return elaborate(path, &o, d);
}

static int find_param(const ir_graph *g, const char *name)
{
    for (int i = 0; i < g->nparams; i++)
        if (strcmp(g->values[g->params[i].value].name, name) == 0)
            return i;
    return -1;
}

int main(void)
{
    FILE *sink = tmpfile();
    diag_ctx *d = diag_new(sink, 20);
    ir_graph *g = elab_file("examples/tiny_moe.moe", d);
    CHECK("tiny_moe_elaborates", g != NULL, "%d errors", diag_count(d));
    if (!g)
        CHECK_DONE();
    /* hand count: embed 256*64 = 16384; per layer: 2 norms 2*64, q,k,v,o 4*64*64 = 16384,
     * router 4*64 = 256, experts 3 * 4*128*64 = 98304 -> 115072; 2 layers 230144;
     * final norm 64, lm_head 256*64 = 16384: total 262976.  Active: experts at 2/4. */
    CHECK("param_count", g->train.param_count == 262976, "%llu", (unsigned long long)g->train.param_count);
    CHECK("active_param_count", g->train.active_param_count == 262976 - 98304, "%llu",
          (unsigned long long)g->train.active_param_count);
    int w1 = find_param(g, "layers.1.moe.w1");
    CHECK("hier_name_expert", w1 >= 0, "layers.1.moe.w1 missing");
    if (w1 >= 0) {
        const ir_param *p = &g->params[w1];
        const ir_value *v = &g->values[p->value];
        CHECK("expert_axis", p->expert_axis == 0 && v->shape[0] == 4 && v->shape[1] == 128 && v->shape[2] == 64,
              "axis %d shape %lld", p->expert_axis, (long long)v->shape[0]);
        CHECK("active_fraction", p->active_fraction == 0.5f, "%g", p->active_fraction);
    }
    int wq = find_param(g, "layers.0.attn.wq.weight"), nrm = find_param(g, "layers.0.attn_norm.weight");
    CHECK("hier_name_attn", wq >= 0 && nrm >= 0, "wq %d norm %d", wq, nrm);
    if (wq >= 0 && nrm >= 0)
        CHECK("decay_default", g->params[wq].decay && !g->params[nrm].decay, "decay wq %d norm %d",
              g->params[wq].decay, g->params[nrm].decay);
    CHECK("embed_name", find_param(g, "embed.weight") >= 0, "embed.weight missing");
    CHECK("loss_role", g->loss >= 0 && g->values[g->loss].role == PLAN_ROLE_LOSS, "loss %d", g->loss);
    CHECK("logits", g->logits >= 0 && g->values[g->logits].shape[2] == 256 && g->train.vocab == 256, "logits %d",
          g->logits);
    int metrics = 0, tokens = 0;
    for (int i = 0; i < g->nvalues; i++) {
        metrics += g->values[i].role == PLAN_ROLE_METRIC;
        tokens += g->values[i].role == PLAN_ROLE_TOKENS;
    }
    CHECK("balance_metrics", metrics == 2, "%d", metrics);
    CHECK("tokens_input", tokens == 1, "%d", tokens);
    CHECK("train_config", g->train.batch == 8 && g->train.seq == 64 && g->train.steps == 300 &&
          g->train.schedule == PLAN_SCHED_COSINE && g->train.warmup == 20 && g->train.optimizer == PLAN_OPT_ADAMW &&
          check_close(g->train.lr, 3e-3, 1e-9, 1e-6) && check_close(g->train.beta2, 0.95, 1e-9, 1e-6),
          "batch %lld seq %lld", (long long)g->train.batch, (long long)g->train.seq);
    CHECK("source_hash", g->source_hash != 0 && g->source_hash != PLAN_FNV_OFFSET, "hash");
    /* every node has a .moe location */
    int noloc = 0;
    for (int i = 0; i < g->nnodes; i++)
        noloc += g->nodes[i].loc.line <= 0;
    CHECK("node_locations", noloc == 0 && g->nnodes > 20, "%d nodes without a line of %d", noloc, g->nnodes);
    /* 6N + 6LCT with N active, L = 2, C = 64, T = 64 */
    CHECK("flops_per_token", g->train.flops_per_token == 6ull * 164672 + 6ull * 2 * 64 * 64, "%llu",
          (unsigned long long)g->train.flops_per_token);
    ir_graph_free(g);

    /* dense: hand count 16384 + 2 * (128 + 16384 + 3 * 64 * 192) + 64 + 16384 = 139584 */
    g = elab_file("examples/tiny_dense.moe", d);
    CHECK("tiny_dense_params", g && g->train.param_count == 139584 && g->train.active_param_count == 139584, "%llu",
          g ? (unsigned long long)g->train.param_count : 0ull);
    ir_graph_free(g);

    /* from text: constant folding, shapes through ops, capacity arithmetic */
    const char *src = "import \"nn\"\nconfig { v = 256 d = 8 * 4 seq = 16 }\n"
                      "model m(tokens: i32[B, seq], targets: i32[B, seq]) {\n"
                      "  x = embedding(tokens, v, d)\n"
                      "  x = x + moe(x, 4, 1, 16, capacity = 1.25, balance = 0.0)\n"
                      "  return cross_entropy(linear(x, v), targets)\n}\ntrain { batch = 2 }\n";
    elab_options o = {.stdlib_dir = "stdlib", .text = src, .text_len = strlen(src)};
    g = elaborate("inline.moe", &o, d);
    CHECK("inline_elaborates", g != NULL, "%d errors", diag_count(d));
    if (g) {
        /* capacity C = ceil(1.25 * 32 * 1 / 4) = 10, rows = 4 * 10 = 40 */
        int rows = -1;
        for (int i = 0; i < g->nvalues; i++)
            if (strcmp(g->values[i].name, "moe.dispatch.xs") == 0)
                rows = (int)g->values[i].shape[0];
        CHECK("capacity_rows", rows == 40, "rows %d", rows);
        CHECK("folded_dim", g->values[g->params[0].value].shape[1] == 32, "%lld",
              (long long)g->values[g->params[0].value].shape[1]);
        ir_graph_free(g);
    }
    diag_free(d);
    fclose(sink);
    CHECK_DONE();
}
