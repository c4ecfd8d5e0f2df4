/* fuzz_plan.c - libFuzzer harness for the plan reader (runtime/plan_load.c).
 *
 * plan_parse() promises that once it returns 0 every index, offset, count and
 * string in the plan is in range.  Each input is tried twice:
 *   1. as is, which mostly exercises the header checks (a random mutation
 *      nearly always breaks the checksum);
 *   2. with file_bytes and the checksum patched to match, so the mutation
 *      reaches the section, tensor, kernel, op and param checks.
 * A plan that validates is then walked the way the runtime walks it (every
 * string, every tensor extent, every op argument, `run --inspect`), so a check
 * that is missing from the reader shows up as an ASan report here.
 *
 * With $MOEC_FUZZ_WRITE_SEED=path the harness writes one small valid plan
 * there and exits: the seed corpus when no moec binary is at hand. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "inspect.h"
#include "plan.h"
#include "plan_load.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* Touches everything a validated plan points at; returns a checksum only so
 * the reads cannot be optimised away. */
static uint64_t walk(const plan_file *pf)
{
    uint64_t acc = strlen(plan_str(pf, pf->hdr->compiler_version)) +
                   strlen(plan_str(pf, pf->hdr->model_name)) +
                   strlen(plan_str(pf, pf->train->data_path));
    for (uint64_t i = 0; i < pf->npools; i++)
        acc += strlen(plan_str(pf, pf->pools[i].name));
    for (uint64_t i = 0; i < pf->ntensors; i++) {
        const plan_tensor *t = &pf->tensors[i];
        const plan_pool *p = &pf->pools[t->pool];
        acc += strlen(plan_str(pf, t->name)) + plan_tensor_numel(t) * plan_dtype_size(t->dtype);
        /* the runtime computes base + offset + bytes; it must stay in the pool */
        if (t->offset + t->bytes > p->bytes)
            abort();
    }
    for (uint64_t i = 0; i < pf->nkernels; i++) {
        const plan_kernel *k = &pf->kernels[i];
        acc += strlen(plan_str(pf, k->symbol)) + strlen(plan_str(pf, pf->libs[k->lib].path));
    }
    for (uint64_t i = 0; i < pf->nops; i++) {
        const plan_op *op = &pf->ops[i];
        const plan_kernel *k = &pf->kernels[op->kernel];
        acc += strlen(plan_str(pf, op->what)) + strlen(plan_str(pf, op->src_file));
        for (uint32_t a = 0; a < op->nargs; a++) {
            const plan_arg *arg = &pf->args[op->first_arg + a];
            if (arg->kind != k->arg_kinds[a])
                abort();
            if (arg->kind == PLAN_ARG_TENSOR)
                acc += pf->tensors[arg->v.tensor].bytes;
        }
    }
    for (uint64_t i = 0; i < pf->nparams; i++) {
        const plan_param *p = &pf->params[i];
        acc += pf->tensors[p->tensor].bytes;
        if (p->grad >= 0)
            acc += pf->tensors[p->grad].bytes;
        if (p->state0 >= 0)
            acc += pf->tensors[p->state0].bytes;
        if (p->state1 >= 0)
            acc += pf->tensors[p->state1].bytes;
        if (p->master >= 0)   /* bf16 params: the fp32 master copy */
            acc += pf->tensors[p->master].bytes;
    }
    for (uint32_t r = 0; r <= PLAN_ROLE_METRIC; r++)
        acc += (uint64_t)plan_find_role(pf, r);
    return acc;
}

