/* plan_load.c - the plan reader: every check happens here, before anything
 * in the plan is used, so a truncated, corrupt, foreign or newer file gets
 * one line saying what is wrong and what to do instead of a crash. */
#include "plan_load.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../kernels/moek.h"

#define RECOMPILE "recompile the model with moec"

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

const char *plan_dtype_name(uint32_t dt)
{
    static const char *const n[] = {"f32", "bf16", "f16", "i32", "i64"};
    return dt < 5 ? n[dt] : "?";
}

const char *plan_storage_name(uint32_t st)
{
    static const char *const n[] = {"param", "grad", "optstate", "act", "input", "buffer"};
    return st < PLAN_ST_COUNT ? n[st] : "?";
}

const char *plan_role_name(uint32_t role)
{
    static const char *const n[] = {"", "tokens", "targets", "hyper", "loss_seed",
                                    "loss", "logits", "norm_sq", "metric", "expert_load"};
    return role <= PLAN_ROLE_EXPERT_LOAD ? n[role] : "?";
}

const char *plan_phase_name(uint32_t phase)
{
    static const char *const n[] = {"forward", "backward", "optimizer"};
    return phase <= PLAN_PHASE_OPTIMIZER ? n[phase] : "?";
}

const char *plan_arg_kind_name(uint32_t kind)
{
    static const char *const n[] = {"tensor", "i64", "f32", "f64"};
    return kind <= PLAN_ARG_F64 ? n[kind] : "?";
}

const char *plan_str(const plan_file *pf, uint32_t off)
{
    return off < pf->nstr ? pf->str + off : "";
}

uint64_t plan_tensor_numel(const plan_tensor *t)
{
    uint64_t n = 1;
    for (unsigned i = 0; i < t->ndim && i < PLAN_MAX_DIMS; i++)
        n *= (uint64_t)t->shape[i];
    return n;
}

int64_t plan_find_role(const plan_file *pf, uint32_t role)
{
    for (uint64_t i = 0; i < pf->ntensors; i++)
        if (pf->tensors[i].role == role)
            return (int64_t)i;
    return -1;
}

static const char *const section_names[PLAN_SEC_COUNT] = {
    "strings", "pools", "tensors", "libs", "kernels", "ops", "args", "params"};
static const uint64_t section_rec[PLAN_SEC_COUNT] = {
    1, sizeof(plan_pool), sizeof(plan_tensor), sizeof(plan_lib), sizeof(plan_kernel),
    sizeof(plan_op), sizeof(plan_arg), sizeof(plan_param)};

/* A string offset is valid when it lies inside the (NUL-terminated) section. */
static int check_str(const plan_file *pf, uint32_t off, const char *what, uint64_t idx,
                     char *err, size_t errlen)
{
    if (off >= pf->nstr)
        return fail(err, errlen, "corrupt: %s %llu names string offset %u outside the %llu-byte "
                    "string table; " RECOMPILE, what, (unsigned long long)idx, off,
                    (unsigned long long)pf->nstr);
    /* names end up in messages and on terminals: no control characters */
    for (const unsigned char *c = (const unsigned char *)pf->str + off; *c; c++)
        if (*c < 0x20 || *c == 0x7f)
            return fail(err, errlen, "corrupt: %s %llu names a string with control characters; "
                        RECOMPILE, what, (unsigned long long)idx);
    return 0;
}

