/* test_rendezvous.c - the nccl backend's TCP rendezvous (rendezvous.h) with
 * real local processes: the blob reaches every rank, a wrong token is
 * refused with a message, a missing rank times out and is named, and bad
 * environment variables are named.  No GPU needed.
 *
 * rendezvous.c lives with the backends (it is linked into
 * libmoec_comm_nccl.so, not into run), so it is compiled into this test
 * directly rather than through libmoec_runtime.a. */
#include "check.h"

#include "../../runtime/comm_backends/rendezvous.c"

#include <sys/wait.h>

/* A port that was free a moment ago on 127.0.0.1. */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t l = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) ||
        getsockname(fd, (struct sockaddr *)&a, &l)) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static rdv_env mk(int rank, int world, int port, const char *token)
{
    rdv_env e;
    memset(&e, 0, sizeof e);
    e.rank = rank;
    e.world = world;
    e.port = port;
    snprintf(e.addr, sizeof e.addr, "127.0.0.1");
    snprintf(e.token, sizeof e.token, "%s", token);
    return e;
}

static void fill(unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(i * 37u + 11u);
}

/* Forks a rank k != 0.  Its exit code: 0 blob right, 1 blob wrong, 2 error.
 * Its error message goes to the pipe. */
typedef struct child { pid_t pid; int pipe; } child;

static child spawn(rdv_env e, size_t n, double timeout_s, double delay_s)
{
    child c = {-1, -1};
    int p[2];
    if (pipe(p))
        return c;
    c.pid = fork();
    if (c.pid == 0) {
        close(p[0]);
        if (delay_s > 0) {
            struct timespec ts = {(time_t)delay_s, (long)((delay_s - (time_t)delay_s) * 1e9)};
            nanosleep(&ts, NULL);
        }
        unsigned char got[RDV_BLOB_MAX], want[RDV_BLOB_MAX];
        char err[1024] = "";
        memset(got, 0, sizeof got);
        fill(want, n);
        int rc = rdv_exchange(&e, got, n, timeout_s, err, sizeof err);
        if (write(p[1], err, strlen(err)) < 0)
            _exit(3);
        _exit(rc ? 2 : memcmp(got, want, n) ? 1 : 0);
    }
    close(p[1]);
    c.pipe = p[0];
    return c;
}

