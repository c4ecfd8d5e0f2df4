/* test_parallel_ep_errors.c - the expert-parallel rewrite's guards that no
 * .moe file can reach (the language only makes expert params with the
 * expert index first, and the rewrite runs right after autodiff), shown on
 * hand-built graphs so their messages are tested too.  The reachable ones
 * are in tests/cli/test_ep_errors.sh. */
#include <string.h>

#include "check.h"
#include "test_compiler_graphs.h"
#include "../../compiler/parallel_ep.h"

static void two_ranks(ir_graph *g)
{
    g->par_ranks = 2;
    g->par_expert = 2;
}

int main(void)
{
    moec_error err;
    tg_ids t;

    /* an expert param split along its second dim */
    ir_graph *g = tg_chain(&t);
    two_ranks(g);
    g->params[g->values[t.w1].param].expert_axis = 1;
    int rc = pass_autodiff(g, &err) == 0 ? parallel_ep_rewrite(g, &err) : -2;
    CHECK("ep_errors.expert_axis_not_first",
          rc == -1 && strstr(err.msg, "splits expert params along their first dim") &&
              strstr(err.hint, "put the expert index first") && err.loc.line == 1,
          "rc %d: %s (hint %s, line %d)", rc, err.msg, err.hint, err.loc.line);
    ir_graph_free(g);

    /* called before autodiff: no loss seed to split the graph at */
    g = tg_chain(&t);
    two_ranks(g);
    rc = parallel_ep_rewrite(g, &err);
    CHECK("ep_errors.before_autodiff",
          rc == -1 && strstr(err.msg, "runs after autodiff but the graph has no loss seed") &&
              strstr(err.hint, "report this bug"),
          "rc %d: %s", rc, err.msg);
    ir_graph_free(g);

    /* a forward op appended after the backward ops */
    g = tg_chain(&t);
    two_ranks(g);
    rc = pass_autodiff(g, &err);
    if (rc == 0) {
        int extra = tg_value(g, "late", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
        int ins[] = {t.a, t.a}, outs[] = {extra};
        int64_t dims[] = {TG_N * TG_D};
        tg_node(g, tg_def_add(g), ins, outs, dims, 0, 7);
        rc = parallel_ep_rewrite(g, &err);
    }
    CHECK("ep_errors.forward_after_backward",
          rc == -1 && strstr(err.msg, "a forward op follows the backward ops") && err.loc.line == 7,
          "rc %d: %s (line %d)", rc, err.msg, err.loc.line);
    ir_graph_free(g);
    return check_failures != 0;
}
