/* test_schedule_overlap.c - the schedule pass issues collectives early
 * (docs/passes.md, "schedule"; docs/parallel.md, "Overlap").
 *
 * Includes compiler/pass_schedule.c itself, so it can run the memory-only
 * half of the pass (sc_by_memory, the pass as it was before collectives
 * were placed) beside the whole pass:
 * - a hand-written IR snippet: a collective written after independent
 *   backward compute moves up to just after its gradient's accumulate, and
 *   one whose gradient comes last cannot move;
 * - a one-rank plan (tiny_moe) is byte for byte the plan of the memory-only
 *   pass (nothing to issue early), while a two-rank plan differs and issues
 *   its first all-reduce inside backward, ahead of backward compute. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "test_compiler_graphs.h"
#include "../../compiler/pass_schedule.c"
#include "../../compiler/elaborate.h"
#include "../../compiler/fuse.h"
#include "diag.h"

/* a one-tensor all-reduce, as the "@comm" ops are: no outputs, updates in place */
static const ir_opdef *so_def_allreduce(ir_graph *g)
{
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = "__comm_test_allreduce";
    d.lib = COMM_LIB;
    d.ninputs = 1;
    d.input_names[0] = "buf";
    d.ndims = 1;
    d.dim_names[0] = "n";
    d.nattrs = 1;
    d.attr_names[0] = "group";
    d.attr_kinds[0] = PLAN_ARG_I64;
    d.fwd_symbol = "moec_comm_allreduce_f32";
    ir_ref t[] = {T_IN(0), T_DIM(0), T_ATTR(0)};
    d.nfwd = 3;
    memcpy(d.fwd, t, sizeof t);
    return tg_reg(g, &d);
}

static int so_find(const ir_graph *g, const char *what)
{
    for (int i = 0; i < g->nnodes; i++)
        if (g->nodes[i].what && strcmp(g->nodes[i].what, what) == 0)
            return i;
    return -1;
}

static int so_collective_on(const ir_graph *g, int v)
{
    for (int i = 0; i < g->nnodes; i++)
        if (g->nodes[i].def->lib && strcmp(g->nodes[i].def->lib, COMM_LIB) == 0 && g->nodes[i].inputs[0] == v)
            return i;
    return -1;
}

static void snippet(void)
{
    tg_ids t;
    ir_graph *g = tg_chain(&t);
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = pass_autodiff(g, &err) || pass_optimizer(g, &err);
    int head = g->values[t.lm_head].param, wte = g->values[t.wte].param;
    int ghead = g->params[head].grad, gwte = g->params[wte].grad;
    /* both collectives at the end of backward, after all compute */
    int end = 0;
    while (end < g->nnodes && g->nodes[end].phase != PLAN_PHASE_OPTIMIZER)
        end++;
    int order[256], no = 0, n0 = g->nnodes;
    for (int k = 0; k < 2; k++) {
        ir_node c;
        memset(&c, 0, sizeof c);
        c.def = so_def_allreduce(g);
        for (int i = 0; i < IR_MAX_PORTS; i++)
            c.inputs[i] = c.outputs[i] = c.grads_in[i] = c.grads_out[i] = -1;
        c.inputs[0] = k == 0 ? ghead : gwte;
        c.dims[0] = ir_value_numel(&g->values[c.inputs[0]]);
        c.attrs[0].i = COMM_GROUP_DP;
        c.phase = PLAN_PHASE_BACKWARD;
        c.grad_of = -1;
        c.what = k == 0 ? "all-reduce lm_head.grad" : "all-reduce wte.grad";
        ir_node_add(g, &c);
    }
    for (int i = 0; i < n0; i++) {
        if (i == end)
            order[no++] = n0, order[no++] = n0 + 1;
        order[no++] = i;
    }
    pu_reorder(g, order, no);
    int c_head = so_collective_on(g, ghead), mm1_bwd = tg_bwd_of(g, t.n_mm1);
    CHECK("snippet: the collectives start after all backward compute", rc == 0 && c_head > mm1_bwd,
          "rc %d, collective at %d, w1's matmul backward at %d", rc, c_head, mm1_bwd);
    rc = pass_schedule(g, &err);
    c_head = so_collective_on(g, ghead);
    int c_wte = so_collective_on(g, gwte), acc_head = so_find(g, "accumulate lm_head.grad");
    mm1_bwd = tg_bwd_of(g, t.n_mm1);
    int emb_bwd = tg_bwd_of(g, t.n_embed), acc_wte = so_find(g, "accumulate wte.grad");
    CHECK("snippet: lm_head's all-reduce runs right after its accumulate, before independent compute",
          rc == 0 && acc_head >= 0 && c_head == acc_head + 1 && c_head < mm1_bwd,
          "accumulate at %d, all-reduce at %d, w1's matmul backward at %d", acc_head, c_head, mm1_bwd);
    CHECK("snippet: wte's all-reduce still waits for its gradient, and the order of collectives holds",
          c_wte > acc_wte && acc_wte > emb_bwd && c_wte > c_head && g->nodes[c_wte].phase == PLAN_PHASE_BACKWARD,
          "embedding backward %d, accumulate %d, all-reduce %d (lm_head's at %d)", emb_bwd, acc_wte, c_wte, c_head);
    char why[256] = "";
    rc = pass_memplan(g, &err);
    CHECK("snippet: the plan verifies", rc == 0 && memplan_verify(g, why, sizeof why) == 0, "%s", why);
    ir_graph_free(g);
}