static int check_header(const uint8_t *b, uint64_t n, char *err, size_t errlen)
{
    plan_header h;
    if (n < 8 || memcmp(b, PLAN_MAGIC, 8) != 0)
        return fail(err, errlen, "not a moec plan (no MOECPLAN magic); give run a plan.bin "
                    "written by moec");
    if (n < 16)
        return fail(err, errlen, "truncated: %llu bytes, the header needs %zu; " RECOMPILE,
                    (unsigned long long)n, sizeof(plan_header));
    uint32_t version;
    memcpy(&version, b + 8, 4);
    if (version > PLAN_FORMAT_VERSION)
        return fail(err, errlen, "compiled by a newer moec (plan format %u, this run reads %u); "
                    "recompile with this version", version, PLAN_FORMAT_VERSION);
    if (version < 1)
        return fail(err, errlen, "unknown plan format version %u; recompile with this version",
                    version);
    if (version < PLAN_FORMAT_VERSION)
        return fail(err, errlen, "compiled by an older moec (plan format %u, this run reads %u); "
                    "recompile with this version", version, PLAN_FORMAT_VERSION);
    if (n < sizeof(plan_header))
        return fail(err, errlen, "truncated: %llu bytes, the header needs %zu; " RECOMPILE,
                    (unsigned long long)n, sizeof(plan_header));
    memcpy(&h, b, sizeof h);
    if (h.header_bytes != sizeof(plan_header))
        return fail(err, errlen, "corrupt: header size %u, expected %zu; " RECOMPILE,
                    h.header_bytes, sizeof(plan_header));
    if (h.file_bytes > n)
        return fail(err, errlen, "truncated: header says %llu bytes, file has %llu; " RECOMPILE,
                    (unsigned long long)h.file_bytes, (unsigned long long)n);
    if (h.file_bytes < n)
        return fail(err, errlen, "corrupt: %llu trailing bytes after the %llu the header "
                    "declares; " RECOMPILE, (unsigned long long)(n - h.file_bytes),
                    (unsigned long long)h.file_bytes);
    uint64_t sum = plan_fnv1a(b + sizeof(plan_header), n - sizeof(plan_header), PLAN_FNV_OFFSET);
    if (sum != h.checksum)
        return fail(err, errlen, "corrupt: checksum mismatch; " RECOMPILE);
    if (n < sizeof(plan_header) + sizeof(plan_train))
        return fail(err, errlen, "truncated: no training configuration after the header; "
                    RECOMPILE);
    return 0;
}

static int check_sections(plan_file *pf, char *err, size_t errlen)
{
    const plan_header *h = pf->hdr;
    const uint64_t first = sizeof(plan_header) + sizeof(plan_train);
    for (int s = 0; s < PLAN_SEC_COUNT; s++) {
        uint64_t off = h->sections[s].offset, cnt = h->sections[s].count;
        if (cnt == 0)
            continue;
        if (off % 8 != 0)
            return fail(err, errlen, "corrupt: section %s at offset %llu is not 8-byte aligned; "
                        RECOMPILE, section_names[s], (unsigned long long)off);
        if (off < first || off > pf->size)
            return fail(err, errlen, "corrupt: section %s offset %llu outside [%llu, %llu]; "
                        RECOMPILE, section_names[s], (unsigned long long)off,
                        (unsigned long long)first, (unsigned long long)pf->size);
        if (cnt > (pf->size - off) / section_rec[s])
            return fail(err, errlen, "corrupt: section %s (%llu records of %llu bytes at %llu) "
                        "runs past the end of the %llu-byte file; " RECOMPILE, section_names[s],
                        (unsigned long long)cnt, (unsigned long long)section_rec[s],
                        (unsigned long long)off, (unsigned long long)pf->size);
        if (cnt > UINT32_MAX && s != PLAN_SEC_STRINGS && s != PLAN_SEC_ARGS)
            return fail(err, errlen, "corrupt: section %s has %llu records (more than 2^32); "
                        RECOMPILE, section_names[s], (unsigned long long)cnt);
    }
    const uint8_t *b = pf->base;
    /* an empty section's offset is never used (nor added to the base) */
#define SEC(id, field, nfield, type)                                                  \
    pf->nfield = h->sections[id].count;                                               \
    pf->field = (const type *)(pf->nfield ? b + h->sections[id].offset : b);
    SEC(PLAN_SEC_STRINGS, str, nstr, char)
    SEC(PLAN_SEC_POOLS, pools, npools, plan_pool)
    SEC(PLAN_SEC_TENSORS, tensors, ntensors, plan_tensor)
    SEC(PLAN_SEC_LIBS, libs, nlibs, plan_lib)
    SEC(PLAN_SEC_KERNELS, kernels, nkernels, plan_kernel)
    SEC(PLAN_SEC_OPS, ops, nops, plan_op)
    SEC(PLAN_SEC_ARGS, args, nargs, plan_arg)
    SEC(PLAN_SEC_PARAMS, params, nparams, plan_param)
#undef SEC
    if (pf->nstr == 0 || pf->str[0] != '\0' || pf->str[pf->nstr - 1] != '\0')
        return fail(err, errlen, "corrupt: the string table must start and end with a NUL "
                    "byte; " RECOMPILE);
    return 0;
}

