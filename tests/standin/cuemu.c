/* cuemu.c - runs a CUDA grid on the CPU, for the tests (see cuemu.h).
 *
 * A grid's blocks run one after another on the OS thread that runs the
 * stream's work (the stand-in runtime's worker, tests/standin/cudart.c).
 * A block's threads are fibers on that thread, each with its own stack:
 * a thread runs until it meets a barrier (__syncthreads, or a warp
 * collective: __syncwarp, a shuffle, a WMMA call) or ends, then the next
 * one runs.  A barrier opens when every live thread it waits for has
 * arrived, as on the hardware (a thread that has returned no longer
 * counts).  So a kernel that reads another thread's shared memory
 * without a barrier in between sees stale data here too, and fails its
 * test, instead of working by the luck of lock-step warps.  A block whose
 * threads all wait and no barrier can open (threads of one warp at
 * different barriers) is a deadlock: reported, and the launch fails with
 * a sticky error, as an illegal instruction would on a GPU.
 *
 * Only x86-64: the switch between fibers is eight instructions of
 * assembly (saving the callee-saved registers and the stack pointer),
 * because swapcontext makes a system call per switch.
 *
 * One grid runs at a time (device_mu), so the running thread (`here`),
 * the fiber stacks and shared memory are the emulated device's own. */
#include "cuemu_rt.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "standin.h"

#if !defined(__x86_64__)
#error "cuemu: the fiber switch is written for x86-64"
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CUEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUEMU_ASAN 1
#endif
#endif
#ifdef CUEMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define STACK_BYTES (256u << 10)
#define MAX_THREADS 1024u
#define MAX_SHARED (227u << 10)   /* an H100 block's opt-in limit */
#define DEFAULT_SHARED (48u << 10)

/* cuemu_switch(save, load): saves the callee-saved registers on this
 * stack, stores the stack pointer in *save, and resumes the fiber whose
 * stack pointer is load.  A new fiber's stack holds six zero registers
 * then cuemu_start, which calls r13(r12) on a 16-byte aligned stack. */
void cuemu_switch(void **save, void *load) __attribute__((visibility("hidden")));
void cuemu_start(void) __attribute__((visibility("hidden")));
__asm__(".text\n"
        ".globl cuemu_switch\n.hidden cuemu_switch\n.type cuemu_switch,@function\n"
        "cuemu_switch:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size cuemu_switch, .-cuemu_switch\n"
        ".globl cuemu_start\n.hidden cuemu_start\n.type cuemu_start,@function\n"
        "cuemu_start:\n"
        "  movq %r12, %rdi\n"
        "  callq *%r13\n"
        "  ud2\n"
        ".size cuemu_start, .-cuemu_start\n");

enum { TH_READY, TH_AT_BLOCK, TH_AT_WARP, TH_DONE };

typedef struct block_run block_run;

/* an asynchronous copy not yet performed (cp.async) */
typedef struct cp_copy {
    void *dst;
    const void *src;
    int n;
    unsigned group;
} cp_copy;

#define CP_MAX 64

typedef struct fiber {
    cuemu_view v;              /* first: cuemu_here() hands it out */
    void *sp;
    unsigned char *stack_lo;
    int state;
    unsigned lane, warp;
    unsigned gen;              /* warp collectives passed: picks the exchange slots */
    block_run *b;
    cp_copy cp[CP_MAX];        /* in issue order */
    unsigned ncp, groups;      /* pending copies; groups committed so far */
} fiber;

typedef struct warp_state {
    unsigned live;             /* lanes that have not returned */
    unsigned arrived;          /* lanes waiting at the current collective */
    unsigned need;             /* the lanes it waits for */
    uint64_t slot[2][32];      /* shuffle values, by gen parity */
} warp_state;

struct block_run {
    const cuemu_grid *g;
    fiber *f;
    warp_state *w;
    unsigned n, live, at_block;
    int reverse;               /* lanes taken from the highest */
    void *sched_sp;
#ifdef CUEMU_ASAN
    const void *sched_bottom;
    size_t sched_size;
#endif
};

/* What an OS thread keeps between launches: fiber stacks and the block's
 * dynamic shared memory, grown to the largest launch seen. */
typedef struct pool {
    unsigned char *stacks;
    unsigned cap;
    fiber *f;
    unsigned *order;           /* the order threads are resumed in */
    warp_state *w;
    unsigned char *shared;
} pool;

