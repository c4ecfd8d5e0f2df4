/* test_compiler_multi_tensor.c - the multi_tensor pass on hand-built graphs:
 * params become views of flat buffers at aligned offsets, one update and
 * one grad fill remain per (kernel, weight decay, hyper) group, the planner
 * places views inside their bases, what must stay per tensor stays, every
 * error of view placement shows its message, and the update kernels keep
 * the zero gaps between members at zero. */
#include <inttypes.h>
#include <math.h>

#include "check.h"
#include "test_compiler_graphs.h"
#include "../../compiler/memplan.h"
#include "../../kernels/moek.h"

static int count_kind(const ir_graph *g, iop_kind k)
{
    int c = 0;
    for (int i = 0; i < g->nnodes; i++)
        c += iop_kind_of(g->nodes[i].def) == k;
    return c;
}

static int find_value(const ir_graph *g, const char *name)
{
    for (int v = 0; v < g->nvalues; v++)
        if (strcmp(g->values[v].name, name) == 0)
            return v;
    return -1;
}

/* tg_fanout with a tied head and a norm: wte [5,4] and w1 [4,4] decay,
 * gnorm [4] does not, lm_head is tied to wte (no update of its own). */
static void test_fanout(void)
{
    tg_ids t;
    ir_graph *g = tg_fanout(&t, true, true);
    moec_error err;
    int rc = pass_autodiff(g, &err);
    rc = rc ? rc : pass_optimizer(g, &err);
    int upd0 = count_kind(g, IOP_ADAMW), fill0 = count_kind(g, IOP_FILL_INPLACE);
    rc = rc ? rc : pass_multi_tensor(g, &err);
    rc = rc ? rc : pass_memplan(g, &err);
    CHECK("multi_tensor: compiles", rc == 0, "%s", err.msg);
    /* 3 updates (wte, w1, gnorm) -> the decay group {wte, w1} and gnorm alone */
    CHECK("multi_tensor: one update per group", upd0 == 3 && count_kind(g, IOP_ADAMW) == 2,
          "%d -> %d", upd0, count_kind(g, IOP_ADAMW));
    CHECK("multi_tensor: one grad fill per group", fill0 == 3 && count_kind(g, IOP_FILL_INPLACE) == 2,
          "%d -> %d", fill0, count_kind(g, IOP_FILL_INPLACE));
    int fp = find_value(g, "__mt0.p"), fg = find_value(g, "__mt0.g");
    int fm = find_value(g, "__mt0.m"), fv = find_value(g, "__mt0.v");
    CHECK("multi_tensor: flat buffers", fp >= 0 && fg >= 0 && fm >= 0 && fv >= 0 &&
          find_value(g, "__mt1.p") < 0 && ir_value_numel(&g->values[fp]) == 48 &&
          g->values[fg].storage == PLAN_ST_GRAD && g->values[fv].storage == PLAN_ST_OPTSTATE,
          "p %d g %d m %d v %d", fp, fg, fm, fv);
    const ir_param *pw = &g->params[g->values[t.wte].param], *p1 = &g->params[g->values[t.w1].param];
    const ir_param *pn = &g->params[g->values[t.gnorm].param];
    /* wte: 20 elements at 0; w1 at 20 rounded up to 16 floats (64 bytes) = 32 */
    CHECK("multi_tensor: members are views at aligned offsets",
          g->values[t.wte].view_of == fp && g->values[t.wte].view_offset == 0 &&
          g->values[t.w1].view_of == fp && g->values[t.w1].view_offset == 128 &&
          g->values[pw->grad].view_of == fg && g->values[p1->grad].view_offset == 128 &&
          g->values[pw->state0].view_of == fm && g->values[p1->state1].view_of == fv &&
          g->values[p1->state1].view_offset == 128,
          "wte view of %d +%" PRIu64 ", w1 view of %d +%" PRIu64, g->values[t.wte].view_of,
          g->values[t.wte].view_offset, g->values[t.w1].view_of, g->values[t.w1].view_offset);
    CHECK("multi_tensor: the single and the tied stay plain", g->values[t.gnorm].view_of < 0 &&
          g->values[pn->grad].view_of < 0 && g->values[t.lm_head].view_of < 0, "gnorm view of %d",
          g->values[t.gnorm].view_of);
    int flat = -1, fill = -1;
    for (int i = 0; i < g->nnodes; i++) {
        if (iop_kind_of(g->nodes[i].def) == IOP_ADAMW && g->nodes[i].inputs[0] == fp)
            flat = i;
        if (iop_kind_of(g->nodes[i].def) == IOP_FILL_INPLACE && g->nodes[i].inputs[0] == fg)
            fill = i;
    }
    CHECK("multi_tensor: the group's update", flat >= 0 && g->nodes[flat].dims[0] == 48 &&
          g->nodes[flat].inputs[1] == fg && g->nodes[flat].inputs[2] == fm &&
          g->nodes[flat].inputs[3] == fv && fabs(g->nodes[flat].attrs[0].f - 0.1) < 1e-6 &&
          strcmp(g->nodes[flat].what, "adamw 2 tensors (multi-tensor)") == 0,
          "node %d n=%" PRId64, flat, flat >= 0 ? g->nodes[flat].dims[0] : -1);
    CHECK("multi_tensor: the group's fill after its update", fill > flat && g->nodes[fill].dims[0] == 48,
          "fill %d update %d", fill, flat);
    /* planner: views at base + offset; pools as large as without the pass */
    const ir_value *v = g->values;
    CHECK("multi_tensor: memplan places views", v[t.wte].pool == PLAN_ST_PARAM &&
          v[t.wte].offset == v[fp].offset && v[t.w1].offset == v[fp].offset + 128 &&
          v[p1->grad].offset == v[fg].offset + 128 && v[p1->state0].offset == v[fm].offset + 128 &&
          v[t.lm_head].offset == v[t.wte].offset,
          "flat @%" PRIu64 " wte @%" PRIu64 " w1 @%" PRIu64, v[fp].offset, v[t.wte].offset, v[t.w1].offset);
    CHECK("multi_tensor: pools unchanged", g->pool_bytes[PLAN_ST_PARAM] == 128 + 64 + 64 &&
          g->pool_bytes[PLAN_ST_GRAD] == 256 && g->pool_bytes[PLAN_ST_OPTSTATE] == 512,
          "%" PRId64 " %" PRId64 " %" PRId64, g->pool_bytes[PLAN_ST_PARAM],
          g->pool_bytes[PLAN_ST_GRAD], g->pool_bytes[PLAN_ST_OPTSTATE]);
    char why[512] = "";
    CHECK("multi_tensor: verify accepts views", memplan_verify(g, why, sizeof why) == 0, "%s", why);
    /* two members of one buffer must still not overlap */
    uint64_t keep = g->values[t.w1].offset;
    g->values[t.w1].offset = g->values[t.wte].offset + 64;
    CHECK("multi_tensor: verify catches overlapping members", memplan_verify(g, why, sizeof why) == -1 &&
          strstr(why, "'wte'") && strstr(why, "'w1'") && strstr(why, "overlap"), "%s", why);
    printf("# verify says: %s\n", why);
    g->values[t.w1].offset = keep;
    /* a second run finds only views and singles: nothing changes */
    int nn = g->nnodes, nv = g->nvalues;
    CHECK("multi_tensor: idempotent", pass_multi_tensor(g, &err) == 0 && g->nnodes == nn &&
          g->nvalues == nv, "%d -> %d nodes", nn, g->nnodes);
    ir_graph_free(g);
}