static int check_train(const plan_file *pf, char *err, size_t errlen)
{
    const plan_train *t = pf->train;
    struct { const char *name; int64_t v, min; } ints[] = {
        {"batch", t->batch, 1}, {"seq", t->seq, 1}, {"grad_accum", t->grad_accum, 1},
        {"steps", t->steps, 0}, {"eval_every", t->eval_every, 0},
        {"eval_batches", t->eval_batches, 0}, {"checkpoint_every", t->checkpoint_every, 0},
        {"log_every", t->log_every, 0}, {"warmup", t->warmup, 0}, {"vocab", t->vocab, 1}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (ints[i].v < ints[i].min)
            return fail(err, errlen, "corrupt: train.%s = %lld (must be >= %lld); " RECOMPILE,
                        ints[i].name, (long long)ints[i].v, (long long)ints[i].min);
    if (t->batch > (1 << 24) || t->seq > (1 << 24) || t->vocab > (1LL << 32))
        return fail(err, errlen, "corrupt: train batch/seq/vocab implausibly large; " RECOMPILE);
    if (t->optimizer > PLAN_OPT_SGD)
        return fail(err, errlen, "corrupt: unknown optimizer %u; " RECOMPILE, t->optimizer);
    if (t->schedule > PLAN_SCHED_LINEAR)
        return fail(err, errlen, "corrupt: unknown schedule %u; " RECOMPILE, t->schedule);
    float fs[] = {t->lr, t->min_lr, t->beta1, t->beta2, t->eps, t->weight_decay, t->momentum,
                  t->clip_grad, t->val_fraction};
    for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++)
        if (!isfinite(fs[i]))
            return fail(err, errlen, "corrupt: a training hyper-parameter is not finite; "
                        RECOMPILE);
    if (!(t->val_fraction >= 0.0f && t->val_fraction < 1.0f))
        return fail(err, errlen, "corrupt: train.val_fraction %g outside [0, 1); " RECOMPILE,
                    (double)t->val_fraction);
    if (t->data_format > 2)
        return fail(err, errlen, "corrupt: unknown data format %u; " RECOMPILE, t->data_format);
    if (t->device > 1)
        return fail(err, errlen, "corrupt: unknown device %u; " RECOMPILE, t->device);
    if (t->precision != PLAN_F32 && t->precision != PLAN_BF16 && t->precision != PLAN_F16)
        return fail(err, errlen, "corrupt: train.precision %u is neither f32 nor bf16 nor f16; "
                    RECOMPILE, t->precision);
    /* fp16 needs a loss scale (>= 1); the others must not have one */
    if (t->precision == PLAN_F16 ? !(t->loss_scale >= 1.0f && isfinite(t->loss_scale))
                                 : (t->loss_scale != 0.0f || t->loss_scale_window != 0))
        return fail(err, errlen, "corrupt: train.loss_scale %g does not fit precision %u; "
                    RECOMPILE, (double)t->loss_scale, t->precision);
    if (t->workspace_bytes > (1ull << 40) || t->gpu_workspace_bytes > (1ull << 40))
        return fail(err, errlen, "corrupt: train.workspace_bytes %llu / gpu_workspace_bytes %llu "
                    "implausibly large; " RECOMPILE, (unsigned long long)t->workspace_bytes,
                    (unsigned long long)t->gpu_workspace_bytes);
    if (check_str(pf, t->data_path, "train.data_path", 0, err, errlen))
        return -1;
    return 0;
}

