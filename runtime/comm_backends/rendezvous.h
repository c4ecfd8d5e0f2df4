/* rendezvous.h - a TCP rendezvous that hands one small blob (NCCL's unique
 * id) from rank 0 to every rank of a job started without MPI (docs/launching.md).
 *
 * Rank 0 listens on MASTER_ADDR:MASTER_PORT (bound to that address only);
 * every other rank connects, retrying until the deadline, and proves it
 * belongs to the job with MOEC_JOB_TOKEN.  Rank 0 answers only once every
 * rank has joined, so a missing rank is named by rank 0 and by every rank
 * that did join.  No CUDA here: the module is tested on any machine
 * (tests/unit/test_rendezvous.c).
 */
#ifndef MOEC_RENDEZVOUS_H
#define MOEC_RENDEZVOUS_H

#include <stddef.h>

#define RDV_TOKEN_MAX 256      /* bytes of MOEC_JOB_TOKEN */
#define RDV_BLOB_MAX 4096      /* bytes rank 0 hands out */
#define RDV_WORLD_MAX 65536

typedef struct rdv_env {
    int rank, world, local_rank;
    char addr[256];            /* MASTER_ADDR: a host name or a numeric address */
    int port;                  /* MASTER_PORT */
    char token[RDV_TOKEN_MAX + 1];
} rdv_env;

/* Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and
 * MOEC_JOB_TOKEN; 0, or -1 with a message naming the variable. */
int rdv_env_read(rdv_env *e, char *err, size_t errlen);

/* Rank 0 sends blob[0, n) to every rank; the others receive it into blob
 * (n must be the same everywhere).  Gives up after timeout_s seconds.  0, or
 * -1 with a message that names this rank and the ranks it missed. */
int rdv_exchange(const rdv_env *e, void *blob, size_t n, double timeout_s, char *err,
                 size_t errlen);

#endif