/* A graph of optimizer-phase updates only: param i of dtype dt, n[i]
 * elements, its weight decay wd[i]; hyper and norm shared. */
typedef struct mt_graph {
    ir_graph *g;
    int p[8], grad[8], hyper, norm;
} mt_graph;

static void mt_build(mt_graph *m, int np, int dt, const int64_t *n, const double *wd)
{
    ir_graph *g = ir_graph_new();
    m->g = g;
    g->model_name = "mt";
    g->train.optimizer = PLAN_OPT_ADAMW;
    int64_t nh = MOEK_HYPER_COUNT, one = 1;
    m->hyper = ir_value_add(g, "hyper", PLAN_F32, PLAN_ST_INPUT, 1, &nh);
    g->values[m->hyper].role = PLAN_ROLE_HYPER;
    m->norm = ir_value_add(g, "grad_norm_sq", PLAN_F32, PLAN_ST_ACT, 1, &one);
    g->values[m->norm].role = PLAN_ROLE_NORM_SQ;
    ir_srcloc loc = {"t.moe", 1, 1};
    for (int i = 0; i < np; i++) {
        char name[16];
        snprintf(name, sizeof name, "w%d", i);
        ir_param pp;
        memset(&pp, 0, sizeof pp);
        pp.expert_axis = pp.tied_to = pp.master = -1;
        pp.decay = wd[i] != 0;
        m->p[i] = ir_value_add(g, name, dt, PLAN_ST_PARAM, 1, &n[i]);
        ir_param_add(g, m->p[i], &pp);
        ir_param *q = &g->params[i];
        q->grad = m->grad[i] = ir_value_add(g, ir_strfmt(g, "%s.grad", name), PLAN_F32, PLAN_ST_GRAD, 1, &n[i]);
        q->state0 = ir_value_add(g, ir_strfmt(g, "%s.m", name), PLAN_F32, PLAN_ST_OPTSTATE, 1, &n[i]);
        q->state1 = ir_value_add(g, ir_strfmt(g, "%s.v", name), PLAN_F32, PLAN_ST_OPTSTATE, 1, &n[i]);
        if (dt != PLAN_F32)
            q->master = ir_value_add(g, ir_strfmt(g, "%s.master", name), PLAN_F32, PLAN_ST_OPTSTATE, 1, &n[i]);
        q = &g->params[i];
        int full[7] = {q->value, q->master, q->grad, q->state0, q->state1, m->hyper, m->norm};
        int f32[6] = {q->value, q->grad, q->state0, q->state1, m->hyper, m->norm};
        iop_node(g, iop_for_dtype(IOP_ADAMW, dt), dt != PLAN_F32 ? full : f32, NULL, n[i], wd[i],
                 PLAN_PHASE_OPTIMIZER, loc, "adamw");
    }
    for (int i = 0; i < np; i++)
        iop_node(g, IOP_FILL_INPLACE, &m->grad[i], NULL, n[i], 0.0, PLAN_PHASE_OPTIMIZER, loc, "zero grad");
}