/* The schedule pass as it was before collectives were placed. */
static int so_memory_only(ir_graph *g, moec_error *err)
{
    (void)err;
    sc_by_memory(g);
    for (int v = 0; v < g->nvalues; v++)
        g->values[v].pool = -1, g->values[v].offset = 0;
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        g->pool_bytes[s] = 0;
    return 0;
}

/* compiler/main.c's -O2 pipeline with schedule replaced by sched; emits to out. */
static int so_compile(const char *path, int (*sched)(ir_graph *, moec_error *), const char *out, int *first_comm,
                      int *last_bwd)
{
    int (*const passes[])(ir_graph *, moec_error *) = {pass_cse, pass_fuse, pass_autodiff, pass_parallel,
                                                       pass_optimizer, pass_dce, pass_recompute, sched,
                                                       pass_inplace, pass_memplan};
    diag_ctx *d = diag_new(stderr, 20);
    elab_options opt;
    memset(&opt, 0, sizeof opt);
    opt.stdlib_dir = "stdlib";
    ir_graph *g = elaborate(path, &opt, d);
    diag_free(d);
    if (!g)
        return -1;
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = 0;
    for (size_t i = 0; i < sizeof passes / sizeof *passes && !rc; i++)
        rc = passes[i](g, &err);
    *first_comm = *last_bwd = -1;
    for (int i = 0; i < g->nnodes; i++) {
        if (*first_comm < 0 && g->nodes[i].def->lib && strcmp(g->nodes[i].def->lib, COMM_LIB) == 0)
            *first_comm = i;
        if (g->nodes[i].phase == PLAN_PHASE_BACKWARD && (!g->nodes[i].def->lib || strcmp(g->nodes[i].def->lib, COMM_LIB)))
            *last_bwd = i;
    }
    if (!rc)
        rc = pass_emit(g, out, &err);
    if (rc)
        fprintf(stderr, "# %s: %s\n", path, err.msg);
    ir_graph_free(g);
    return rc;
}

static long so_read(const char *path, char **buf)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    *buf = malloc((size_t)n + 1);
    if (!*buf || fread(*buf, 1, (size_t)n, f) != (size_t)n)
        n = -1;
    fclose(f);
    return n;
}

/* 1: same bytes, 0: different, -1: a file is missing */
static int so_same(const char *a, const char *b)
{
    char *x = NULL, *y = NULL;
    long nx = so_read(a, &x), ny = so_read(b, &y);
    int same = nx < 0 || ny < 0 ? -1 : nx == ny && memcmp(x, y, (size_t)nx) == 0;
    free(x), free(y);
    return same;
}

static void plans(void)
{
    if (access("examples/tiny_moe.moe", R_OK) != 0) {
        SKIP("schedule: plans of tiny_moe", "run from the repository root");
        return;
    }
    char dir[] = "/tmp/moec-overlap-XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK("schedule: plans of tiny_moe", 0, "mkdtemp failed");
        return;
    }
    char a[300], b[300], two[300], a2[300], b2[300];
    snprintf(a, sizeof a, "%s/a.bin", dir);
    snprintf(b, sizeof b, "%s/b.bin", dir);
    snprintf(two, sizeof two, "%s/tiny_moe_r2.moe", dir);
    snprintf(a2, sizeof a2, "%s/a2.bin", dir);
    snprintf(b2, sizeof b2, "%s/b2.bin", dir);
    int fc, lb, fc0, lb0;
    int rc = so_compile("examples/tiny_moe.moe", pass_schedule, a, &fc, &lb) ||
             so_compile("examples/tiny_moe.moe", so_memory_only, b, &fc0, &lb0);
    int same = so_same(a, b);
    CHECK("schedule: a one-rank plan is byte for byte the memory-only schedule's", rc == 0 && same == 1 && fc < 0,
          "rc %d, same %d, first collective %d", rc, same, fc);
    /* the same model on two ranks (tiny_moe imports only the stdlib) */
    FILE *in = fopen("examples/tiny_moe.moe", "r"), *out = fopen(two, "w");
    char line[512];
    while (in && out && fgets(line, sizeof line, in))
        fputs(strncmp(line, "parallel {", 10) == 0 ? "parallel { ranks = 2 }\n" : line, out);
    if (in)
        fclose(in);
    if (out)
        fclose(out);
    rc = so_compile(two, pass_schedule, a2, &fc, &lb) || so_compile(two, so_memory_only, b2, &fc0, &lb0);
    same = so_same(a2, b2);
    CHECK("schedule: on two ranks the first all-reduce moves up inside backward, ahead of backward compute",
          rc == 0 && same == 0 && fc >= 0 && fc < lb && fc < fc0,
          "rc %d, same %d, first collective %d (memory-only %d), last backward op %d", rc, same, fc, fc0, lb);
    unlink(a), unlink(b), unlink(two), unlink(a2), unlink(b2);
    rmdir(dir);
}

int main(void)
{
    snippet();
    plans();
    CHECK_DONE();
}
