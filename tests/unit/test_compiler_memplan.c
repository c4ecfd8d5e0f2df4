/* test_compiler_memplan.c - pool layout: pinned pools laid out in order,
 * activations reused after their last use without ever overlapping a live
 * one, role-tagged values kept whole step, the verifier catching an overlap. */
#include <inttypes.h>

#include "check.h"
#include "test_compiler_graphs.h"
#include "../../compiler/memplan.h"

static uint64_t sum_sizes(const ir_graph *g, int storage)
{
    uint64_t s = 0;
    for (int v = 0; v < g->nvalues; v++)
        if (g->values[v].pool == storage && g->values[v].storage == storage &&
            !(g->values[v].param >= 0 && g->params[g->values[v].param].tied_to >= 0))
            s += memplan_size(&g->values[v]);
    return s;
}

static void test_small(void)
{
    tg_ids t;
    ir_graph *g = tg_fanout(&t, true, true);
    moec_error err;
    CHECK("memplan: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    char why[512] = "";
    CHECK("memplan: verify", memplan_verify(g, why, sizeof why) == 0, "%s", why);
    int aligned = 1, planned = 0;
    for (int v = 0; v < g->nvalues; v++) {
        if (g->values[v].pool < 0)
            continue;
        planned++;
        aligned &= g->values[v].offset % PLAN_ALIGN == 0;
    }
    CHECK("memplan: offsets aligned", aligned && planned > 20, "%d planned", planned);
    /* params: wte 5x4 (80 B -> 128), w1 4x4 (64), gnorm 4 (16 -> 64); lm_head tied */
    CHECK("memplan: param pool", g->pool_bytes[PLAN_ST_PARAM] == 128 + 64 + 64,
          "%" PRId64, g->pool_bytes[PLAN_ST_PARAM]);
    CHECK("memplan: grad pool", g->pool_bytes[PLAN_ST_GRAD] == 128 + 64 + 64,
          "%" PRId64, g->pool_bytes[PLAN_ST_GRAD]);
    CHECK("memplan: optstate pool", g->pool_bytes[PLAN_ST_OPTSTATE] == 2 * (128 + 64 + 64),
          "%" PRId64, g->pool_bytes[PLAN_ST_OPTSTATE]);
    /* inputs: tokens 24 B, targets 24 B, loss_seed 4 B, hyper 32 B: 64 each */
    CHECK("memplan: input pool", g->pool_bytes[PLAN_ST_INPUT] == 4 * 64,
          "%" PRId64, g->pool_bytes[PLAN_ST_INPUT]);
    CHECK("memplan: sequential pinned offsets", g->values[t.wte].offset == 0 &&
          g->values[t.w1].offset == 128 && g->values[t.gnorm].offset == 192,
          "%" PRIu64 " %" PRIu64 " %" PRIu64, g->values[t.wte].offset, g->values[t.w1].offset,
          g->values[t.gnorm].offset);
    uint64_t acts = sum_sizes(g, PLAN_ST_ACT);
    CHECK("memplan: activations reuse space", (uint64_t)g->pool_bytes[PLAN_ST_ACT] < acts,
          "pool %" PRId64 " vs sum %" PRIu64, g->pool_bytes[PLAN_ST_ACT], acts);
    uint64_t live = memplan_peak_live(g);
    CHECK("memplan: pool >= peak live", live > 0 && live <= (uint64_t)g->pool_bytes[PLAN_ST_ACT],
          "live %" PRIu64 " pool %" PRId64, live, g->pool_bytes[PLAN_ST_ACT]);

    /* break it: put a live activation on top of the pinned loss */
    int victim = t.h;
    uint64_t keep = g->values[victim].offset;
    g->values[victim].offset = g->values[t.loss].offset;
    CHECK("memplan: verify catches overlap", memplan_verify(g, why, sizeof why) == -1 &&
          strstr(why, "overlap") != NULL && strstr(why, "'h'") != NULL, "%s", why);
    printf("# verify says: %s\n", why);
    g->values[victim].offset = keep + 1;
    CHECK("memplan: verify catches misalignment", memplan_verify(g, why, sizeof why) == -1 &&
          strstr(why, "misaligned") != NULL, "%s", why);
    printf("# verify says: %s\n", why);
    ir_graph_free(g);
}

/* a deep chain: L matmuls; each layer's input lives until its backward, so
 * reuse comes from backward temporaries and forward outputs that die */
static void test_deep(void)
{
    ir_graph *g = ir_graph_new();
    tg_ids t;
    memset(&t, -1, sizeof t);
    tg_inputs(g, &t);
    enum { L = 12 };
    int wte = tg_param(g, "wte", TG_V, TG_D, true);
    int h = tg_value(g, "h0", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int e_in[] = {t.tokens, wte}, e_out[] = {h};
    int64_t e_dims[] = {TG_N, TG_V, TG_D};
    tg_node(g, tg_def_embedding(g), e_in, e_out, e_dims, 0, 1);
    for (int l = 0; l < L; l++) {
        char name[32];
        snprintf(name, sizeof name, "layers.%d.w", l);
        int w = tg_param(g, name, TG_D, TG_D, true);
        snprintf(name, sizeof name, "h%d", l + 1);
        int y = tg_value(g, name, PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
        int in[] = {h, w}, out[] = {y};
        int64_t dims[] = {TG_N, TG_D, TG_D};
        tg_node(g, tg_def_matmul(g), in, out, dims, 0, 2 + l);
        h = y;
    }
    int logits = tg_value(g, "logits", PLAN_F32, PLAN_ST_ACT, TG_N, TG_V);
    int in[] = {h, wte}, out[] = {logits};
    int64_t dims[] = {TG_N, TG_D, TG_V};
    tg_node(g, tg_def_matmul(g), in, out, dims, 0, 30);
    tg_loss(g, &t, logits);
    /* a value nothing touches is not planned */
    int orphan = tg_value(g, "orphan", PLAN_F32, PLAN_ST_ACT, 1000, 0);
    moec_error err;
    CHECK("deep: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    char why[512] = "";
    CHECK("deep: verify", memplan_verify(g, why, sizeof why) == 0, "%s", why);
    CHECK("deep: orphan not planned", g->values[orphan].pool == -1, "pool %d",
          g->values[orphan].pool);
    uint64_t acts = sum_sizes(g, PLAN_ST_ACT);
    CHECK("deep: pool well under the sum", (uint64_t)g->pool_bytes[PLAN_ST_ACT] * 2 < acts,
          "pool %" PRId64 " vs sum %" PRIu64, g->pool_bytes[PLAN_ST_ACT], acts);
    uint64_t live = memplan_peak_live(g);
    CHECK("deep: little fragmentation", (uint64_t)g->pool_bytes[PLAN_ST_ACT] <= live + live / 4,
          "pool %" PRId64 " live %" PRIu64, g->pool_bytes[PLAN_ST_ACT], live);
    /* pinned role values never share with anything */
    int nsq = -1;
    for (int v = 0; v < g->nvalues; v++)
        if (g->values[v].role == PLAN_ROLE_NORM_SQ)
            nsq = v;
    int shared = 0;
    for (int v = 0; v < g->nvalues; v++) {
        const ir_value *a = &g->values[v];
        if (v == nsq || a->pool != PLAN_ST_ACT || nsq < 0)
            continue;
        const ir_value *b = &g->values[nsq];
        shared += a->offset < b->offset + ir_value_bytes(b) && b->offset < a->offset + ir_value_bytes(a);
    }
    CHECK("deep: norm_sq never shared", nsq >= 0 && shared == 0, "%d overlaps", shared);
    ir_graph_free(g);
}

static void test_bad_storage(void)
{
    tg_ids t;
    ir_graph *g = tg_chain(&t);
    g->values[t.h].storage = 9;
    moec_error err;
    CHECK("memplan: bad storage class is an error", pass_memplan(g, &err) == -1 &&
          strstr(err.msg, "value 'h' has storage class 9") != NULL, "%s", err.msg);
    printf("# message: %s\n", err.msg);
    ir_graph_free(g);
}

int main(void)
{
    test_small();
    test_deep();
    test_bad_storage();
    CHECK_DONE();
}