static void test_bf16_and_skips(void)
{
    /* bf16: offsets aligned to 32 elements, so 64 bytes in p and 128 in the rest */
    mt_graph m;
    const int64_t n[4] = {20, 40, 8, 8};
    const double wd[4] = {0.1, 0.1, 0.1, 0.0};
    mt_build(&m, 4, PLAN_BF16, n, wd);
    ir_graph *g = m.g;
    moec_error err;
    int rc = pass_multi_tensor(g, &err);
    rc = rc ? rc : pass_memplan(g, &err);
    CHECK("multi_tensor bf16: compiles", rc == 0, "%s", err.msg);
    int fp = find_value(g, "__mt0.p"), fmaster = find_value(g, "__mt0.master");
    const ir_value *v = g->values;
    /* w0 at 0, w1 at 32, w2 at 32 + 40 -> 96: 104 elements */
    CHECK("multi_tensor bf16: flat buffers", fp >= 0 && fmaster >= 0 && v[fp].dtype == PLAN_BF16 &&
          v[fmaster].dtype == PLAN_F32 && ir_value_numel(&v[fp]) == 104 &&
          count_kind(g, IOP_ADAMW_BF16) == 2, "p %d master %d", fp, fmaster);
    CHECK("multi_tensor bf16: offsets per element size", v[m.p[1]].view_offset == 64 &&
          v[m.p[2]].view_offset == 192 && v[g->params[1].master].view_offset == 128 &&
          v[g->params[2].grad].view_offset == 384 && v[m.p[3]].view_of < 0 &&
          v[g->params[2].master].offset == v[fmaster].offset + 384,
          "w1 +%" PRIu64 " w2 +%" PRIu64, v[m.p[1]].view_offset, v[m.p[2]].view_offset);
    char why[512] = "";
    CHECK("multi_tensor bf16: verify", memplan_verify(g, why, sizeof why) == 0, "%s", why);
    ir_graph_free(g);

    /* per tensor: frozen, tied, already a view, another hyper; ZeRO: all */
    const int64_t n4[4] = {16, 16, 16, 16};
    const double wd4[4] = {0.1, 0.1, 0.1, 0.1};
    mt_build(&m, 4, PLAN_F32, n4, wd4);
    g = m.g;
    g->params[0].frozen = true;
    CHECK("multi_tensor skips: frozen", pass_multi_tensor(g, &err) == 0 &&
          g->values[m.p[0]].view_of < 0 && g->values[m.p[1]].view_of >= 0 &&
          count_kind(g, IOP_ADAMW) == 2, "w0 view of %d, %d updates", g->values[m.p[0]].view_of,
          count_kind(g, IOP_ADAMW));
    ir_graph_free(g);
    /* w1 tied, w2's v a view of w3's v: only w0 and w4 are grouped */
    const int64_t n5[5] = {16, 16, 16, 16, 16};
    const double wd5[5] = {0.1, 0.1, 0.1, 0.1, 0.1};
    mt_build(&m, 5, PLAN_F32, n5, wd5);
    g = m.g;
    g->params[1].tied_to = 0;
    g->values[g->params[2].state1].view_of = g->params[3].state1;
    CHECK("multi_tensor skips: tied, views and bases of views", pass_multi_tensor(g, &err) == 0 &&
          g->values[m.p[1]].view_of < 0 && g->values[m.p[2]].view_of < 0 &&
          g->values[m.p[3]].view_of < 0 && g->values[m.p[4]].view_of >= 0 &&
          count_kind(g, IOP_ADAMW) == 4, "%d updates", count_kind(g, IOP_ADAMW));
    ir_graph_free(g);
    mt_build(&m, 4, PLAN_F32, n4, wd4);
    g = m.g;
    int64_t nh = MOEK_HYPER_COUNT;
    g->nodes[3].inputs[4] = ir_value_add(g, "hyper2", PLAN_F32, PLAN_ST_INPUT, 1, &nh);
    g->nodes[2].attrs[0].f = 0.2;
    CHECK("multi_tensor: groups by hyper and decay", pass_multi_tensor(g, &err) == 0 &&
          count_kind(g, IOP_ADAMW) == 3 && find_value(g, "__mt0.p") >= 0 && find_value(g, "__mt1.p") < 0,
          "%d updates", count_kind(g, IOP_ADAMW));
    ir_graph_free(g);
    mt_build(&m, 4, PLAN_F32, n4, wd4);
    g = m.g;
    g->par_zero = 1;
    CHECK("multi_tensor skips: ZeRO plans", pass_multi_tensor(g, &err) == 0 &&
          count_kind(g, IOP_ADAMW) == 4 && find_value(g, "__mt0.p") < 0, "%d updates",
          count_kind(g, IOP_ADAMW));
    ir_graph_free(g);
    /* a grad zeroed twice (or not whole): its param stays per tensor */
    mt_build(&m, 4, PLAN_F32, n4, wd4);
    g = m.g;
    ir_srcloc loc = {"t.moe", 1, 1};
    iop_node(g, IOP_FILL_INPLACE, &m.grad[0], NULL, 8, 0.0, PLAN_PHASE_OPTIMIZER, loc, "half");
    CHECK("multi_tensor skips: grad not zeroed by one fill", pass_multi_tensor(g, &err) == 0 &&
          g->values[m.p[0]].view_of < 0 && count_kind(g, IOP_ADAMW) == 2 &&
          count_kind(g, IOP_FILL_INPLACE) == 3, "%d updates %d fills", count_kind(g, IOP_ADAMW),
          count_kind(g, IOP_FILL_INPLACE));
    ir_graph_free(g);
}