static int check_tensor(const plan_file *pf, uint64_t i, const plan_tensor *t, char *err,
                        size_t errlen)
{
    if (check_str(pf, t->name, "tensor", i, err, errlen))
        return -1;
    const char *nm = plan_str(pf, t->name);
#define TFAIL(...)                                                              \
    do {                                                                        \
        char why_[256];                                                         \
        snprintf(why_, sizeof why_, __VA_ARGS__);                               \
        return fail(err, errlen, "corrupt: tensor %llu '%s': %s; " RECOMPILE,   \
                    (unsigned long long)i, nm, why_);                           \
    } while (0)
    uint64_t esz = plan_dtype_size(t->dtype);
    if (esz == 0)
        TFAIL("unknown dtype %u", t->dtype);
    if (t->storage >= PLAN_ST_COUNT)
        TFAIL("unknown storage class %u", t->storage);
    if (t->role > PLAN_ROLE_EXPERT_LOAD)
        TFAIL("unknown role %u", t->role);
    if (t->ndim > PLAN_MAX_DIMS)
        TFAIL("%u dimensions (at most %d)", t->ndim, PLAN_MAX_DIMS);
    if (t->expert_shard != 0 && t->expert_shard != PLAN_EXPERT_SHARD)
        TFAIL("unknown expert_shard marker %u", t->expert_shard);
    uint64_t numel = 1;
    for (unsigned d = 0; d < t->ndim; d++) {
        if (t->shape[d] <= 0)
            TFAIL("dimension %u is %lld (must be > 0)", d, (long long)t->shape[d]);
        if ((uint64_t)t->shape[d] > (UINT64_MAX / 16) / numel)
            TFAIL("element count overflows");
        numel *= (uint64_t)t->shape[d];
    }
    if (t->bytes != numel * esz)
        TFAIL("%llu bytes, but %llu elements of %s need %llu", (unsigned long long)t->bytes,
              (unsigned long long)numel, plan_dtype_name(t->dtype),
              (unsigned long long)(numel * esz));
    if (t->pool >= pf->npools)
        TFAIL("pool %u out of range (%llu pools)", t->pool, (unsigned long long)pf->npools);
    const plan_pool *p = &pf->pools[t->pool];
    if (t->offset % PLAN_ALIGN != 0)
        TFAIL("offset %llu is not %d-byte aligned", (unsigned long long)t->offset, PLAN_ALIGN);
    if (t->offset > p->bytes || t->bytes > p->bytes - t->offset)
        TFAIL("[%llu, +%llu) lies outside pool '%s' (%llu bytes)", (unsigned long long)t->offset,
              (unsigned long long)t->bytes, plan_str(pf, p->name), (unsigned long long)p->bytes);
    switch (t->role) {
    case PLAN_ROLE_TOKENS: case PLAN_ROLE_TARGETS:
        if (t->dtype != PLAN_I32 || numel != (uint64_t)(pf->train->batch * pf->train->seq))
            TFAIL("role %s must be i32 with batch*seq = %lld elements", plan_role_name(t->role),
                  (long long)(pf->train->batch * pf->train->seq));
        break;
    case PLAN_ROLE_HYPER:
        if (t->dtype != PLAN_F32 || numel < MOEK_HYPER_COUNT)
            TFAIL("role hyper must be f32 with at least %d elements", MOEK_HYPER_COUNT);
        break;
    case PLAN_ROLE_LOSS_SEED: case PLAN_ROLE_LOSS: case PLAN_ROLE_NORM_SQ: case PLAN_ROLE_METRIC:
        if (t->dtype != PLAN_F32 || numel != 1)
            TFAIL("role %s must be one f32", plan_role_name(t->role));
        break;
    case PLAN_ROLE_EXPERT_LOAD:
        /* [E+1]: per-expert slot counts, then the dropped slots */
        if (t->dtype != PLAN_F32 || t->ndim != 1 || numel < 2 || t->storage != PLAN_ST_ACT)
            TFAIL("role expert_load must be an f32 [experts + 1] activation");
        break;
    case PLAN_ROLE_LOGITS:
        /* [B*T, V] or [B, T, V]: rows of vocab logits, one per position (bf16 plans: bf16) */
        if ((t->dtype != PLAN_F32 && t->dtype != PLAN_BF16 && t->dtype != PLAN_F16) || t->ndim < 1 || t->shape[t->ndim - 1] != pf->train->vocab ||
            numel != (uint64_t)(pf->train->batch * pf->train->seq) * (uint64_t)pf->train->vocab)
            TFAIL("role logits must be f32 with batch*seq rows of vocab = %lld (or bf16/f16)",
                  (long long)pf->train->vocab);
        break;
    default:
        break;
    }
#undef TFAIL
    return 0;
}

