/* test_comm.c - the communication interface without MPI: process groups,
 * the single-rank backend, the "@comm" kernels, backend loading errors. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "../../runtime/comm.h"

static void test_groups(void)
{
    /* 8 ranks, expert-parallel 2: EP blocks {0,1},{2,3},..; expert-DP stride 2 */
    comm_group g;
    int ok = comm_group_of(5, 8, 2, COMM_GROUP_EP, &g) == 0 && g.first == 4 && g.stride == 1 &&
             g.size == 2 && g.index == 1;
    ok &= comm_group_of(5, 8, 2, COMM_GROUP_EXPERT_DP, &g) == 0 && g.first == 1 && g.stride == 2 &&
          g.size == 4 && g.index == 2;
    ok &= comm_group_of(5, 8, 2, COMM_GROUP_DP, &g) == 0 && g.first == 0 && g.size == 8 &&
          g.index == 5;
    CHECK("comm.groups_8x2", ok, "rank 5 of 8, ep 2: first %lld stride %lld size %lld index %lld",
          (long long)g.first, (long long)g.stride, (long long)g.size, (long long)g.index);
    CHECK("comm.groups_invalid", comm_group_of(0, 6, 4, COMM_GROUP_EP, &g) == -1 && comm_group_of(6, 6, 2, 0, &g) == -1 &&
          comm_group_of(0, 4, 2, 9, &g) == -1, "an impossible layout was accepted");
    /* every rank is in exactly one group of each kind */
    int bad = 0;
    for (int id = 1; id < COMM_NGROUPS; id++) {
        int seen[12] = {0};
        for (int r = 0; r < 12; r++) {
            comm_group_of(r, 12, 3, id, &g);
            for (int k = 0; k < g.size; k++)
                if (g.first + k * g.stride == r)
                    seen[r]++;
        }
        for (int r = 0; r < 12; r++)
            bad += seen[r] != 1;
    }
    CHECK("comm.groups_partition", bad == 0, "%d ranks not in exactly one group", bad);
    char buf[512] = "";
    FILE *f = fmemopen(buf, sizeof buf, "w");
    comm_print_layout(4, 2, f);
    fclose(f);
    CHECK("comm.print_layout", strcmp(buf, "  dp         {0,1,2,3}\n  ep         {0,1} {2,3}\n"
                      "  expert-dp  {0,2} {1,3}\n") == 0, "got:\n%s", buf);
}

static void test_single(void)
{
    char err[512] = "";
    comm_opts o = {"single", "", 1, 5, 0};
    comm *c = comm_open(&o, err, sizeof err);
    CHECK("comm.single_open", c && comm_rank(c) == 0 && comm_world(c) == 1 && strcmp(comm_backend_name(c), "single") == 0, "%s", err);
    if (!c)
        return;
    /* the collective kernels leave data unchanged on one rank */
    float a[3] = {1, 2, 3}, b[2] = {-4, 5};
    int status = 0;
    moek_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.status = &status;
    ctx.comm = c;
    moec_comm_allreduce_f32_multi(&ctx, COMM_GROUP_DP, 0, 2, a, 3, b, 2, a, 0, a, 0, a, 0, a, 0, a, 0,
                                  a, 0);
    moec_comm_allreduce_f32(&ctx, a, 3, COMM_GROUP_WORLD);
    CHECK("comm.single_identity", status == 0 && a[0] == 1 && a[2] == 3 && b[0] == -4 && b[1] == 5,
          "status %d a %g %g b %g", status, a[0], a[2], b[0]);
    double d[2] = {1.5, -2};
    CHECK("comm.single_host", comm_allreduce_host(c, d, 2, COMM_GROUP_DP, "loss", err, sizeof err) == 0 && d[0] == 1.5 &&
          d[1] == -2 && comm_error(c)[0] == 0, "%s", err);
    comm_abort(c, 1);   /* one rank: nothing to end */
    comm_close(c);
    /* a plan run without a comm (tests, tools): the kernels are no-ops too */
    ctx.comm = NULL;
    moec_comm_allreduce_f32(&ctx, a, 3, COMM_GROUP_DP);
    CHECK("comm.null_comm", status == 0 && a[1] == 2, "status %d", status);
    void *p = comm_symbol("moec_comm_allreduce_f32_multi");
    CHECK("comm.symbols", p != NULL && comm_symbol("moec_comm_bogus") == NULL,
          "the @comm symbol table is wrong");
}

static void test_load_errors(void)
{
    char err[1024] = "";
    comm_opts o = {"tcp", "", 1, 5, 0};
    CHECK("comm.unknown_backend", !comm_open(&o, err, sizeof err) && strstr(err, "unknown communication backend 'tcp'"), "%s", err);
    /* no library anywhere: says what to build and where it looked */
    setenv("MOEC_KERNELS", "/nonexistent-moec-dir", 1);
    comm_opts m = {"mpi", "", 1, 5, 0};
    err[0] = '\0';
    CHECK("comm.backend_missing", !comm_open(&m, err, sizeof err) &&
          strstr(err, "cannot load the mpi backend libmoec_comm_mpi.so (not found; searched "
                      "/nonexistent-moec-dir); build it with `make comm-mpi`"), "%s", err);
    unsetenv("MOEC_KERNELS");
    /* auto outside mpirun is single */
    unsetenv("OMPI_COMM_WORLD_SIZE");
    unsetenv("PMI_SIZE");
    unsetenv("PMIX_RANK");
    unsetenv("MPI_LOCALNRANKS");
    comm_opts a = {NULL, "", 1, 5, 0};
    comm *c = comm_open(&a, err, sizeof err);
    CHECK("comm.auto_single", c && strcmp(comm_backend_name(c), "single") == 0, "%s", err);
    comm_close(c);
}

int main(void)
{
    test_groups();
    test_single();
    test_load_errors();
    return check_failures ? 1 : 0;
}