/* Every way a view can be wrong gets its message from the planner. */
static void test_view_errors(void)
{
    static const char *const want[] = {
        "its base is not a value", "its base is a view itself", "its base has another storage class",
        "activations cannot be views", "its base has no place in the plan", "the offset is not aligned",
        "it does not fit inside its base"};
    for (int c = 0; c < 7; c++) {
        ir_graph *g = ir_graph_new();
        g->model_name = "v";
        int64_t n16 = 16, n4 = 4;
        int base = ir_value_add(g, "base", PLAN_F32, PLAN_ST_PARAM, 1, &n16);
        int other = ir_value_add(g, "other", PLAN_F32, PLAN_ST_PARAM, 1, &n16);
        int in = ir_value_add(g, "unused_input", PLAN_F32, PLAN_ST_INPUT, 1, &n16);
        int view = ir_value_add(g, "w", PLAN_F32, c == 3 ? PLAN_ST_ACT : PLAN_ST_PARAM, 1,
                                c == 6 ? &n16 : &n4);
        ir_value *w = &g->values[view];
        w->view_of = c == 0 ? 99 : c == 4 ? in : base;
        w->view_offset = c == 5 ? 8 : c == 6 ? 64 : 0;
        if (c == 1)
            g->values[base].view_of = other;
        if (c == 2)
            g->values[base].storage = PLAN_ST_OPTSTATE;
        if (c == 3)
            g->values[base].storage = PLAN_ST_ACT;
        if (c == 4)
            g->values[view].storage = PLAN_ST_INPUT;
        moec_error err;
        memset(&err, 0, sizeof err);
        int rc = pass_memplan(g, &err);
        char name[64];
        snprintf(name, sizeof name, "multi_tensor: view error %d", c);
        CHECK(name, rc == -1 && strstr(err.msg, want[c]) && strstr(err.msg, "view 'w'") &&
              strstr(err.hint, "compiler bug"), "rc %d: %s", rc, err.msg);
        printf("# %s\n", err.msg);
        ir_graph_free(g);
    }
}