/* Waits for c; its exit code, its message in msg. */
static int reap(child c, char *msg, size_t n)
{
    msg[0] = '\0';
    if (c.pid < 0)
        return -1;
    ssize_t k = read(c.pipe, msg, n - 1);
    msg[k > 0 ? k : 0] = '\0';
    close(c.pipe);
    int st;
    waitpid(c.pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static void test_four_ranks(void)
{
    int port = free_port();
    const size_t n = 128;   /* sizeof(ncclUniqueId) */
    child c[3];
    /* ranks 1-3 start first and retry until rank 0 listens */
    for (int k = 1; k < 4; k++)
        c[k - 1] = spawn(mk(k, 4, port, "s3cret"), n, 10, 0);
    struct timespec ts = {0, 300 * 1000 * 1000};
    nanosleep(&ts, NULL);
    unsigned char blob[128];
    fill(blob, n);
    rdv_env e0 = mk(0, 4, port, "s3cret");
    char err[1024] = "";
    int rc = rdv_exchange(&e0, blob, n, 10, err, sizeof err);
    CHECK("rdv.four_ranks.rank0", rc == 0, "rank 0: %s", err);
    for (int k = 1; k < 4; k++) {
        char msg[1024], name[64];
        int x = reap(c[k - 1], msg, sizeof msg);
        snprintf(name, sizeof name, "rdv.four_ranks.rank%d_blob", k);
        CHECK(name, x == 0, "exit %d (1: wrong bytes): %s", x, msg);
    }
}

static void test_wrong_token(void)
{
    int port = free_port();
    const size_t n = 128;
    child bad = spawn(mk(1, 2, port, "not-the-token"), n, 5, 0.1);
    child good = spawn(mk(1, 2, port, "right"), n, 10, 1.0);   /* arrives after the stray */
    unsigned char blob[128];
    fill(blob, n);
    rdv_env e0 = mk(0, 2, port, "right");
    char err[1024] = "", msg[1024];
    int rc = rdv_exchange(&e0, blob, n, 10, err, sizeof err);
    int xb = reap(bad, msg, sizeof msg);
    CHECK("rdv.wrong_token.refused", xb == 2 && strstr(msg, "rank 1: the rendezvous at "
          "127.0.0.1") && strstr(msg, "refused this connection: wrong job token "
          "(MOEC_JOB_TOKEN differs"), "exit %d: %s", xb, msg);
    int xg = reap(good, msg, sizeof msg);
    CHECK("rdv.wrong_token.job_goes_on", rc == 0 && xg == 0, "rank 0 %d (%s), rank 1 exit %d: %s",
          rc, err, xg, msg);
}

static void test_missing_rank(void)
{
    int port = free_port();
    const size_t n = 64;
    child c1 = spawn(mk(1, 3, port, "t"), n, 3, 0);
    unsigned char blob[64];
    fill(blob, n);
    rdv_env e0 = mk(0, 3, port, "t");
    char err[1024] = "", msg[1024];
    double t0 = rdv_now();
    int rc = rdv_exchange(&e0, blob, n, 1.0, err, sizeof err);
    double took = rdv_now() - t0;
    CHECK("rdv.missing_rank.rank0_names_it", rc == -1 && strstr(err, "timed out waiting for "
          "rank 2 (2 of 3 joined)"), "rc %d: %s", rc, err);
    CHECK("rdv.missing_rank.within_deadline", took >= 0.9 && took < 3.0, "took %.2f s", took);
    int x = reap(c1, msg, sizeof msg);
    CHECK("rdv.missing_rank.joined_rank_told", x == 2 && strstr(msg, "rank 1: the rendezvous") &&
          strstr(msg, "waiting for rank 2"), "exit %d: %s", x, msg);
}

static void test_no_rank0(void)
{
    int port = free_port();
    rdv_env e = mk(2, 3, port, "t");
    unsigned char blob[16];
    char err[1024] = "";
    double t0 = rdv_now();
    int rc = rdv_exchange(&e, blob, sizeof blob, 0.5, err, sizeof err);
    double took = rdv_now() - t0;
    CHECK("rdv.no_rank0", rc == -1 && strstr(err, "rank 2: cannot reach rank 0 at MASTER_ADDR="
          "127.0.0.1") && strstr(err, "Connection refused") && took < 2.0,
          "rc %d after %.2f s: %s", rc, took, err);
}

static void test_duplicate_and_bind(void)
{
    int port = free_port();
    const size_t n = 32;
    /* two ranks claim RANK=1 and rank 2 never comes */
    child a = spawn(mk(1, 3, port, "t"), n, 4, 0);
    child b = spawn(mk(1, 3, port, "t"), n, 4, 0.4);
    unsigned char blob[32];
    fill(blob, n);
    rdv_env e0 = mk(0, 3, port, "t");
    char err[1024] = "", ma[1024], mb[1024];
    int rc = rdv_exchange(&e0, blob, n, 1.5, err, sizeof err);
    CHECK("rdv.duplicate.rank0", rc == -1 && strstr(err, "waiting for rank 2 (2 of 3 joined); "
          "refused 1 connection, the last: rank 1 has already joined (two ranks with RANK=1?)"),
          "rc %d: %s", rc, err);
    int xb = reap(b, mb, sizeof mb);
    CHECK("rdv.duplicate.second_refused", xb == 2 && strstr(mb, "refused this connection: rank 1 "
          "has already joined"), "exit %d: %s", xb, mb);
    int xa = reap(a, ma, sizeof ma);
    CHECK("rdv.duplicate.first_told", xa == 2 && strstr(ma, "waiting for rank 2"), "exit %d: %s",
          xa, ma);

    /* 192.0.2.1 (TEST-NET-1) is an address of no machine here */
    rdv_env far = mk(0, 2, port, "t");
    snprintf(far.addr, sizeof far.addr, "192.0.2.1");
    rc = rdv_exchange(&far, blob, n, 1, err, sizeof err);
    CHECK("rdv.bind_foreign_addr", rc == -1 && strstr(err, "rank 0: cannot listen on "
          "MASTER_ADDR=192.0.2.1") && strstr(err, "an address of rank 0's machine"), "%s", err);

    /* a port already bound on that address */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof sa;
    bind(fd, (struct sockaddr *)&sa, sizeof sa);
    listen(fd, 1);
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    rdv_env busy = mk(0, 2, ntohs(sa.sin_port), "t");
    rc = rdv_exchange(&busy, blob, n, 1, err, sizeof err);
    close(fd);
    CHECK("rdv.port_in_use", rc == -1 && strstr(err, "Address already in use (pick a free "
          "MASTER_PORT)"), "%s", err);
}

static void env_case(const char *name, const char *rank, const char *world, const char *local,
                     const char *addr, const char *port, const char *token, const char *want)
{
    const char *vars[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                          "MOEC_JOB_TOKEN"};
    const char *vals[] = {rank, world, local, addr, port, token};
    for (int i = 0; i < 6; i++)
        if (vals[i])
            setenv(vars[i], vals[i], 1);
        else
            unsetenv(vars[i]);
    rdv_env e;
    char err[512] = "";
    int rc = rdv_env_read(&e, err, sizeof err);
    if (!want)
        CHECK(name, rc == 0 && e.rank == atoi(rank) && e.world == atoi(world) &&
              e.local_rank == atoi(local) && e.port == atoi(port) && strcmp(e.addr, addr) == 0,
              "rc %d: %s", rc, err);
    else
        CHECK(name, rc == -1 && strstr(err, want), "rc %d, wanted '%s', got '%s'", rc, want, err);
}

static void test_env(void)
{
    env_case("rdv.env.ok", "3", "4", "1", "10.0.0.5", "29500", "tok", NULL);
    env_case("rdv.env.no_rank", NULL, "4", "1", "h", "29500", "tok",
             "RANK is not set; without mpirun the nccl backend needs RANK, WORLD_SIZE");
    env_case("rdv.env.bad_port", "0", "2", "0", "h", "99999", "tok",
             "MASTER_PORT=99999 is not a port number (1-65535)");
    env_case("rdv.env.port_text", "0", "2", "0", "h", "http", "tok",
             "MASTER_PORT='http' is not an integer");
    env_case("rdv.env.world_zero", "0", "0", "0", "h", "29500", "tok",
             "WORLD_SIZE=0 is out of range (1-65536 ranks)");
    env_case("rdv.env.world_text", "0", "two", "0", "h", "29500", "tok",
             "WORLD_SIZE='two' is not an integer");
    env_case("rdv.env.rank_too_big", "2", "2", "0", "h", "29500", "tok",
             "RANK=2 is not below WORLD_SIZE=2");
    env_case("rdv.env.local_rank", "1", "2", "-1", "h", "29500", "tok",
             "LOCAL_RANK=-1 must not be negative");
    env_case("rdv.env.no_addr", "1", "2", "0", NULL, "29500", "tok", "MASTER_ADDR is not set");
    env_case("rdv.env.no_token", "1", "2", "0", "h", "29500", NULL, "MOEC_JOB_TOKEN is not set");
}

int main(void)
{
    test_env();
    if (free_port() < 0) {
        SKIP("rdv.sockets", "cannot bind a TCP socket on 127.0.0.1 here");
        return 0;
    }
    test_four_ranks();
    test_wrong_token();
    test_missing_rank();
    test_no_rank0();
    test_duplicate_and_bind();
    return check_failures ? 1 : 0;
}
