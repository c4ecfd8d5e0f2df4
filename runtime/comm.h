/* comm.h - communication between ranks (docs/parallel.md).
 *
 * Collectives are ops of the plan like kernels: the compiler's parallel pass
 * emits calls to the moec_comm_* symbols below from the plan library "@comm".
 * The runtime binds "@comm" to these dispatchers (built into run), which
 * forward through ctx->comm to the active backend:
 *   single  built in: one rank, every collective is a no-op
 *   mpi     build/libmoec_comm_mpi.so (mpicc), CPU ranks started by mpirun
 *   nccl    build/libmoec_comm_nccl.so, GPU ranks (bootstrapped through MPI)
 * run never links MPI or NCCL: a backend is dlopened only when asked for.
 *
 * Every collective of a backend has a deadline (--comm-timeout): a dead or
 * stuck rank makes it fail with a message naming the collective and the
 * ranks that did not arrive; the runtime then ends the whole job.
 */
#ifndef MOEC_COMM_H
#define MOEC_COMM_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "../kernels/moek.h"

#define COMM_LIB "@comm"            /* the plan library the collectives come from */
#define COMM_BACKEND_ABI 1
#define COMM_MULTI_MAX 8            /* tensors per bucketed all-reduce op */

/* Process groups, by the id the plan's collective ops carry. */
enum comm_group_id {
    COMM_GROUP_WORLD = 0,
    COMM_GROUP_DP = 1,        /* data-parallel group of the dense parameters */
    COMM_GROUP_EP = 2,        /* expert-parallel group: ranks that split the experts */
    COMM_GROUP_EXPERT_DP = 3, /* data-parallel group of one expert shard */
    COMM_NGROUPS
};

/* Every group is an arithmetic progression of world ranks.  With world N and
 * expert-parallel size E (E divides N): the EP group of rank r is the block
 * of E consecutive ranks holding r; its expert-DP group is the ranks with the
 * same r mod E (they hold the same experts); dense DP is the whole world
 * (no tensor or pipeline parallelism yet).  Shared by moec --explain, run
 * --inspect and the backends, so all three agree. */
typedef struct comm_group {
    int64_t first, stride, size;   /* world ranks first, first+stride, ... */
    int64_t index;                 /* this rank's position in it */
} comm_group;

static inline int comm_group_of(int64_t rank, int64_t world, int64_t ep, int id, comm_group *g)
{
    if (world < 1 || ep < 1 || world % ep || rank < 0 || rank >= world)
        return -1;
    switch (id) {
    case COMM_GROUP_WORLD:
    case COMM_GROUP_DP: g->first = 0; g->stride = 1; g->size = world; break;
    case COMM_GROUP_EP: g->first = rank / ep * ep; g->stride = 1; g->size = ep; break;
    case COMM_GROUP_EXPERT_DP: g->first = rank % ep; g->stride = ep; g->size = world / ep; break;
    default: return -1;
    }
    g->index = (rank - g->first) / g->stride;
    return 0;
}

static inline const char *comm_group_name(int id)
{
    static const char *const n[] = {"world", "dp", "ep", "expert-dp"};
    return id >= 0 && id < COMM_NGROUPS ? n[id] : "?";
}

/* One line per kind of group, each group as {ranks}:
 * "  ep         {0,1} {2,3}".  Inline: moec prints it too. */
static inline void comm_print_layout(int64_t world, int64_t ep, FILE *out)
{
    if (world < 1 || ep < 1 || world % ep) {
        fprintf(out, "  (no valid layout: %lld ranks, expert %lld)\n", (long long)world,
                (long long)ep);
        return;
    }
    for (int id = COMM_GROUP_DP; id < COMM_NGROUPS; id++) {
        fprintf(out, "  %-10s", comm_group_name(id));
        for (int64_t r = 0; r < world; r++) {
            comm_group g;
            comm_group_of(r, world, ep, id, &g);
            if (g.index != 0)
                continue;   /* each group once, from its first rank */
            fputs(" {", out);
            for (int64_t k = 0; k < g.size; k++)
                fprintf(out, "%s%lld", k ? "," : "", (long long)(g.first + k * g.stride));
            fputc('}', out);
        }
        fputc('\n', out);
    }
}

/* ---- the backend ABI: what libmoec_comm_<name>.so exports -------------- */
typedef struct comm_init_args {
    int64_t expert;              /* expert-parallel size (groups are derived from it) */
    double timeout_s;            /* every collective's deadline */
    int device_cuda;             /* buffers live on the GPU (nccl) */
    void *stream;                /* cudaStream_t for nccl */
} comm_init_args;

typedef struct comm_backend {
    int abi;                     /* COMM_BACKEND_ABI */
    const char *name;
    /* Starts the backend; fills rank and world.  0 or -1 with err. */
    int (*init)(void **impl, const comm_init_args *a, int *rank, int *world, char *err,
                size_t errlen);
    /* Sum in place over group.  what names the collective in errors. */
    int (*allreduce_f32)(void *impl, float *const *bufs, const int64_t *ns, int count, int group,
                         const char *what, char *err, size_t errlen);
    int (*allreduce_f64_host)(void *impl, double *buf, int64_t n, int group, const char *what,
                              char *err, size_t errlen);
    void (*abort)(void *impl, int code);   /* ends every rank of the job */
    void (*fini)(void *impl);
} comm_backend;

/* The one symbol a backend library exports. */
typedef const comm_backend *(*comm_backend_fn)(void);
#define COMM_BACKEND_SYMBOL "moec_comm_backend"

/* ---- the runtime's side --------------------------------------------------- */
typedef struct comm comm;

typedef struct comm_opts {
    const char *backend;         /* "single", "mpi", "nccl" or NULL/"auto" */
    const char *exe_dir;         /* backends are searched like the kernel libraries */
    int64_t expert;              /* plan's parallel { expert } */
    double timeout_s;            /* <= 0: 300 */
    int device_cuda;
} comm_opts;

/* "auto" picks mpi when started by mpirun (OMPI_/PMI_ environment), else single. */
comm *comm_open(const comm_opts *o, char *err, size_t errlen);
int comm_rank(const comm *c);
int comm_world(const comm *c);
const char *comm_backend_name(const comm *c);
/* The first collective failure ("" if none): names the rank and collective. */
const char *comm_error(const comm *c);
/* Host-side sum over a group (loss, metrics). */
int comm_allreduce_host(comm *c, double *buf, int64_t n, int group, const char *what, char *err,
                        size_t errlen);
/* Ends every rank (after an error on this one); returns only on one rank. */
void comm_abort(comm *c, int code);
void comm_close(comm *c);
/* Resolves a "@comm" kernel symbol (NULL if unknown). */
void *comm_symbol(const char *name);

/* ---- the collective kernels the plan calls (ctx->comm: a comm *) -------- */
/* Sums count (<= COMM_MULTI_MAX) fp32 tensors over group as one bucket;
 * unused slots have n = 0.  bucket only names the op in errors. */
void moec_comm_allreduce_f32_multi(const moek_ctx *ctx, int64_t group, int64_t bucket,
                                   int64_t count, float *t0, int64_t n0, float *t1, int64_t n1,
                                   float *t2, int64_t n2, float *t3, int64_t n3, float *t4,
                                   int64_t n4, float *t5, int64_t n5, float *t6, int64_t n6,
                                   float *t7, int64_t n7);
void moec_comm_allreduce_f32(const moek_ctx *ctx, float *buf, int64_t n, int64_t group);

#endif
