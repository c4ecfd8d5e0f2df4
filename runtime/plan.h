/* plan.h - the plan file format: the one contract between moec (writer) and
 * run (reader).  Documented in docs/plan-format.md.
 *
 * Layout: a fixed header, then sections each an array of fixed-size
 * little-endian records, all 8-byte aligned, located by 64-bit offsets from
 * the start of the file.  No pointers are ever written; strings are offsets
 * into the string section (NUL-terminated; offset 0 is the empty string).
 * The checksum (FNV-1a 64) covers every byte after the header.  A reader
 * validates everything (every index in range, every offset inside its
 * section or pool, every string terminated) before it uses anything.
 */
#ifndef MOEC_PLAN_H
#define MOEC_PLAN_H

#include <stdint.h>

#define PLAN_MAGIC "MOECPLAN"   /* 8 bytes, no NUL stored */
#define PLAN_FORMAT_VERSION 2u   /* 2: plan_train.gpu_workspace_bytes */
#define PLAN_MAX_DIMS 6
#define PLAN_MAX_KERNEL_ARGS 24
#define PLAN_ALIGN 64           /* every tensor offset in a pool is a multiple */

enum plan_dtype { PLAN_F32 = 0, PLAN_BF16 = 1, PLAN_F16 = 2, PLAN_I32 = 3, PLAN_I64 = 4 };

/* Where a tensor lives.  Params, grads and optimizer state are pinned for the
 * whole run; activations share one pool whose offsets the memory planner
 * reuses after a tensor's last consumer. */
enum plan_storage {
    PLAN_ST_PARAM = 0,    /* trainable weights (checkpointed) */
    PLAN_ST_GRAD = 1,     /* accumulated gradient of a param */
    PLAN_ST_OPTSTATE = 2, /* Adam m/v, SGD momentum (checkpointed) */
    PLAN_ST_ACT = 3,      /* activations and backward temporaries */
    PLAN_ST_INPUT = 4,    /* filled by the runtime: tokens, targets, hyper, loss seed */
    PLAN_ST_BUFFER = 5,   /* non-trained state (checkpointed), e.g. a router bias */
    PLAN_ST_COUNT
};

/* Inputs the runtime fills, found by role rather than by name. */
enum plan_role {
    PLAN_ROLE_NONE = 0,
    PLAN_ROLE_TOKENS = 1,     /* i32 [B, T] */
    PLAN_ROLE_TARGETS = 2,    /* i32 [B, T] */
    PLAN_ROLE_HYPER = 3,      /* f32 [MOEK_HYPER_COUNT] */
    PLAN_ROLE_LOSS_SEED = 4,  /* f32 [1]: d(loss) = 1 / grad_accum */
    PLAN_ROLE_LOSS = 5,       /* f32 [1]: the scalar the model returns */
    PLAN_ROLE_LOGITS = 6,     /* f32 [B*T, V]: kept alive for sampling */
    PLAN_ROLE_NORM_SQ = 7,    /* f32 [1]: global grad norm squared */
    PLAN_ROLE_METRIC = 8,     /* f32 [1]: a named scalar logged every step (aux losses) */
    PLAN_ROLE_EXPERT_LOAD = 9,/* f32 [E+1]: slots routed to each expert, then dropped slots;
                                 named "<layer>.load", read by the runtime for statistics */
};

enum plan_arg_kind { PLAN_ARG_TENSOR = 0, PLAN_ARG_I64 = 1, PLAN_ARG_F32 = 2, PLAN_ARG_F64 = 3 };

/* Phases run in this order: forward+backward grad_accum times per step, then
 * the optimizer phase once. */
enum plan_phase { PLAN_PHASE_FORWARD = 0, PLAN_PHASE_BACKWARD = 1, PLAN_PHASE_OPTIMIZER = 2 };

enum plan_init { PLAN_INIT_NONE = 0, PLAN_INIT_ZEROS = 1, PLAN_INIT_ONES = 2, PLAN_INIT_NORMAL = 3 };

