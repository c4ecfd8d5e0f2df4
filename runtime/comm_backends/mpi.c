/* mpi.c - the MPI communication backend, built with mpicc into
 * libmoec_comm_mpi.so and dlopened by run (run itself never links MPI).
 *
 * Deadlines: every collective is non-blocking and polled until a deadline.
 * Before it, each rank posts a tiny "arrival" message (its collective
 * sequence number) to every peer of the group on a private communicator, so
 * a rank whose collective times out can name the peers that never arrived
 * (a stuck or dead rank) and detect peers that are at a different
 * collective (a plan bug).  The runtime then calls abort, which ends the job
 * on every rank (MPI_Abort).
 *
 * Test hook: MOEC_TEST_STALL_RANK=r makes rank r sleep before its
 * MOEC_TEST_STALL_AT-th collective (default 3) instead of joining it.
 */
#include <mpi.h>

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../comm.h"

#define ARRIVE_TAG 7

typedef struct mpi_group {
    MPI_Comm comm, arrive;     /* the collective's communicator and the arrival one */
    int size, rank;
    int *world_of;             /* group rank -> world rank */
} mpi_group;

typedef struct mpi_impl {
    int rank, world, we_init;
    double timeout_s;
    int64_t seq;               /* collectives started on this rank */
    int64_t stall_at;          /* test hook; -1 off */
    mpi_group g[COMM_NGROUPS];
    float *stage;              /* packs a bucket into one buffer */
    int64_t stage_cap;
    float *rs_recv;            /* reduce-scatter: every rank's block for this rank */
    int64_t rs_recv_cap;
    int64_t *arrived;          /* per peer */
    MPI_Request *reqs;         /* 2 per peer + 1 */
} mpi_impl;

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int make_group(mpi_impl *m, int id, int64_t ep, mpi_group *g)
{
    comm_group cg;
    if (comm_group_of(m->rank, m->world, ep, id, &cg))
        return -1;
    /* color: the group's first rank; key: the position in it */
    if (MPI_Comm_split(MPI_COMM_WORLD, (int)cg.first, (int)cg.index, &g->comm) != MPI_SUCCESS ||
        MPI_Comm_dup(g->comm, &g->arrive) != MPI_SUCCESS)
        return -1;
    MPI_Comm_size(g->comm, &g->size);
    MPI_Comm_rank(g->comm, &g->rank);
    g->world_of = calloc((size_t)g->size, sizeof *g->world_of);
    if (!g->world_of || g->size != cg.size)
        return -1;
    for (int k = 0; k < g->size; k++)
        g->world_of[k] = (int)(cg.first + k * cg.stride);
    return 0;
}

static int mpi_init(void **impl, const comm_init_args *a, int *rank, int *world, char *err,
                    size_t errlen)
{
    int inited = 0;
    MPI_Initialized(&inited);
    mpi_impl *m = calloc(1, sizeof *m);
    if (!m)
        return fail(err, errlen, "out of memory");
    if (!inited) {
        int provided;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            free(m);
            return fail(err, errlen, "MPI_Init failed; start run with mpirun");
        }
        m->we_init = 1;
    }
    /* errors come back as codes, never as MPI's own abort */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &m->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &m->world);
    m->timeout_s = a->timeout_s;
    m->stall_at = -1;
    const char *sr = getenv("MOEC_TEST_STALL_RANK"), *sa = getenv("MOEC_TEST_STALL_AT");
    if (sr && atoi(sr) == m->rank)
        m->stall_at = sa ? atoll(sa) : 3;
    if (a->expert < 1 || m->world % a->expert) {
        fail(err, errlen, "expert-parallel size %" PRId64 " does not divide the %d ranks started",
             a->expert, m->world);
        goto bad;
    }
    for (int id = 0; id < COMM_NGROUPS; id++)
        if (make_group(m, id, a->expert, &m->g[id])) {
            fail(err, errlen, "cannot create the %s group", comm_group_name(id));
            goto bad;
        }
    m->arrived = calloc((size_t)m->world, sizeof *m->arrived);
    m->reqs = calloc((size_t)m->world * 2 + 1, sizeof *m->reqs);
    if (!m->arrived || !m->reqs) {
        fail(err, errlen, "out of memory");
        goto bad;
    }
    *rank = m->rank;
    *world = m->world;
    *impl = m;
    return 0;
