/* rendezvous.c - the TCP rendezvous of rendezvous.h.
 *
 * Wire format (all integers big-endian u32):
 *   hello  (rank k -> rank 0): "MOECRDV1" rank world blob_bytes token_len token
 *   answer (rank 0 -> rank k): one status byte ('K' ok, 'E' refused/failed),
 *                              length, then the blob or an error message.
 * Rank 0 reads each hello under a short deadline of its own, so a stray
 * connection that sends nothing cannot hold the rendezvous up for long.
 */
#include "rendezvous.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define RDV_MAGIC "MOECRDV1"
#define RDV_HELLO_S 5.0        /* a connection has this long to say who it is */

__attribute__((format(printf, 3, 4)))
static int rdv_fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static double rdv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- environment ------------------------------------------------------- */
static int rdv_int_var(const char *name, long lo, long hi, const char *why, int *out, char *err,
                       size_t errlen)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return rdv_fail(err, errlen, "%s is not set; without mpirun the nccl backend needs RANK, "
                        "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and MOEC_JOB_TOKEN "
                        "(docs/launching.md)", name);
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v)
        return rdv_fail(err, errlen, "%s='%.40s' is not an integer", name, v);
    if (x < lo || x > hi)
        return rdv_fail(err, errlen, "%s=%ld %s", name, x, why);
    *out = (int)x;
    return 0;
}

int rdv_env_read(rdv_env *e, char *err, size_t errlen)
{
    memset(e, 0, sizeof *e);
    if (rdv_int_var("WORLD_SIZE", 1, RDV_WORLD_MAX, "is out of range (1-65536 ranks)",
                    &e->world, err, errlen) ||
        rdv_int_var("RANK", 0, INT_MAX, "must not be negative", &e->rank, err, errlen) ||
        rdv_int_var("LOCAL_RANK", 0, INT_MAX, "must not be negative", &e->local_rank, err,
                    errlen) ||
        rdv_int_var("MASTER_PORT", 1, 65535, "is not a port number (1-65535)", &e->port, err,
                    errlen))
        return -1;
    if (e->rank >= e->world)
        return rdv_fail(err, errlen, "RANK=%d is not below WORLD_SIZE=%d", e->rank, e->world);
    if (e->local_rank > e->rank)
        return rdv_fail(err, errlen, "LOCAL_RANK=%d is above RANK=%d (a node's ranks are "
                        "numbered from 0)", e->local_rank, e->rank);
    const char *a = getenv("MASTER_ADDR"), *t = getenv("MOEC_JOB_TOKEN");
    if (!a || !*a)
        return rdv_fail(err, errlen, "MASTER_ADDR is not set; set it to an address of rank 0's "
                        "machine that every rank can reach");
    if (strlen(a) >= sizeof e->addr)
        return rdv_fail(err, errlen, "MASTER_ADDR is longer than %zu characters",
                        sizeof e->addr - 1);
    if (!t || !*t)
        return rdv_fail(err, errlen, "MOEC_JOB_TOKEN is not set; give every rank of the job "
                        "the same secret, e.g. export MOEC_JOB_TOKEN=$(od -An -tx8 -N16 "
                        "/dev/urandom | tr -d ' ')");
    if (strlen(t) > RDV_TOKEN_MAX)
        return rdv_fail(err, errlen, "MOEC_JOB_TOKEN is longer than %d characters", RDV_TOKEN_MAX);
    snprintf(e->addr, sizeof e->addr, "%s", a);
    snprintf(e->token, sizeof e->token, "%s", t);
    return 0;
}