enum plan_optimizer { PLAN_OPT_ADAMW = 0, PLAN_OPT_SGD = 1 };
enum plan_schedule { PLAN_SCHED_CONSTANT = 0, PLAN_SCHED_COSINE = 1, PLAN_SCHED_LINEAR = 2 };

typedef struct plan_section {
    uint64_t offset;   /* from the start of the file */
    uint64_t count;    /* records (bytes for the string section) */
} plan_section;

enum plan_section_id {
    PLAN_SEC_STRINGS = 0, PLAN_SEC_POOLS, PLAN_SEC_TENSORS, PLAN_SEC_LIBS, PLAN_SEC_KERNELS,
    PLAN_SEC_OPS, PLAN_SEC_ARGS, PLAN_SEC_PARAMS, PLAN_SEC_COUNT
};

typedef struct plan_header {
    char magic[8];
    uint32_t format_version;
    uint32_t header_bytes;      /* sizeof(plan_header) */
    uint64_t file_bytes;
    uint64_t checksum;          /* FNV-1a 64 of bytes [header_bytes, file_bytes) */
    uint64_t source_hash;       /* FNV-1a 64 of every source file read */
    uint32_t compiler_version;  /* string offset, e.g. "moec 0.1.0" */
    uint32_t model_name;        /* string offset */
    plan_section sections[PLAN_SEC_COUNT];
} plan_header;

typedef struct plan_pool {
    uint32_t name;       /* string: "param", "grad", "optstate", "act", "input", "buffer" */
    uint32_t storage;    /* enum plan_storage */
    uint64_t bytes;      /* exactly what the runtime allocates */
} plan_pool;

typedef struct plan_tensor {
    uint32_t name;       /* string, stable across layouts: "layers.0.attn.wq" */
    uint8_t dtype;       /* enum plan_dtype */
    uint8_t storage;     /* enum plan_storage */
    uint8_t ndim;
    uint8_t role;        /* enum plan_role */
    uint32_t pool;       /* index into pools */
    uint32_t expert_shard; /* PLAN_EXPERT_SHARD: dim 0 is this rank's slice of the experts */
    int64_t shape[PLAN_MAX_DIMS];
    uint64_t offset;     /* bytes from the start of the pool, PLAN_ALIGN-aligned */
    uint64_t bytes;      /* product(shape) * dtype size */
} plan_tensor;

typedef struct plan_lib {
    uint32_t path;       /* string: "" for the device kernel library, else "libmyops.so" */
    uint32_t pad0;
} plan_lib;

typedef struct plan_kernel {
    uint32_t symbol;     /* string: "moek_matmul_fwd" */
    uint32_t lib;        /* index into libs */
    uint32_t nargs;      /* after ctx */
    uint8_t arg_kinds[PLAN_MAX_KERNEL_ARGS]; /* enum plan_arg_kind, the libffi signature */
    uint32_t pad0;
} plan_kernel;

typedef struct plan_op {
    uint32_t kernel;     /* index into kernels */
    uint32_t phase;      /* enum plan_phase */
    uint64_t first_arg;  /* index into args */
    uint32_t nargs;      /* must equal kernels[kernel].nargs */
    uint32_t src_file;   /* string: the .moe file this op came from */
    uint32_t src_line;
    uint32_t src_col;
    uint32_t what;       /* string: the source-level op, e.g. "rmsnorm (backward)" */
    uint32_t pad0;
} plan_op;

typedef struct plan_arg {
    uint32_t kind;       /* enum plan_arg_kind; must match the kernel's arg_kinds */
    uint32_t pad0;
    union { uint64_t tensor; int64_t i64; float f32; double f64; } v;
} plan_arg;

/* One row per trainable parameter or buffer: what checkpoints carry. */
typedef struct plan_param {
    uint32_t tensor;     /* the PARAM or BUFFER tensor */
    int32_t grad;        /* GRAD tensor, -1 for buffers */
    int32_t state0;      /* Adam m / SGD momentum, -1 if none */
    int32_t state1;      /* Adam v, -1 if none */
    uint32_t init;       /* enum plan_init */
    float init_std;
    float weight_decay;  /* already resolved: 0 for norms and biases by default */
    int32_t master;      /* bf16 params: the fp32 master copy (OPTSTATE), checkpointed under
                            the param's name; -1 when the param itself is fp32 */
} plan_param;