/* The emulated GPU runs one grid at a time, whichever stream queued it
 * (streams still order their work as CUDA's do; they just never overlap
 * two kernels).  So the state of the running grid is the device's own,
 * process-wide: what `run` holds, and what the kernels' __shared__
 * variables (plain statics, see cuemu.h) are. */
static pthread_mutex_t device_mu = PTHREAD_MUTEX_INITIALIZER;
static pool device_pool;     /* under device_mu */
static fiber *here;          /* the thread running now, under device_mu */
cuemu_view *cuemu_current;   /* &here->v, read by threadIdx and friends */

void cuemu_outside_kernel(void)
{
    fprintf(stderr, "cuemu: a device built-in was used outside a kernel\n");
    abort();
}

/* the pool for a block of n threads, grown as needed; NULL if out of memory */
static pool *pool_get(unsigned n)
{
    pool *p = &device_pool;
    if (!p->shared && !(p->shared = aligned_alloc(128, MAX_SHARED)))
        return NULL;
    if (n <= p->cap)
        return p;
    if (p->stacks)
        munmap(p->stacks, (size_t)p->cap * STACK_BYTES);
    free(p->f);
    free(p->w);
    free(p->order);
    p->stacks = NULL;
    p->cap = 0;
    p->f = calloc(n, sizeof *p->f);
    p->w = calloc((n + 31) / 32, sizeof *p->w);
    p->order = calloc(n, sizeof *p->order);
    void *m = mmap(NULL, (size_t)n * STACK_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (!p->f || !p->w || !p->order || m == MAP_FAILED)
        return NULL;
    p->stacks = m;
    p->cap = n;
    /* a guard page under each stack: an overflow faults instead of
     * running into the next thread's frames */
    for (unsigned i = 0; i < n; i++)
        mprotect(p->stacks + (size_t)i * STACK_BYTES, 4096, PROT_NONE);
    return p;
}

/* ---- switching ------------------------------------------------------------ */
static void to_fiber(block_run *b, fiber *f)
{
    here = f;
    cuemu_current = &f->v;
#ifdef CUEMU_ASAN
    void *fake = NULL;
    __sanitizer_start_switch_fiber(&fake, f->stack_lo, STACK_BYTES);
    cuemu_switch(&b->sched_sp, f->sp);
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#else
    cuemu_switch(&b->sched_sp, f->sp);
#endif
    here = NULL;
    cuemu_current = NULL;
}

/* The next ready lane of f's warp after f, in the schedule's lane order,
 * or NULL. */
static fiber *ready_lane(const fiber *f)
{
    const block_run *b = f->b;
    unsigned w0 = f->warp * 32, nl = b->n - w0 < 32 ? b->n - w0 : 32;
    for (unsigned k = 1; k < nl; k++) {
        unsigned l = b->reverse ? (f->lane + nl - k) % nl : (f->lane + k) % nl;
        if (b->f[w0 + l].state == TH_READY)
            return &b->f[w0 + l];
    }
    return NULL;
}

/* f waits (or has ended): hand over to a ready lane of its warp, so a warp
 * collective costs one switch per lane, or back to the scheduler. */
static void to_scheduler(fiber *f)
{
    block_run *b = f->b;
    fiber *next = ready_lane(f);
    void *to = next ? next->sp : b->sched_sp;
    if (next) {
        here = next;
        cuemu_current = &next->v;
    }
#ifdef CUEMU_ASAN
    void *fake = NULL;
    __sanitizer_start_switch_fiber(f->state == TH_DONE ? NULL : &fake,
                                   next ? (const void *)next->stack_lo : b->sched_bottom,
                                   next ? STACK_BYTES : b->sched_size);
    cuemu_switch(&f->sp, to);
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#else
    cuemu_switch(&f->sp, to);
#endif
    here = f;
    cuemu_current = &f->v;
}

/* ---- barriers --------------------------------------------------------------- */
static void open_block(block_run *b)
{
    for (unsigned i = 0; i < b->n; i++)
        if (b->f[i].state == TH_AT_BLOCK)
            b->f[i].state = TH_READY;
    b->at_block = 0;
}

static void open_warp(block_run *b, unsigned wi)
{
    warp_state *w = &b->w[wi];
    for (unsigned l = 0; l < 32; l++)
        if (w->arrived >> l & 1u)
            b->f[wi * 32 + l].state = TH_READY;
    w->arrived = 0;
    w->need = 0;
}

static void check_warp(block_run *b, unsigned wi)
{
    warp_state *w = &b->w[wi];
    if (w->arrived && (w->arrived & w->need & w->live) == (w->need & w->live))
        open_warp(b, wi);
}

void cuemu_syncthreads(void)
{
    fiber *f = here;
    block_run *b = f->b;
    f->state = TH_AT_BLOCK;
    if (++b->at_block == b->live)
        open_block(b);
    if (f->state != TH_READY)
        to_scheduler(f);
}

uint64_t cuemu_warp_exchange(unsigned mask, uint64_t bits, int src)
{
    fiber *f = here;
    block_run *b = f->b;
    warp_state *w = &b->w[f->warp];
    unsigned par = f->gen & 1u;
    w->slot[par][f->lane] = bits;
    if (!w->arrived)
        w->need = mask | 1u << f->lane;
    w->arrived |= 1u << f->lane;
    f->state = TH_AT_WARP;
    check_warp(b, f->warp);
    if (f->state != TH_READY)
        to_scheduler(f);
    f->gen++;
    /* safe to read: a lane writes this parity again only after the next
     * collective, which waits for this lane */
    return src >= 0 && src < 32 ? w->slot[par][src] : bits;
}

int cuemu_warp_leader(void)
{
    fiber *f = here;
    unsigned live = f->b->w[f->warp].live;
    return live && (unsigned)__builtin_ctz(live) == f->lane;
}

/* ---- asynchronous copies ------------------------------------------------- */
static void cp_perform(const cp_copy *c)
{
    memcpy(c->dst, c->src, (size_t)c->n);
    memset((unsigned char *)c->dst + c->n, 0, 16 - (size_t)c->n);
}

/* performs the oldest k pending copies */
static void cp_retire(fiber *f, unsigned k)
{
    for (unsigned i = 0; i < k; i++)
        cp_perform(&f->cp[i]);
    memmove(f->cp, f->cp + k, (f->ncp - k) * sizeof *f->cp);
    f->ncp -= k;
}

void cuemu_cp_async(void *dst, const void *src, int n)
{
    fiber *f = here;
    if (n < 0 || n > 16 || ((uintptr_t)dst & 15) || (n && ((uintptr_t)src & 15))) {
        fprintf(stderr, "cuemu: cp.async of %d bytes from %p to %p: needs 0..16 bytes, "
                        "16-byte aligned\n", n, src, dst);
        abort();
    }
    if (f->ncp == CP_MAX)   /* finishing a copy early is always allowed */
        cp_retire(f, 1);
    f->cp[f->ncp++] = (cp_copy){dst, src, n, f->groups};
}

void cuemu_cp_commit(void)
{
    here->groups++;
}

/* Copies of all but the newest `pending` committed groups are done;
 * the copies of those groups, and uncommitted ones, are still in flight
 * and land only at a later wait. */
void cuemu_cp_wait(int pending)
{
    fiber *f = here;
    unsigned keep_from = f->groups > (unsigned)pending ? f->groups - (unsigned)pending : 0;
    unsigned k = 0;
    while (k < f->ncp && f->cp[k].group < keep_from)
        k++;
    cp_retire(f, k);
}

/* ---- running a block ------------------------------------------------------ */
/* Which thread runs next decides which interleaving of the code between
 * barriers a kernel gets, and a race shows under some orders only.  Each
 * warp runs as far as it can (to a __syncthreads, or its end) before the
 * next one starts: that puts one warp as far ahead of the others as the
 * barriers allow, which is what a missing __syncthreads needs to show.
 * CUEMU_ORDER picks the order of the warps (and of lanes within one):
 * forward (warp 0 first, the default), reverse, or random:SEED (a fresh
 * order of the warps before each round). */
enum { ORDER_FORWARD, ORDER_REVERSE, ORDER_RANDOM };

typedef struct run_order {
    int kind;
    uint64_t seed;
} run_order;

static run_order read_order(void)
{
    run_order o = {ORDER_FORWARD, 0};
    const char *v = getenv("CUEMU_ORDER");
    if (!v || !*v || !strcmp(v, "forward"))
        return o;
    if (!strcmp(v, "reverse")) {
        o.kind = ORDER_REVERSE;
        return o;
    }
    if (!strncmp(v, "random:", 7)) {
        char *end = NULL;
        o.seed = strtoull(v + 7, &end, 10);
        if (end != v + 7 && !*end) {
            o.kind = ORDER_RANDOM;
            return o;
        }
    }
    fprintf(stderr, "cuemu: CUEMU_ORDER=%s: expected forward, reverse or random:SEED\n", v);
    exit(2);
}

static void fiber_main(fiber *f)
{
#ifdef CUEMU_ASAN
    __sanitizer_finish_switch_fiber(NULL, NULL, NULL);
#endif
    here = f;
    cuemu_current = &f->v;
    block_run *b = f->b;
    b->g->body(b->g->args);
    cp_retire(f, f->ncp);
    f->state = TH_DONE;
    b->live--;
    b->w[f->warp].live &= ~(1u << f->lane);
    if (b->at_block && b->at_block == b->live)
        open_block(b);
    check_warp(b, f->warp);
    to_scheduler(f);
    abort();   /* a finished fiber is never resumed */
}

/* Stack tops at one offset in a power-of-two stride would all fall in the
 * same cache sets, and every switch would miss: stagger them by whole
 * lines (up to 64 KiB of the 256). */
static size_t stack_stagger(unsigned i)
{
    return (size_t)(i * 17u % 1024u) * 64u;
}

static void fiber_init(fiber *f, unsigned char *stack_lo, unsigned i)
{
#ifdef CUEMU_ASAN
    /* a reused stack may keep the poison of an abandoned block's frames */
    __asan_unpoison_memory_region(stack_lo + 4096, STACK_BYTES - 4096);
#endif
    f->stack_lo = stack_lo;
    uint64_t *top = (uint64_t *)(stack_lo + STACK_BYTES - stack_stagger(i));
    /* the return address of the first switch: after that ret the stack
     * pointer is 16-aligned, so cuemu_start's call enters as the ABI says */
    top -= 1;
    top[0] = (uint64_t)(uintptr_t)cuemu_start;
    top -= 6;                            /* r15 r14 r13 r12 rbx rbp */
    memset(top, 0, 6 * sizeof *top);
    top[2] = (uint64_t)(uintptr_t)fiber_main;   /* r13 */
    top[3] = (uint64_t)(uintptr_t)f;            /* r12 */
    f->sp = top;
}

/* 0, or -1 after a deadlock (reported on stderr) */
static int run_block(pool *p, const cuemu_grid *g, cuemu_dim3 bi, const run_order *order)
{
    unsigned n = g->block.x * g->block.y * g->block.z;
    block_run b = {.g = g, .f = p->f, .w = p->w, .n = n, .live = n,
                   .reverse = order->kind == ORDER_REVERSE};
#ifdef CUEMU_ASAN
    pthread_attr_t attr;   /* where a fiber switches back to, for ASan */
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        void *lo = NULL;
        pthread_attr_getstack(&attr, &lo, &b.sched_size);
        b.sched_bottom = lo;
        pthread_attr_destroy(&attr);
    }
#endif
    unsigned nw = (n + 31) / 32;
    memset(p->w, 0, nw * sizeof *p->w);
    for (unsigned i = 0; i < n; i++)
        p->w[i / 32].live |= 1u << (i % 32);
    if (g->shared_bytes)
        memset(p->shared, 0xff, g->shared_bytes);   /* NaN floats, -1 ints */
    for (unsigned i = 0; i < n; i++) {
        fiber *f = &p->f[i];
        memset(f, 0, offsetof(fiber, cp));
        f->ncp = f->groups = 0;
        f->v.thread_idx = (cuemu_dim3){i % g->block.x, i / g->block.x % g->block.y,
                                       i / (g->block.x * g->block.y)};
        f->v.block_idx = bi;
        f->v.block_dim = g->block;
        f->v.grid_dim = g->grid;
        f->v.dynamic_shared = p->shared;
        f->lane = i % 32;
        f->warp = i / 32;
        f->b = &b;
        fiber_init(f, p->stacks + (size_t)i * STACK_BYTES, i);
    }
    /* p->order: the warps, in the order they are run in */
    for (unsigned i = 0; i < nw; i++)
        p->order[i] = order->kind == ORDER_REVERSE ? nw - 1 - i : i;
    uint64_t rng = order->seed ^ ((uint64_t)bi.x << 20 | (uint64_t)bi.y << 40 | bi.z) ^ 0x9e3779b97f4a7c15u;
    while (b.live > 0) {
        int ran = 0;
        if (order->kind == ORDER_RANDOM)   /* a fresh warp order each pass */
            for (unsigned i = nw - 1; i > 0; i--) {
                rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
                unsigned j = (unsigned)(rng % (i + 1)), t = p->order[i];
                p->order[i] = p->order[j];
                p->order[j] = t;
            }
        for (unsigned k = 0; k < nw; k++) {
            unsigned w0 = p->order[k] * 32, w1 = w0 + 32 < n ? w0 + 32 : n;
            int again = 1;
            while (again) {   /* this warp as far as it goes: to a block barrier, or the end */
                again = 0;
                for (unsigned l = 0; l < w1 - w0; l++) {
                    unsigned i = order->kind == ORDER_REVERSE ? w1 - 1 - l : w0 + l;
                    if (b.f[i].state == TH_READY) {
                        to_fiber(&b, &b.f[i]);
                        ran = again = 1;
                    }
                }
            }
        }
        if (!ran) {
            unsigned at_block = 0, at_warp = 0;
            for (unsigned i = 0; i < n; i++) {
                at_block += b.f[i].state == TH_AT_BLOCK;
                at_warp += b.f[i].state == TH_AT_WARP;
            }
            fprintf(stderr,
                    "cuemu: kernel %s, block (%u,%u,%u): deadlock: %u threads wait at "
                    "__syncthreads and %u at a warp collective that cannot complete\n",
                    g->name, bi.x, bi.y, bi.z, at_block, at_warp);
            return -1;
        }
    }
    return 0;
}