static int check_param_ref(const plan_file *pf, uint64_t i, int64_t ref, uint32_t storage,
                           const char *field, const plan_tensor *owner, char *err, size_t errlen)
{
    if (ref < 0 || (uint64_t)ref >= pf->ntensors)
        return fail(err, errlen, "corrupt: param %llu '%s': %s tensor %lld out of range; "
                    RECOMPILE, (unsigned long long)i, plan_str(pf, owner->name), field,
                    (long long)ref);
    const plan_tensor *t = &pf->tensors[ref];
    if (t->storage != storage)
        return fail(err, errlen, "corrupt: param %llu '%s': %s tensor '%s' has storage %s, "
                    "expected %s; " RECOMPILE, (unsigned long long)i, plan_str(pf, owner->name),
                    field, plan_str(pf, t->name), plan_storage_name(t->storage),
                    plan_storage_name(storage));
    /* ZeRO: optimizer state (stage >= 1) and gradients (>= 2) are one rank's
     * slice, over the expert-DP group (par_ranks / par_expert, possibly 1) for an
     * expert shard; at stage 3 the param is the slice too, so all sizes agree */
    int64_t zr = pf->train->par_ranks, zs = (int64_t)pf->train->par_zero;
    int slice = zr > 1 && zs < 3 &&
                (storage == PLAN_ST_OPTSTATE ? zs >= 1 : storage == PLAN_ST_GRAD && zs >= 2);
    if (owner->expert_shard == PLAN_EXPERT_SHARD && pf->train->par_expert > 1)
        zr /= pf->train->par_expert;
    if (slice ? (int64_t)plan_tensor_numel(t) !=
                    plan_zero_shard_numel((int64_t)plan_tensor_numel(owner), zr)
              : plan_tensor_numel(t) != plan_tensor_numel(owner))
        return fail(err, errlen, "corrupt: param %llu '%s': %s tensor '%s' has %llu elements, "
                    "the param %llu; " RECOMPILE, (unsigned long long)i,
                    plan_str(pf, owner->name), field, plan_str(pf, t->name),
                    (unsigned long long)plan_tensor_numel(t),
                    (unsigned long long)plan_tensor_numel(owner));
    return 0;
}

/* ZeRO-3 (docs/parallel.md): param i is its [S] slice, and its whole shape
 * is that of the tensor "<name>.gathered" that forward reads (checkpoints
 * take the whole shape from it): an activation of the param's dtype whose
 * slice over the param's group has S elements. */
static int check_zero3(const plan_file *pf, uint64_t i, const plan_tensor *t, char *err,
                       size_t errlen)
{
    const char *name = plan_str(pf, t->name);
    size_t nl = strlen(name);
    int64_t zr = pf->train->par_ranks;
    if (t->expert_shard == PLAN_EXPERT_SHARD && pf->train->par_expert > 1)
        zr /= pf->train->par_expert;
    for (uint64_t k = 0; k < pf->ntensors; k++) {
        const plan_tensor *f = &pf->tensors[k];
        const char *fn = plan_str(pf, f->name);
        if (strncmp(fn, name, nl) != 0 || strcmp(fn + nl, ".gathered") != 0)
            continue;
        if (f->storage == PLAN_ST_ACT && f->dtype == t->dtype &&
            plan_zero_shard_numel((int64_t)plan_tensor_numel(f), zr) ==
                (int64_t)plan_tensor_numel(t))
            return 0;
        break;
    }
    return fail(err, errlen, "corrupt: param %llu '%s': ZeRO stage 3 needs an activation "
                "tensor '%s.gathered' of its dtype whose slice over %lld ranks has its %llu "
                "elements; " RECOMPILE, (unsigned long long)i, name, name, (long long)zr,
                (unsigned long long)plan_tensor_numel(t));
}