bad:
    if (m->we_init)
        MPI_Finalize();
    free(m);
    return -1;
}

/* Names the peers whose arrival message is missing; 0 when all arrived. */
static int missing_peers(mpi_impl *m, const mpi_group *g, char *buf, size_t n)
{
    int nmiss = 0;
    size_t l = 0;
    buf[0] = '\0';
    for (int k = 0, q = 0; k < g->size; k++) {
        if (k == g->rank)
            continue;
        int done = 0;
        MPI_Test(&m->reqs[2 * q + 1], &done, MPI_STATUS_IGNORE);
        if (!done && l < n) {
            l += (size_t)snprintf(buf + l, n - l, "%s%d", nmiss ? ", " : "", g->world_of[k]);
            nmiss++;
        }
        q++;
    }
    return nmiss;
}

/* Runs one collective (op posts it into *req) with arrival messages and a
 * deadline. */
static int run_collective(mpi_impl *m, int group, const char *what,
                          int (*post)(void *arg, MPI_Comm c, MPI_Request *req), void *arg,
                          char *err, size_t errlen)
{
    mpi_group *g = &m->g[group];
    int64_t seq = ++m->seq;
    if (seq == m->stall_at) {
        /* test hook: behave like a rank stuck in a long kernel */
        sleep((unsigned)(m->timeout_s * 10 + 30));
    }
    int npeer = 0;
    for (int k = 0; k < g->size; k++) {
        if (k == g->rank)
            continue;
        if (MPI_Isend(&m->seq, 1, MPI_INT64_T, k, ARRIVE_TAG, g->arrive, &m->reqs[2 * npeer]) ||
            MPI_Irecv(&m->arrived[npeer], 1, MPI_INT64_T, k, ARRIVE_TAG, g->arrive,
                      &m->reqs[2 * npeer + 1]))
            return fail(err, errlen, "rank %d: posting collective #%" PRId64 " (%s) failed",
                        m->rank, seq, what);
        npeer++;
    }
    MPI_Request *coll = &m->reqs[2 * npeer];
    if (post(arg, g->comm, coll))
        return fail(err, errlen, "rank %d: MPI refused collective #%" PRId64 " (%s, group %s)",
                    m->rank, seq, what, comm_group_name(group));
    int nreq = 2 * npeer + 1;
    double deadline = now_s() + m->timeout_s;
    for (long spins = 0;; spins++) {
        int done = 0;
        if (MPI_Testall(nreq, m->reqs, &done, MPI_STATUSES_IGNORE) != MPI_SUCCESS)
            return fail(err, errlen, "rank %d: collective #%" PRId64 " (%s, group %s) failed in "
                        "MPI (a peer died?)", m->rank, seq, what, comm_group_name(group));
        if (done)
            break;
        if ((spins & 63) == 63) {
            if (now_s() > deadline) {
                char miss[256];
                if (missing_peers(m, g, miss, sizeof miss))
                    return fail(err, errlen, "rank %d: collective #%" PRId64 " (%s, group %s) "
                                "timed out after %g s waiting for rank %s, which never reached it "
                                "(stuck or dead); ending the job", m->rank, seq, what,
                                comm_group_name(group), m->timeout_s, miss);
                return fail(err, errlen, "rank %d: collective #%" PRId64 " (%s, group %s) timed "
                            "out after %g s although every rank arrived; ending the job",
                            m->rank, seq, what, comm_group_name(group), m->timeout_s);
            }
            /* oversubscribed CPU ranks: give the core to the peer */
            struct timespec ts = {0, spins < 4096 ? 2000 : 50000};
            nanosleep(&ts, NULL);
        }
    }
    for (int q = 0; q < npeer; q++)
        if (m->arrived[q] != seq) {
            int peer = g->world_of[q < g->rank ? q : q + 1];
            return fail(err, errlen, "rank %d: collective #%" PRId64 " (%s) met rank %d at its "
                        "collective #%" PRId64 "; the ranks run different plans or steps", m->rank,
                        seq, what, peer, m->arrived[q]);
        }
    return 0;
}