static void run_grid_locked(const cuemu_grid *g)
{
    unsigned n = g->block.x * g->block.y * g->block.z;
    run_order order = read_order();
    pool *p = pool_get(n);
    if (!p) {
        fprintf(stderr, "cuemu: kernel %s: out of memory for %u fiber stacks\n", g->name, n);
        standin_device_fault(cudaErrorLaunchOutOfResources);
        return;
    }
    for (unsigned z = 0; z < g->grid.z; z++)
        for (unsigned y = 0; y < g->grid.y; y++)
            for (unsigned x = 0; x < g->grid.x; x++)
                if (run_block(p, g, (cuemu_dim3){x, y, z}, &order)) {
                    standin_device_fault(cudaErrorLaunchFailure);
                    return;
                }
}

static void run_grid(void *arg)
{
    pthread_mutex_lock(&device_mu);
    run_grid_locked(arg);
    pthread_mutex_unlock(&device_mu);
}

static void drop_grid(void *arg)
{
    cuemu_grid *g = arg;
    if (g->drop)
        g->drop(g->args);
    free(g);
}

cudaError_t cuemu_launch(const cuemu_grid *g, cudaStream_t s)
{
    unsigned long long threads = (unsigned long long)g->block.x * g->block.y * g->block.z;
    size_t limit = standin_func_shared_limit(g->fn);
    cudaError_t e = cudaSuccess;
    int bad_block = threads == 0 || threads > MAX_THREADS || g->block.z > 64;
    int bad_grid = g->grid.x == 0 || g->grid.y == 0 || g->grid.z == 0 || g->grid.y > 65535 ||
                   g->grid.z > 65535;
    if (bad_block || bad_grid)
        e = cudaErrorInvalidConfiguration;
    else if (g->shared_bytes > (limit > DEFAULT_SHARED ? limit : DEFAULT_SHARED))
        e = cudaErrorInvalidValue;   /* more than 48 KiB needs cudaFuncSetAttribute */
    cuemu_grid *q = e == cudaSuccess ? malloc(sizeof *q) : NULL;
    if (e == cudaSuccess && !q)
        e = cudaErrorMemoryAllocation;
    if (e != cudaSuccess) {
        if (g->drop)
            g->drop(g->args);
        return standin_set_error(e);
    }
    *q = *g;
    if (standin_enqueue(s, run_grid, q, drop_grid)) {
        drop_grid(q);
        return standin_set_error(cudaErrorMemoryAllocation);
    }
    return cudaSuccess;
}