static int check_body(plan_file *pf, char *err, size_t errlen)
{
    const plan_header *h = pf->hdr;
    if (check_str(pf, h->compiler_version, "header.compiler_version", 0, err, errlen) ||
        check_str(pf, h->model_name, "header.model_name", 0, err, errlen))
        return -1;
    if (check_train(pf, err, errlen))
        return -1;
    for (uint64_t i = 0; i < pf->npools; i++) {
        const plan_pool *p = &pf->pools[i];
        if (check_str(pf, p->name, "pool", i, err, errlen))
            return -1;
        if (p->storage >= PLAN_ST_COUNT)
            return fail(err, errlen, "corrupt: pool %llu has unknown storage class %u; "
                        RECOMPILE, (unsigned long long)i, p->storage);
        if (p->bytes > (1ull << 50))
            return fail(err, errlen, "corrupt: pool %llu '%s' claims %llu bytes; " RECOMPILE,
                        (unsigned long long)i, plan_str(pf, p->name),
                        (unsigned long long)p->bytes);
    }
    int nrole[PLAN_ROLE_EXPERT_LOAD + 1] = {0};
    for (uint64_t i = 0; i < pf->ntensors; i++) {
        if (check_tensor(pf, i, &pf->tensors[i], err, errlen))
            return -1;
        uint32_t r = pf->tensors[i].role;
        if (r != PLAN_ROLE_NONE && r != PLAN_ROLE_METRIC && r != PLAN_ROLE_EXPERT_LOAD && nrole[r]++)
            return fail(err, errlen, "corrupt: more than one tensor has role %s; " RECOMPILE,
                        plan_role_name(r));
    }
    for (uint64_t i = 0; i < pf->nlibs; i++)
        if (check_str(pf, pf->libs[i].path, "lib", i, err, errlen))
            return -1;
    for (uint64_t i = 0; i < pf->nkernels; i++) {
        const plan_kernel *k = &pf->kernels[i];
        if (check_str(pf, k->symbol, "kernel", i, err, errlen))
            return -1;
        if (pf->str[k->symbol] == '\0')
            return fail(err, errlen, "corrupt: kernel %llu has an empty symbol name; " RECOMPILE,
                        (unsigned long long)i);
        if (k->lib >= pf->nlibs)
            return fail(err, errlen, "corrupt: kernel %llu '%s' names library %u of %llu; "
                        RECOMPILE, (unsigned long long)i, plan_str(pf, k->symbol), k->lib,
                        (unsigned long long)pf->nlibs);
        if (k->nargs > PLAN_MAX_KERNEL_ARGS)
            return fail(err, errlen, "corrupt: kernel %llu '%s' has %u arguments (at most %d); "
                        RECOMPILE, (unsigned long long)i, plan_str(pf, k->symbol), k->nargs,
                        PLAN_MAX_KERNEL_ARGS);
        for (uint32_t a = 0; a < k->nargs; a++)
            if (k->arg_kinds[a] > PLAN_ARG_F64)
                return fail(err, errlen, "corrupt: kernel %llu '%s' argument %u has unknown "
                            "kind %u; " RECOMPILE, (unsigned long long)i,
                            plan_str(pf, k->symbol), a, k->arg_kinds[a]);
    }
    int has_phase[3] = {0, 0, 0};
    for (uint64_t i = 0; i < pf->nops; i++) {
        const plan_op *op = &pf->ops[i];
        if (check_str(pf, op->src_file, "op", i, err, errlen) ||
            check_str(pf, op->what, "op", i, err, errlen))
            return -1;
        if (op->kernel >= pf->nkernels)
            return fail(err, errlen, "corrupt: op %llu (%s) names kernel %u of %llu; " RECOMPILE,
                        (unsigned long long)i, plan_str(pf, op->what), op->kernel,
                        (unsigned long long)pf->nkernels);
        const plan_kernel *k = &pf->kernels[op->kernel];
        if (op->phase > PLAN_PHASE_OPTIMIZER)
            return fail(err, errlen, "corrupt: op %llu (%s) has unknown phase %u; " RECOMPILE,
                        (unsigned long long)i, plan_str(pf, op->what), op->phase);
        has_phase[op->phase] = 1;
        if (op->nargs != k->nargs)
            return fail(err, errlen, "corrupt: op %llu (%s) passes %u arguments to %s, which "
                        "takes %u; " RECOMPILE, (unsigned long long)i, plan_str(pf, op->what),
                        op->nargs, plan_str(pf, k->symbol), k->nargs);
        if (op->first_arg > pf->nargs || op->nargs > pf->nargs - op->first_arg)
            return fail(err, errlen, "corrupt: op %llu (%s) arguments [%llu, +%u) outside the "
                        "%llu-entry argument table; " RECOMPILE, (unsigned long long)i,
                        plan_str(pf, op->what), (unsigned long long)op->first_arg, op->nargs,
                        (unsigned long long)pf->nargs);
        for (uint32_t a = 0; a < op->nargs; a++) {
            const plan_arg *arg = &pf->args[op->first_arg + a];
            if (arg->kind != k->arg_kinds[a])
                return fail(err, errlen, "corrupt: op %llu (%s) argument %u is a %s, kernel %s "
                            "expects a %s; " RECOMPILE, (unsigned long long)i,
                            plan_str(pf, op->what), a, plan_arg_kind_name(arg->kind),
                            plan_str(pf, k->symbol), plan_arg_kind_name(k->arg_kinds[a]));
            if (arg->kind == PLAN_ARG_TENSOR && arg->v.tensor >= pf->ntensors)
                return fail(err, errlen, "corrupt: op %llu (%s) argument %u names tensor %llu "
                            "of %llu; " RECOMPILE, (unsigned long long)i,
                            plan_str(pf, op->what), a, (unsigned long long)arg->v.tensor,
                            (unsigned long long)pf->ntensors);
        }
    }
    for (uint64_t i = 0; i < pf->nparams; i++) {
        const plan_param *p = &pf->params[i];
        if (p->tensor >= pf->ntensors)
            return fail(err, errlen, "corrupt: param %llu names tensor %u of %llu; " RECOMPILE,
                        (unsigned long long)i, p->tensor, (unsigned long long)pf->ntensors);
        const plan_tensor *t = &pf->tensors[p->tensor];
        if (t->storage != PLAN_ST_PARAM && t->storage != PLAN_ST_BUFFER)
            return fail(err, errlen, "corrupt: param %llu '%s' is a %s tensor, not a param or "
                        "buffer; " RECOMPILE, (unsigned long long)i, plan_str(pf, t->name),
                        plan_storage_name(t->storage));
        if (p->grad >= 0)   /* -1: a frozen param or a buffer */
            if (check_param_ref(pf, i, p->grad, PLAN_ST_GRAD, "grad", t, err, errlen) ||
                (pf->train->par_ranks > 1 && pf->train->par_zero >= 3 &&
                 check_zero3(pf, i, t, err, errlen)))
                return -1;
        if (p->state0 >= 0 &&
            check_param_ref(pf, i, p->state0, PLAN_ST_OPTSTATE, "state0", t, err, errlen))
            return -1;
        if (p->state1 >= 0 &&
            check_param_ref(pf, i, p->state1, PLAN_ST_OPTSTATE, "state1", t, err, errlen))
            return -1;
        /* master: -1, or the fp32 OPTSTATE master copy of a bf16/f16 param */
        int half = t->dtype == PLAN_BF16 || t->dtype == PLAN_F16;
        if (p->master >= 0) {
            if (!half)
                return fail(err, errlen, "corrupt: param %llu '%s' is %s but has a master copy; "
                            "only bf16 params have one (and f16); " RECOMPILE, (unsigned long long)i,
                            plan_str(pf, t->name), plan_dtype_name(t->dtype));
            if (check_param_ref(pf, i, p->master, PLAN_ST_OPTSTATE, "master", t, err, errlen))
                return -1;
            if (pf->tensors[p->master].dtype != PLAN_F32)
                return fail(err, errlen, "corrupt: param %llu '%s': master tensor '%s' is %s, "
                            "not f32; " RECOMPILE, (unsigned long long)i, plan_str(pf, t->name),
                            plan_str(pf, pf->tensors[p->master].name),
                            plan_dtype_name(pf->tensors[p->master].dtype));
        } else if (half && p->grad >= 0) {
            return fail(err, errlen, "corrupt: trained %s param %llu '%s' has no fp32 master "
                        "copy; " RECOMPILE, plan_dtype_name(t->dtype), (unsigned long long)i,
                        plan_str(pf, t->name));
        }
        if (p->grad < -1 || p->state0 < -1 || p->state1 < -1 || p->master < -1)
            return fail(err, errlen, "corrupt: param %llu '%s' has a negative index other than "
                        "-1; " RECOMPILE, (unsigned long long)i, plan_str(pf, t->name));
        if (p->init > PLAN_INIT_NORMAL)
            return fail(err, errlen, "corrupt: param %llu '%s' has unknown init %u; " RECOMPILE,
                        (unsigned long long)i, plan_str(pf, t->name), p->init);
        if (!isfinite(p->init_std) || p->init_std < 0 || !isfinite(p->weight_decay))
            return fail(err, errlen, "corrupt: param %llu '%s' has a bad init_std or "
                        "weight_decay; " RECOMPILE, (unsigned long long)i, plan_str(pf, t->name));
        if (p->init != PLAN_INIT_NONE && t->dtype != PLAN_F32 && !half)
            return fail(err, errlen, "corrupt: param %llu '%s' is %s; only f32, bf16 and f16 params "
                        "can be initialised; " RECOMPILE, (unsigned long long)i, plan_str(pf, t->name),
                        plan_dtype_name(t->dtype));
    }
    static const uint32_t required[] = {PLAN_ROLE_TOKENS, PLAN_ROLE_TARGETS, PLAN_ROLE_LOSS};
    for (size_t r = 0; r < sizeof required / sizeof required[0]; r++)
        if (!nrole[required[r]])
            return fail(err, errlen, "no tensor has the required role %s; " RECOMPILE,
                        plan_role_name(required[r]));
    if (has_phase[PLAN_PHASE_BACKWARD] && !nrole[PLAN_ROLE_LOSS_SEED])
        return fail(err, errlen, "the plan has backward ops but no loss_seed tensor; " RECOMPILE);
    if (has_phase[PLAN_PHASE_OPTIMIZER] && !nrole[PLAN_ROLE_HYPER])
        return fail(err, errlen, "the plan has optimizer ops but no hyper tensor; " RECOMPILE);
    return 0;
}