/* ---- byte I/O under a deadline ------------------------------------------- */
static int rdv_wait(int fd, short ev, double deadline)
{
    for (;;) {
        double left = deadline - rdv_now();
        if (left <= 0)
            return -1;
        struct pollfd p = {fd, ev, 0};
        int ms = left > 1000 ? 1000000 : (int)(left * 1000) + 1;
        int r = poll(&p, 1, ms);
        if (r > 0)
            return 0;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

/* 0 when all n bytes arrived; -1 on timeout (errno ETIMEDOUT) or a closed peer */
static int rdv_read(int fd, void *buf, size_t n, double deadline)
{
    unsigned char *p = buf;
    while (n) {
        if (rdv_wait(fd, POLLIN, deadline)) {
            errno = ETIMEDOUT;
            return -1;
        }
        ssize_t r = recv(fd, p, n, 0);
        if (r == 0) {
            errno = ECONNRESET;
            return -1;
        }
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int rdv_write(int fd, const void *buf, size_t n, double deadline)
{
    const unsigned char *p = buf;
    while (n) {
        if (rdv_wait(fd, POLLOUT, deadline)) {
            errno = ETIMEDOUT;
            return -1;
        }
        ssize_t r = send(fd, p, n, MSG_NOSIGNAL);   /* a vanished peer is an error, not SIGPIPE */
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void rdv_put32(unsigned char *p, uint32_t x)
{
    uint32_t be = htonl(x);
    memcpy(p, &be, 4);
}

static uint32_t rdv_get32(const unsigned char *p)
{
    uint32_t be;
    memcpy(&be, p, 4);
    return ntohl(be);
}

static int rdv_answer(int fd, char status, const void *data, size_t n, double deadline)
{
    unsigned char h[5];
    h[0] = (unsigned char)status;
    rdv_put32(h + 1, (uint32_t)n);
    return rdv_write(fd, h, 5, deadline) || rdv_write(fd, data, n, deadline) ? -1 : 0;
}

/* the same time for a wrong token of any length or content */
static int rdv_token_eq(const char *a, size_t an, const char *b, size_t bn)
{
    unsigned char d = an != bn;
    for (size_t i = 0; i < RDV_TOKEN_MAX; i++)
        d |= (unsigned char)((i < an ? a[i] : 0) ^ (i < bn ? b[i] : 0));
    return d == 0;
}

static int rdv_resolve(const rdv_env *e, struct addrinfo **res, char *err, size_t errlen)
{
    char port[16];
    snprintf(port, sizeof port, "%d", e->port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int r = getaddrinfo(e->addr, port, &hints, res);
    if (r)
        return rdv_fail(err, errlen, "rank %d: cannot resolve MASTER_ADDR=%s: %s", e->rank,
                        e->addr, gai_strerror(r));
    return 0;
}

/* ---- rank 0 ------------------------------------------------------------ */
static int rdv_listen(const rdv_env *e, char *err, size_t errlen)
{
    struct addrinfo *res;
    if (rdv_resolve(e, &res, err, errlen))
        return -1;
    int fd = -1, why = 0;
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            why = errno;
            continue;
        }
        int one = 1;   /* a restarted job may reuse the port while old sockets linger */
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) || listen(fd, 128)) {
            why = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0)
        rdv_fail(err, errlen, "rank 0: cannot listen on MASTER_ADDR=%s MASTER_PORT=%d: %s%s",
                 e->addr, e->port, strerror(why),
                 why == EADDRINUSE ? " (pick a free MASTER_PORT)"
                 : why == EADDRNOTAVAIL ? " (MASTER_ADDR must be an address of rank 0's machine)"
                                        : "");
    return fd;
}

/* Reads one hello; the rank (> 0) it proves, or -1 with why in msg. */
static int rdv_hello(const rdv_env *e, int fd, size_t n, const int *joined, char *msg,
                     size_t msglen)
{
    unsigned char h[24];
    double dl = rdv_now() + RDV_HELLO_S;
    if (rdv_read(fd, h, sizeof h, dl) || memcmp(h, RDV_MAGIC, 8) != 0) {
        snprintf(msg, msglen, "not a moec rank (no rendezvous greeting)");
        return -1;
    }
    uint32_t rank = rdv_get32(h + 8), world = rdv_get32(h + 12), bytes = rdv_get32(h + 16),
             tlen = rdv_get32(h + 20);
    char tok[RDV_TOKEN_MAX];
    if (tlen > RDV_TOKEN_MAX || rdv_read(fd, tok, tlen, dl)) {
        snprintf(msg, msglen, "a malformed job token");
        return -1;
    }
    if (!rdv_token_eq(tok, tlen, e->token, strlen(e->token))) {
        snprintf(msg, msglen, "wrong job token (MOEC_JOB_TOKEN differs from rank 0's), claiming "
                 "rank %u", rank);
        return -1;
    }
    if ((int)world != e->world) {
        snprintf(msg, msglen, "rank %u was started with WORLD_SIZE=%u but rank 0 with %d", rank,
                 world, e->world);
        return -1;
    }
    if (bytes != n) {
        snprintf(msg, msglen, "rank %u expects a %u-byte id, rank 0 has %zu (mixed builds?)",
                 rank, bytes, n);
        return -1;
    }
    if (rank == 0 || rank >= world) {
        snprintf(msg, msglen, "RANK=%u is not a rank from 1 to %d", rank, e->world - 1);
        return -1;
    }
    if (joined[rank] >= 0) {
        snprintf(msg, msglen, "rank %u has already joined (two ranks with RANK=%u?)", rank, rank);
        return -1;
    }
    return (int)rank;
}

static int rdv_serve(const rdv_env *e, const void *blob, size_t n, double deadline, char *err,
                     size_t errlen)
{
    int lfd = rdv_listen(e, err, errlen);
    if (lfd < 0)
        return -1;
    int *fd = malloc((size_t)e->world * sizeof *fd);
    if (!fd) {
        close(lfd);
        return rdv_fail(err, errlen, "rank 0: out of memory for %d ranks", e->world);
    }
    for (int k = 0; k < e->world; k++)
        fd[k] = -1;
    int have = 1, refused = 0, rc = 0;
    char note[320] = "";
    while (have < e->world) {
        if (rdv_wait(lfd, POLLIN, deadline))
            break;
        int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
            continue;
        char msg[256];
        int r = rdv_hello(e, c, n, fd, msg, sizeof msg);
        if (r < 0) {
            refused++;
            snprintf(note, sizeof note, "%s", msg);
            char why[300];
            snprintf(why, sizeof why, "rank 0 refused this connection: %s", msg);
            rdv_answer(c, 'E', why, strlen(why), rdv_now() + 1);
            close(c);
            continue;
        }
        fd[r] = c;
        have++;
    }
    if (have < e->world) {
        char miss[200] = "";
        size_t l = 0;
        int nmiss = 0;
        for (int k = 1; k < e->world && l < sizeof miss - 16; k++)
            if (fd[k] < 0)
                l += (size_t)snprintf(miss + l, sizeof miss - l, "%s%d", nmiss++ ? ", " : "", k);
        if (nmiss < e->world - have)
            snprintf(miss + l, sizeof miss - l, ", ...");
        char refs[400] = "";
        if (refused)
            snprintf(refs, sizeof refs, "; refused %d connection%s, the last: %s", refused,
                     refused == 1 ? "" : "s", note);
        rdv_fail(err, errlen, "rank 0: rendezvous at %s:%d timed out waiting for rank%s %s "
                 "(%d of %d joined)%s", e->addr, e->port, e->world - have == 1 ? "" : "s", miss,
                 have, e->world, refs);
        rc = -1;
    }
    /* answer everyone who joined: the blob, or why the job cannot start */
    double dl = rdv_now() + 5;
    for (int k = 1; k < e->world; k++) {
        if (fd[k] < 0)
            continue;
        int w = rc ? rdv_answer(fd[k], 'E', err, strlen(err), dl)
                   : rdv_answer(fd[k], 'K', blob, n, dl);
        if (w && !rc)
            rc = rdv_fail(err, errlen, "rank 0: rank %d joined the rendezvous but vanished "
                          "before it got the id: %s", k, strerror(errno));
        close(fd[k]);
    }
    free(fd);
    close(lfd);
    return rc;
}

/* ---- every other rank ------------------------------------------------------ */
/* One connection attempt, no longer than until deadline; the socket or -1. */
static int rdv_connect_once(struct addrinfo *res, double deadline, int *why)
{
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                        a->ai_protocol);
        if (fd < 0) {
            *why = errno;
            continue;
        }
        int r = connect(fd, a->ai_addr, a->ai_addrlen);
        if (r && errno == EINPROGRESS) {
            int soerr = ETIMEDOUT;
            socklen_t sl = sizeof soerr;
            if (rdv_wait(fd, POLLOUT, deadline) == 0)
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
            r = soerr ? -1 : 0;
            errno = soerr;
        }
        if (r == 0)
            return fd;
        *why = errno;
        close(fd);
    }
    return -1;
}

static int rdv_join(const rdv_env *e, void *blob, size_t n, double timeout_s, double deadline,
                    char *err, size_t errlen)
{
    struct addrinfo *res;
    if (rdv_resolve(e, &res, err, errlen))
        return -1;
    int fd = -1, why = ETIMEDOUT;
    while (fd < 0 && rdv_now() < deadline) {
        fd = rdv_connect_once(res, deadline, &why);
        if (fd < 0) {   /* rank 0 may not be listening yet */
            struct timespec ts = {0, 100 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    freeaddrinfo(res);
    if (fd < 0)
        return rdv_fail(err, errlen, "rank %d: cannot reach rank 0 at MASTER_ADDR=%s "
                        "MASTER_PORT=%d within %g s (%s); is rank 0 running?", e->rank, e->addr,
                        e->port, timeout_s, strerror(why));
    size_t tl = strlen(e->token);
    unsigned char h[24 + RDV_TOKEN_MAX];
    memcpy(h, RDV_MAGIC, 8);
    rdv_put32(h + 8, (uint32_t)e->rank);
    rdv_put32(h + 12, (uint32_t)e->world);
    rdv_put32(h + 16, (uint32_t)n);
    rdv_put32(h + 20, (uint32_t)tl);
    memcpy(h + 24, e->token, tl);
    unsigned char a[5];
    int rc = 0;
    if (rdv_write(fd, h, 24 + tl, deadline) || rdv_read(fd, a, 5, deadline)) {
        rc = rdv_fail(err, errlen, "rank %d: rank 0 at %s:%d did not answer within %g s (%s); "
                      "it waits until every rank has joined", e->rank, e->addr, e->port,
                      timeout_s, strerror(errno));
    } else if (a[0] == 'K' && rdv_get32(a + 1) == n) {
        if (rdv_read(fd, blob, n, deadline))
            rc = rdv_fail(err, errlen, "rank %d: the id from rank 0 was cut short (%s)", e->rank,
                          strerror(errno));
    } else {
        char msg[1024];
        uint32_t ml = rdv_get32(a + 1);
        if (a[0] != 'E' || ml >= sizeof msg || rdv_read(fd, msg, ml, rdv_now() + 5))
            snprintf(msg, sizeof msg, "a garbled answer");
        else
            msg[ml] = '\0';
        rc = rdv_fail(err, errlen, "rank %d: the rendezvous at %s:%d failed: %s", e->rank,
                      e->addr, e->port, msg);
    }
    close(fd);
    return rc;
}

int rdv_exchange(const rdv_env *e, void *blob, size_t n, double timeout_s, char *err,
                 size_t errlen)
{
    if (n > RDV_BLOB_MAX)
        return rdv_fail(err, errlen, "rendezvous blob of %zu bytes is over %d", n, RDV_BLOB_MAX);
    if (e->world == 1)
        return 0;
    double deadline = rdv_now() + timeout_s;
    return e->rank == 0 ? rdv_serve(e, blob, n, deadline, err, errlen)
                        : rdv_join(e, blob, n, timeout_s, deadline, err, errlen);
}