static void try_parse(const uint8_t *buf, uint64_t n)
{
    plan_file pf;
    char err[512];
    err[0] = 0;
    if (plan_parse(buf, n, &pf, err, sizeof err) != 0) {
        /* the one-line error is part of the contract: never empty */
        if (err[0] == 0)
            abort();
        return;
    }
    volatile uint64_t sink = walk(&pf);
    (void)sink;
    FILE *null = fopen("/dev/null", "w");
    if (null) {
        inspect_plan(&pf, null);
        fclose(null);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* plan_parse wants 8-byte alignment (plans are mmapped); the copy is
     * exactly `size` bytes so ASan sees any read past the end */
    uint8_t *buf = aligned_alloc(8, (size + 7) & ~(size_t)7);
    if (!buf && size)
        return 0;
    if (size)
        memcpy(buf, data, size);
    try_parse(buf, size);
    if (size >= sizeof(plan_header)) {
        plan_header h;
        memcpy(&h, buf, sizeof h);
        h.file_bytes = size;
        h.checksum = plan_fnv1a(buf + sizeof h, size - sizeof h, PLAN_FNV_OFFSET);
        memcpy(buf, &h, sizeof h);
        try_parse(buf, size);
    }
    free(buf);
    return 0;
}

/* --- a small valid plan, built field by field (no moec needed) ---------- */

typedef struct seed_buf {
    uint8_t bytes[8192];
    uint64_t n;
} seed_buf;

static uint64_t seed_put(seed_buf *s, const void *p, uint64_t n)
{
    uint64_t at = s->n;
    memcpy(s->bytes + at, p, n);
    s->n += (n + 7) & ~7ull;
    return at;
}

static void seed_write(const char *path)
{
    static seed_buf s;   /* 8 KiB: too big for comfort on the stack */
    plan_header h = {.format_version = PLAN_FORMAT_VERSION, .header_bytes = sizeof h};
    memcpy(h.magic, PLAN_MAGIC, 8);
    plan_train t = {.batch = 2, .seq = 4, .grad_accum = 1, .steps = 1, .log_every = 1,
                    .vocab = 16, .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f};
    s.n = sizeof h;
    seed_put(&s, &t, sizeof t);
    /* strings: "", "moec fuzz", "seed", "input", "tokens", "targets", "loss", "act",
     * "moek_copy", "seed.moe", "copy" */
    static const char strs[] = "\0moec fuzz\0seed\0input\0tokens\0targets\0loss\0act\0"
                               "moek_copy\0seed.moe\0copy";
    h.compiler_version = 1;
    h.model_name = 11;
    h.sections[PLAN_SEC_STRINGS] = (plan_section){seed_put(&s, strs, sizeof strs), sizeof strs};
    plan_pool pools[2] = {{.name = 16, .storage = PLAN_ST_INPUT, .bytes = 128},
                          {.name = 42, .storage = PLAN_ST_ACT, .bytes = 64}};
    h.sections[PLAN_SEC_POOLS] = (plan_section){seed_put(&s, pools, sizeof pools), 2};
    plan_tensor ts[3] = {
        {.name = 22, .dtype = PLAN_I32, .storage = PLAN_ST_INPUT, .ndim = 2,
         .role = PLAN_ROLE_TOKENS, .pool = 0, .shape = {2, 4}, .offset = 0, .bytes = 32},
        {.name = 29, .dtype = PLAN_I32, .storage = PLAN_ST_INPUT, .ndim = 2,
         .role = PLAN_ROLE_TARGETS, .pool = 0, .shape = {2, 4}, .offset = 64, .bytes = 32},
        {.name = 37, .dtype = PLAN_F32, .storage = PLAN_ST_ACT, .ndim = 1,
         .role = PLAN_ROLE_LOSS, .pool = 1, .shape = {1}, .offset = 0, .bytes = 4}};
    h.sections[PLAN_SEC_TENSORS] = (plan_section){seed_put(&s, ts, sizeof ts), 3};
    plan_lib lib = {.path = 0};
    h.sections[PLAN_SEC_LIBS] = (plan_section){seed_put(&s, &lib, sizeof lib), 1};
    plan_kernel k = {.symbol = 46, .lib = 0, .nargs = 3,
                     .arg_kinds = {PLAN_ARG_TENSOR, PLAN_ARG_TENSOR, PLAN_ARG_I64}};
    h.sections[PLAN_SEC_KERNELS] = (plan_section){seed_put(&s, &k, sizeof k), 1};
    plan_op op = {.kernel = 0, .phase = PLAN_PHASE_FORWARD, .first_arg = 0, .nargs = 3,
                  .src_file = 56, .src_line = 1, .src_col = 1, .what = 65};
    h.sections[PLAN_SEC_OPS] = (plan_section){seed_put(&s, &op, sizeof op), 1};
    plan_arg args[3] = {{.kind = PLAN_ARG_TENSOR, .v.tensor = 0},
                        {.kind = PLAN_ARG_TENSOR, .v.tensor = 2},
                        {.kind = PLAN_ARG_I64, .v.i64 = 1}};
    h.sections[PLAN_SEC_ARGS] = (plan_section){seed_put(&s, args, sizeof args), 3};
    h.file_bytes = s.n;
    h.checksum = plan_fnv1a(s.bytes + sizeof h, s.n - sizeof h, PLAN_FNV_OFFSET);
    memcpy(s.bytes, &h, sizeof h);

    plan_file pf;
    char err[512];
    if (plan_parse(s.bytes, s.n, &pf, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_plan: the built-in seed plan does not validate: %s\n", err);
        exit(1);
    }
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(s.bytes, 1, s.n, f) != s.n || fclose(f) != 0) {
        fprintf(stderr, "fuzz_plan: cannot write %s\n", path);
        exit(1);
    }
    exit(0);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *seed = getenv("MOEC_FUZZ_WRITE_SEED");
    if (seed && *seed)
        seed_write(seed);
    return 0;
}