/* The gaps: with zeros in every buffer and a zero gradient, AdamW and SGD
 * (fp32 and bf16) leave a zero element at zero, and a member's elements
 * come out as they would from its own launch. */
static void test_gaps(void)
{
    int st = 0;
    moek_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.status = &st;
    float hyper[MOEK_HYPER_COUNT] = {0};
    hyper[MOEK_HYPER_LR] = 0.01f;
    hyper[MOEK_HYPER_BETA1] = 0.9f;
    hyper[MOEK_HYPER_BETA2] = 0.95f;
    hyper[MOEK_HYPER_EPS] = 1e-8f;
    hyper[MOEK_HYPER_BC1] = 0.1f;
    hyper[MOEK_HYPER_BC2] = 0.05f;
    hyper[MOEK_HYPER_MAX_NORM] = 1.0f;
    hyper[MOEK_HYPER_MOMENTUM] = 0.9f;
    float norm = 4.0f;
    enum { N = 48, A = 20, B = 32, NB = 16 };   /* member a [0,20), gap [20,32), member b [32,48) */
    float p[N] = {0}, g[N] = {0}, m[N] = {0}, v[N] = {0}, p1[N], g1[N], m1[N], v1[N];
    for (int i = 0; i < N; i++)
        if (i < A || i >= B) {
            p[i] = 0.05f * (float)((i * 7) % 11 - 5);
            g[i] = 0.3f * (float)((i * 5) % 13 - 6);
            m[i] = 0.01f * (float)(i % 3);
            v[i] = 0.002f * (float)(i % 4);
        }
    memcpy(p1, p, sizeof p), memcpy(g1, g, sizeof g), memcpy(m1, m, sizeof m), memcpy(v1, v, sizeof v);
    for (int s = 0; s < 3; s++) {
        moek_adamw(&ctx, p, g, m, v, N, hyper, &norm, 0.1f);
        moek_adamw(&ctx, p1, g1, m1, v1, A, hyper, &norm, 0.1f);
        moek_adamw(&ctx, p1 + B, g1 + B, m1 + B, v1 + B, NB, hyper, &norm, 0.1f);
    }
    int gap0 = 1;
    for (int i = A; i < B; i++)
        gap0 &= p[i] == 0 && m[i] == 0 && v[i] == 0;
    CHECK("multi_tensor: adamw keeps the gap at zero", gap0 && st == 0, "p[%d] = %g", A, (double)p[A]);
    CHECK("multi_tensor: adamw flat = per tensor, bit for bit",
          memcmp(p, p1, sizeof p) == 0 && memcmp(m, m1, sizeof m) == 0 && memcmp(v, v1, sizeof v) == 0,
          "p[0] %g vs %g", (double)p[0], (double)p1[0]);
    moek_sgd(&ctx, p, g, m, N, hyper, &norm, 0.1f);
    gap0 = 1;
    for (int i = A; i < B; i++)
        gap0 &= p[i] == 0 && m[i] == 0;
    CHECK("multi_tensor: sgd keeps the gap at zero", gap0, "p[%d] = %g", A, (double)p[A]);
    moek_bf16 pb[N];
    memset(pb, 0, sizeof pb);
    float master[N] = {0};
    memset(m, 0, sizeof m), memset(v, 0, sizeof v);
    for (int i = 0; i < N; i++)
        master[i] = i < A || i >= B ? 0.5f : 0.0f;
    moek_adamw_bf16(&ctx, pb, master, g, m, v, N, hyper, &norm, 0.1f);
    moek_sgd_bf16(&ctx, pb, master, g, m, N, hyper, &norm, 0.1f);
    gap0 = 1;
    for (int i = A; i < B; i++)
        gap0 &= pb[i] == 0 && master[i] == 0 && m[i] == 0 && v[i] == 0;
    CHECK("multi_tensor: bf16 updates keep the gap at zero", gap0 && pb[0] != 0, "pb[0] %u", pb[0]);
}

int main(void)
{
    test_fanout();
    test_bf16_and_skips();
    test_view_errors();
    test_gaps();
    return check_failures ? 1 : 0;
}