typedef struct ar_args { void *buf; int64_t n; MPI_Datatype type; } ar_args;

static int post_allreduce(void *arg, MPI_Comm c, MPI_Request *req)
{
    ar_args *a = arg;
    return MPI_Iallreduce(MPI_IN_PLACE, a->buf, (int)a->n, a->type, MPI_SUM, c, req) !=
           MPI_SUCCESS;
}

/* Grows a kept float buffer to n elements; -1 when out of memory. */
static int grow_floats(float **p, int64_t *cap, int64_t n)
{
    if (n <= *cap)
        return 0;
    float *q = realloc(*p, (size_t)n * sizeof *q);
    if (!q)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

static int mpi_allreduce_f32(void *impl, float *const *bufs, const int64_t *ns, int count,
                             int group, const char *what, char *err, size_t errlen)
{
    mpi_impl *m = impl;
    if (group < 0 || group >= COMM_NGROUPS)
        return fail(err, errlen, "rank %d: collective names unknown group %d", m->rank, group);
    if (m->g[group].size == 1)
        return 0;
    int64_t total = 0;
    for (int i = 0; i < count; i++)
        total += ns[i];
    if (total > INT32_MAX)
        return fail(err, errlen, "rank %d: %s of %" PRId64 " elements exceeds MPI's int count; "
                    "use smaller buckets", m->rank, what, total);
    ar_args a = {bufs[0], total, MPI_FLOAT};
    if (count > 1) {
        if (grow_floats(&m->stage, &m->stage_cap, total))
            return fail(err, errlen, "rank %d: out of memory for a %" PRId64 "-float bucket",
                        m->rank, total);
        for (int i = 0, at = 0; i < count; at += (int)ns[i], i++)
            memcpy(m->stage + at, bufs[i], (size_t)ns[i] * sizeof(float));
        a.buf = m->stage;
    }
    if (run_collective(m, group, what, post_allreduce, &a, err, errlen))
        return -1;
    if (count > 1)
        for (int i = 0, at = 0; i < count; at += (int)ns[i], i++)
            memcpy(bufs[i], m->stage + at, (size_t)ns[i] * sizeof(float));
    return 0;
}

static int mpi_allreduce_host(void *impl, double *buf, int64_t n, int group, const char *what,
                              char *err, size_t errlen)
{
    mpi_impl *m = impl;
    if (group < 0 || group >= COMM_NGROUPS)
        return fail(err, errlen, "rank %d: collective names unknown group %d", m->rank, group);
    if (m->g[group].size == 1)
        return 0;
    ar_args a = {buf, n, MPI_DOUBLE};
    return run_collective(m, group, what, post_allreduce, &a, err, errlen);
}

static void mpi_abort(void *impl, int code)
{
    (void)impl;
    MPI_Abort(MPI_COMM_WORLD, code);
}

static void mpi_fini(void *impl)
{
    mpi_impl *m = impl;
    if (!m)
        return;
    for (int id = 0; id < COMM_NGROUPS; id++) {
        if (m->g[id].comm != MPI_COMM_NULL && m->g[id].comm)
            MPI_Comm_free(&m->g[id].comm);
        if (m->g[id].arrive != MPI_COMM_NULL && m->g[id].arrive)
            MPI_Comm_free(&m->g[id].arrive);
        free(m->g[id].world_of);
    }
    if (m->we_init)
        MPI_Finalize();
    free(m->stage);
    free(m->rs_recv);
    free(m->arrived);
    free(m->reqs);
    free(m);
}

static const comm_backend mpi_backend = {
    COMM_BACKEND_ABI, "mpi", mpi_init, mpi_allreduce_f32, mpi_allreduce_host, mpi_abort, mpi_fini,
};

const comm_backend *moec_comm_backend(void);
const comm_backend *moec_comm_backend(void)
{
    return &mpi_backend;
}

/* ---- expert parallelism: all-to-all (fixed blocks) and all-to-allv ------ */
typedef struct a2a_args {
    const void *send;
    void *recv;
    int n;                       /* fixed: bytes per peer */
    const int *sc, *sd, *rc, *rd; /* variable: counts and displacements (bytes) */
} a2a_args;

static int post_alltoall(void *arg, MPI_Comm c, MPI_Request *req)
{
    a2a_args *a = arg;
    return MPI_Ialltoall(a->send, a->n, MPI_BYTE, a->recv, a->n, MPI_BYTE, c, req) != MPI_SUCCESS;
}

static int post_alltoallv(void *arg, MPI_Comm c, MPI_Request *req)
{
    a2a_args *a = arg;
    return MPI_Ialltoallv(a->send, a->sc, a->sd, MPI_BYTE, a->recv, a->rc, a->rd, MPI_BYTE, c,
                          req) != MPI_SUCCESS;
}

static int mpi_alltoall(void *impl, const void *send, void *recv, int64_t bytes_per_peer,
                        int group, const char *what, char *err, size_t errlen)
{
    mpi_impl *m = impl;
    if (group < 0 || group >= COMM_NGROUPS)
        return fail(err, errlen, "rank %d: collective names unknown group %d", m->rank, group);
    if (bytes_per_peer > INT32_MAX)
        return fail(err, errlen, "rank %d: %s of %" PRId64 " bytes per rank exceeds MPI's int "
                    "count", m->rank, what, bytes_per_peer);
    if (m->g[group].size == 1) {
        memcpy(recv, send, (size_t)bytes_per_peer);
        return 0;
    }
    a2a_args a = {send, recv, (int)bytes_per_peer, NULL, NULL, NULL, NULL};
    return run_collective(m, group, what, post_alltoall, &a, err, errlen);
}

static int mpi_alltoallv(void *impl, const void *send, const int64_t *send_bytes, void *recv,
                         const int64_t *recv_bytes, int group, const char *what, char *err,
                         size_t errlen)
{
    mpi_impl *m = impl;
    if (group < 0 || group >= COMM_NGROUPS)
        return fail(err, errlen, "rank %d: collective names unknown group %d", m->rank, group);
    int P = m->g[group].size;
    int *v = calloc((size_t)P * 4, sizeof *v);
    if (!v)
        return fail(err, errlen, "rank %d: out of memory for %s", m->rank, what);
    int64_t so = 0, ro = 0;
    for (int k = 0; k < P; k++) {
        if (send_bytes[k] < 0 || recv_bytes[k] < 0 || so + send_bytes[k] > INT32_MAX ||
            ro + recv_bytes[k] > INT32_MAX) {
            free(v);
            return fail(err, errlen, "rank %d: %s moves more than MPI's int count of bytes; "
                        "use a smaller batch", m->rank, what);
        }
        v[k] = (int)send_bytes[k];
        v[P + k] = (int)so;
        v[2 * P + k] = (int)recv_bytes[k];
        v[3 * P + k] = (int)ro;
        so += send_bytes[k];
        ro += recv_bytes[k];
    }
    int rc = 0;
    if (P == 1)
        memcpy(recv, send, (size_t)send_bytes[0]);
    else {
        a2a_args a = {send, recv, 0, v, v + P, v + 2 * P, v + 3 * P};
        rc = run_collective(m, group, what, post_alltoallv, &a, err, errlen);
    }
    free(v);
    return rc;
}

static const comm_ep_backend mpi_ep_backend = {COMM_BACKEND_ABI, mpi_alltoall, mpi_alltoallv};

const comm_ep_backend *moec_comm_backend_ep(void);
const comm_ep_backend *moec_comm_backend_ep(void)
{
    return &mpi_ep_backend;
}

/* ---- ZeRO: all-gather and reduce-scatter (comm_zero_backend) ------------ */
typedef struct ag_args { const void *slice; void *full; int64_t bytes; } ag_args;

static int post_allgather(void *arg, MPI_Comm c, MPI_Request *req)
{
    ag_args *a = arg;
    return MPI_Iallgather(a->slice, (int)a->bytes, MPI_BYTE, a->full, (int)a->bytes, MPI_BYTE, c,
                          req) != MPI_SUCCESS;
}

static int mpi_allgather(void *impl, const void *slice, void *full, int64_t bytes, int group,
                         const char *what, char *err, size_t errlen)
{
    mpi_impl *m = impl;
    if (group < 0 || group >= COMM_NGROUPS)
        return fail(err, errlen, "rank %d: collective names unknown group %d", m->rank, group);
    if (bytes > INT32_MAX)
        return fail(err, errlen, "rank %d: %s of %" PRId64 " bytes per rank exceeds MPI's int "
                    "count", m->rank, what, bytes);
    ag_args a = {slice, full, bytes};
    return run_collective(m, group, what, post_allgather, &a, err, errlen);
}

typedef struct rs_args { const float *full; float *recv; int64_t s; } rs_args;

/* A reduce-scatter is an all-to-all of the blocks (block j of full goes to
 * rank j) and a local sum, not MPI_Ireduce_scatter_block: Open MPI's
 * non-blocking reduce-scatter allocated 1 to 4 times the message inside the
 * library (measured: 18 MiB for a 4.5 MiB tensor on 4 ranks), which no plan
 * could predict, while the all-to-all allocates nothing beyond rs_recv (one
 * message, kept).  Same bytes on the wire as a ring reduce-scatter. */
static int post_reduce_scatter(void *arg, MPI_Comm c, MPI_Request *req)
{
    rs_args *a = arg;
    return MPI_Ialltoall(a->full, (int)a->s, MPI_FLOAT, a->recv, (int)a->s, MPI_FLOAT, c, req) !=
           MPI_SUCCESS;
}

static int mpi_reduce_scatter(void *impl, const float *full, float *slice, int64_t s, int group,
                              const char *what, char *err, size_t errlen)
{
    mpi_impl *m = impl;
    if (group < 0 || group >= COMM_NGROUPS)
        return fail(err, errlen, "rank %d: collective names unknown group %d", m->rank, group);
    int64_t size = m->g[group].size;
    if (s * size > INT32_MAX)
        return fail(err, errlen, "rank %d: %s of %" PRId64 " floats exceeds MPI's int count",
                    m->rank, what, s * size);
    if (grow_floats(&m->rs_recv, &m->rs_recv_cap, s * size))
        return fail(err, errlen, "rank %d: out of memory for a %" PRId64 "-float %s", m->rank,
                    s * size, what);
    rs_args a = {full, m->rs_recv, s};
    if (run_collective(m, group, what, post_reduce_scatter, &a, err, errlen))
        return -1;
    /* the group's blocks in rank order: every rank sums in the same order */
    for (int64_t k = 0; k < s; k++) {
        float acc = m->rs_recv[k];
        for (int64_t j = 1; j < size; j++)
            acc += m->rs_recv[j * s + k];
        slice[k] = acc;
    }
    return 0;
}

static const comm_zero_backend mpi_zero = {COMM_BACKEND_ABI, mpi_allgather, mpi_reduce_scatter};

const comm_zero_backend *moec_comm_zero_backend(void);
const comm_zero_backend *moec_comm_zero_backend(void)
{
    return &mpi_zero;
}