int plan_parse(const void *buf, uint64_t n, plan_file *pf, char *err, size_t errlen)
{
    memset(pf, 0, sizeof *pf);
    if (((uintptr_t)buf & 7) != 0)
        return fail(err, errlen, "internal: plan buffer not 8-byte aligned; report this bug");
    if (check_header(buf, n, err, errlen))
        return -1;
    pf->base = buf;
    pf->size = n;
    pf->hdr = buf;
    pf->train = (const plan_train *)((const uint8_t *)buf + sizeof(plan_header));
    if (check_sections(pf, err, errlen) || check_body(pf, err, errlen)) {
        memset(pf, 0, sizeof *pf);
        return -1;
    }
    return 0;
}

int plan_load(const char *path, plan_file *pf, char *err, size_t errlen)
{
    memset(pf, 0, sizeof *pf);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(err, errlen, "cannot open: %s; check the path (moec writes plan.bin in "
                    "the current directory)", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fail(err, errlen, "not a regular file; give run a plan.bin written by moec");
    }
    if (st.st_size < (off_t)8) {
        close(fd);
        return fail(err, errlen, "not a moec plan (%lld bytes); give run a plan.bin written by "
                    "moec", (long long)st.st_size);
    }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return fail(err, errlen, "cannot map: %s; check the file", strerror(errno));
    if (plan_parse(m, (uint64_t)st.st_size, pf, err, errlen)) {
        munmap(m, (size_t)st.st_size);
        return -1;
    }
    pf->map = m;
    pf->map_bytes = (size_t)st.st_size;
    return 0;
}

void plan_close(plan_file *pf)
{
    if (pf->map)
        munmap(pf->map, pf->map_bytes);
    memset(pf, 0, sizeof *pf);
}