/* Training configuration, fixed size, stored right after the header. */
typedef struct plan_train {
    int64_t batch, seq, grad_accum, steps, seed;
    int64_t eval_every, eval_batches, checkpoint_every, log_every;
    int64_t warmup, vocab;
    uint32_t optimizer, schedule;     /* enum plan_optimizer, enum plan_schedule */
    float lr, min_lr, beta1, beta2, eps, weight_decay, momentum, clip_grad;
    float val_fraction;               /* held-out share of the data file */
    uint32_t data_path;               /* string: "" = the runtime's embedded default */
    uint32_t data_format;             /* 0 bytes (vocab 256), 1 llm.c uint16, 2 llm.c uint32 */
    uint32_t device;                  /* 0 cpu, 1 cuda: default from parallel{}/train{} */
    uint64_t flops_per_token;         /* 6N + 6LCT, active params only */
    uint64_t param_count, active_param_count;
    uint32_t precision;               /* enum plan_dtype of activations: PLAN_F32, PLAN_BF16 or
                                         PLAN_F16 */
    uint32_t pad0;
    uint64_t workspace_bytes;         /* kernel workspace the CPU library needs (half-precision
                                         widening, fused ops' fp32 scratch) */
    int64_t par_ranks;                /* parallel { ranks }: the world size the plan was made for */
    int64_t par_expert;               /* parallel { expert }: expert-parallel group size */
    int64_t par_zero;                 /* parallel { zero }: ZeRO stage 0-3 */
    float loss_scale;                 /* precision = fp16: the initial loss scale S (> 0);
                                         0 for f32 and bf16 (no loss scaling) */
    uint32_t loss_scale_window;       /* fp16: good steps before S doubles; 0 = a static S */
    uint32_t pad1;
    uint64_t gpu_workspace_bytes;     /* what the CUDA library needs of it: only the fused ops'
                                         and attention's scratch, in the tensors' own precision */
} plan_train;

/* The file: plan_header, plan_train, then the sections. */

static inline uint64_t plan_fnv1a(const void *data, uint64_t n, uint64_t h)
{
    const unsigned char *p = (const unsigned char *)data;
    for (uint64_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}
#define PLAN_FNV_OFFSET 14695981039346656037ull

static inline uint64_t plan_dtype_size(uint32_t dt)
{
    switch (dt) {
    case PLAN_F32:
    case PLAN_I32: return 4;
    case PLAN_BF16:
    case PLAN_F16: return 2;
    case PLAN_I64: return 8;
    default: return 0;
    }
}

/* ZeRO (parallel { zero >= 1 } on N > 1 data-parallel ranks, docs/parallel.md):
 * a tensor of n elements is cut into N equal slices of plan_zero_shard_numel
 * elements each (the last ones padded with zeros); rank i of the group holds
 * slice i.  A slice is a multiple of 32 elements so that every slice starts
 * 64-byte aligned in fp32 and in bf16.  Which tensors are slices follows from
 * plan_train.par_zero: stage >= 1 the optimizer state (m, v, master), >= 2
 * also the gradients, 3 also the params. */
static inline int64_t plan_zero_shard_numel(int64_t n, int64_t nranks)
{
    int64_t s = nranks > 0 ? (n + nranks - 1) / nranks : n;
    return (s + 31) / 32 * 32;
}

/* Expert parallelism (parallel { expert = P > 1 }, docs/parallel.md): an
 * expert param, its gradient, optimizer states and master copy carry
 * expert_shard = PLAN_EXPERT_SHARD (0 otherwise; was padding, so older plans
 * read 0).  Their dim 0 holds shape[0] experts of the global
 * shape[0] * par_expert, starting at global expert (rank % par_expert) *
 * shape[0]; names, init and checkpoints use the global tensor. */
#define PLAN_EXPERT_SHARD 1u

#endif
