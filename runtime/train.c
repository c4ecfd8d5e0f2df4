/* train.c - the step loop.  Per step: hyper-parameters and the loss seed
 * into their input tensors, grad_accum x (batch, forward, backward), the
 * optimizer phase, then metrics, validation and checkpoints. */
#include "train.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "checkpoint.h"
#include "comm.h"
#include "data.h"
#include "rng.h"

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

double train_lr(const plan_train *t, int64_t step)
{
    double lr = t->lr, min_lr = t->min_lr;
    int64_t s = step - 1;   /* completed steps before this one */
    if (s < t->warmup)
        return lr * (double)(s + 1) / (double)t->warmup;
    if (t->schedule == PLAN_SCHED_CONSTANT)
        return lr;
    int64_t span = t->steps - t->warmup;
    double p = span > 0 ? (double)(s - t->warmup) / (double)span : 1.0;
    if (p > 1.0)
        p = 1.0;
    if (t->schedule == PLAN_SCHED_COSINE)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + cos(3.141592653589793 * p));
    return lr + (min_lr - lr) * p;
}

int train_init_params(exec_state *ex, char *err, size_t errlen)
{
    const plan_file *pf = ex->pf;
    for (uint64_t i = 0; i < pf->nparams; i++) {
        const plan_param *p = &pf->params[i];
        const plan_tensor *t = &pf->tensors[p->tensor];
        if (p->init == PLAN_INIT_NONE)
            continue;
        uint64_t n = ckpt_param_numel(pf, i), first = 0;   /* ZeRO-3: not the slice */
        if (t->expert_shard == PLAN_EXPERT_SHARD) {
            /* this rank's experts of the global tensor: draw it all, keep the
             * slice, so every layout starts from the same weights */
            first = n * (uint64_t)(comm_rank(ex->ctx.comm) % pf->train->par_expert);
            n *= (uint64_t)pf->train->par_expert;
        }
        float *h = malloc(n * sizeof *h + 1);
        if (!h)
            return fail(err, errlen, "out of memory initialising %s", plan_str(pf, t->name));
        rng r = rng_seeded((uint64_t)pf->train->seed, plan_str(pf, t->name));
        for (uint64_t k = 0; k < n; k++)
            h[k] = p->init == PLAN_INIT_ZEROS  ? 0.0f
                 : p->init == PLAN_INIT_ONES   ? 1.0f
                 : (float)(rng_normal(&r) * p->init_std);
        /* the same fp32 values in any precision: a bf16 param's master gets
         * them and the param their bf16 rounding */
        int rc = ckpt_set_param(ex, i, h + first, err, errlen);
        free(h);
        if (rc)
            return -1;
    }
    return 0;
}

int train_data_path(const plan_file *pf, const char *opt, const char *exe_dir, char *out,
                    size_t n, char *err, size_t errlen)
{
    const char *p = opt ? opt : plan_str(pf, pf->train->data_path);
    if (*p) {
        snprintf(out, n, "%s", p);
        return 0;
    }
    /* next to a top-level run, inside a build folder, or installed */
    const char *cands[] = {"%s/build/data/default.txt", "%s/data/default.txt",
                           "%s/../share/moec/default.txt"};
    for (int i = 0; i < 3; i++) {
        snprintf(out, n, cands[i], exe_dir && *exe_dir ? exe_dir : ".");
        if (access(out, R_OK) == 0)
            return 0;
    }
    return fail(err, errlen, "the default corpus is missing (%s/build/data/default.txt); run "
                "make, or pass --data FILE", exe_dir && *exe_dir ? exe_dir : ".");
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct roles {
    int64_t tokens, targets, hyper, seed, loss, norm, logits;
    int64_t *metric;
    int nmetric;
    int64_t shard, nshards;   /* data parallelism: this rank's share of each batch */
} roles;

static int find_roles(const plan_file *pf, roles *r)
{
    r->tokens = plan_find_role(pf, PLAN_ROLE_TOKENS);
    r->targets = plan_find_role(pf, PLAN_ROLE_TARGETS);
    r->hyper = plan_find_role(pf, PLAN_ROLE_HYPER);
    r->seed = plan_find_role(pf, PLAN_ROLE_LOSS_SEED);
    r->loss = plan_find_role(pf, PLAN_ROLE_LOSS);
    r->norm = plan_find_role(pf, PLAN_ROLE_NORM_SQ);
    r->logits = plan_find_role(pf, PLAN_ROLE_LOGITS);
    r->metric = calloc(pf->ntensors + 1, sizeof *r->metric);
    r->nmetric = 0;
    r->shard = 0;
    r->nshards = 1;
    if (!r->metric)
        return -1;
    for (uint64_t i = 0; i < pf->ntensors; i++)
        if (pf->tensors[i].role == PLAN_ROLE_METRIC)
            r->metric[r->nmetric++] = (int64_t)i;
    return 0;
}

/* One forward (+ backward) pass on a fresh batch; returns its loss. */
static int micro_step(exec_state *ex, const roles *r, const data_file *d, int split, rng *g,
                      int32_t *tok, int32_t *tgt, int backward, float *loss, double *metrics,
                      char *err, size_t errlen)
{
    const plan_train *t = ex->pf->train;
    uint64_t bytes = (uint64_t)(t->batch * t->seq) * 4;
    if (data_batch_shard(d, split, g, t->batch, t->seq, t->vocab, r->shard, r->nshards, tok, tgt,
                         err, errlen) ||
        exec_write(ex, (uint64_t)r->tokens, 0, tok, bytes, err, errlen) ||
        exec_write(ex, (uint64_t)r->targets, 0, tgt, bytes, err, errlen) ||
        exec_run(ex, PLAN_PHASE_FORWARD, backward ? PLAN_PHASE_BACKWARD : PLAN_PHASE_FORWARD,
                 err, errlen) ||
        exec_read(ex, (uint64_t)r->loss, 0, loss, 4, err, errlen))
        return -1;
    for (int m = 0; metrics && m < r->nmetric; m++) {
        float v;
        if (exec_read(ex, (uint64_t)r->metric[m], 0, &v, 4, err, errlen))
            return -1;
        metrics[m] += v;
    }
    return 0;
}

static int evaluate(exec_state *ex, const roles *r, const data_file *d, int32_t *tok,
                    int32_t *tgt, double *out, char *err, size_t errlen)
{
    const plan_train *t = ex->pf->train;
    /* the same held-out batches every time, independent of training state */
    rng g = rng_seeded((uint64_t)t->seed, "eval");
    double sum = 0;
    for (int64_t b = 0; b < t->eval_batches; b++) {
        float l;
        if (micro_step(ex, r, d, DATA_VAL, &g, tok, tgt, 0, &l, NULL, err, errlen) ||
            exec_check(ex, "evaluation", PLAN_PHASE_FORWARD, PLAN_PHASE_FORWARD, err, errlen))
            return -1;
        sum += l;
    }
    /* each rank evaluated its share of every batch: the mean over ranks */
    if (comm_allreduce_host(ex->ctx.comm, &sum, 1, COMM_GROUP_DP, "validation loss", err, errlen))
        return -1;
    *out = sum / (double)r->nshards / (double)t->eval_batches;
    return 0;
}

/* precision = fp16: the dynamic loss scale S and its counters (S = 0: no
 * loss scaling, fp32 and bf16).  Checkpointed, so a resume continues with
 * the same S and the same bias corrections. */
typedef struct lscale {
    double scale;        /* S: multiplies the loss seed; the optimizers divide it out */
    int64_t good;        /* overflow-free steps since S last changed */
    int64_t bad;         /* consecutive overflowing steps at S = 1 */
    int64_t skipped;     /* steps skipped so far: Adam's bias corrections count updates */
} lscale;

static const char *const lscale_keys[4] = {"loss_scale", "loss_scale_good", "loss_scale_bad",
                                           "loss_scale_skipped"};

/* From a checkpoint's metadata; missing (an fp32/bf16 checkpoint): the
 * plan's initial state.  -1 on damaged values. */
static int lscale_load(lscale *ls, const ckpt_meta *m, int nm)
{
    const char *v[4];
    for (int k = 0; k < 4; k++)
        v[k] = ckpt_meta_get(m, nm, lscale_keys[k]);
    if (!v[0] || ls->scale == 0.0)
        return 0;
    char *e[4];
    double s = strtod(v[0], &e[0]);
    int64_t c[3];
    for (int k = 1; k < 4; k++)
        c[k - 1] = v[k] ? strtoll(v[k], &e[k], 10) : (e[k] = (char *)"", 0);
    if (*e[0] || *e[1] || *e[2] || *e[3] || !(s >= 1.0 && s < 3.4e38) || c[0] < 0 || c[1] < 0 ||
        c[2] < 0)
        return -1;
    ls->scale = s;
    ls->good = c[0];
    ls->bad = c[1];
    ls->skipped = c[2];
    return 0;
}

static int save(exec_state *ex, const char *path, int64_t step, const rng *g, const lscale *ls,
                char *err, size_t errlen)
{
    const plan_file *pf = ex->pf;
    /* data parallelism: every rank holds the same state; rank 0 writes it.
     * ZeRO: each rank holds a slice, so every rank joins the gathers */
    int zero = pf->train->par_ranks > 1 && (pf->train->par_zero >= 1 ||
                                            pf->train->par_expert > 1);   /* shards: all ranks gather */
    if (comm_rank(ex->ctx.comm) != 0 && !zero)
        return 0;
    ckpt_meta m[9];
    memset(m, 0, sizeof m);
    snprintf(m[0].key, sizeof m[0].key, "format");
    snprintf(m[0].val, sizeof m[0].val, "moec-1");
    snprintf(m[1].key, sizeof m[1].key, "step");
    snprintf(m[1].val, sizeof m[1].val, "%" PRId64, step);
    snprintf(m[2].key, sizeof m[2].key, "data_rng");
    snprintf(m[2].val, sizeof m[2].val, "%016" PRIx64, g->s);
    snprintf(m[3].key, sizeof m[3].key, "model");
    snprintf(m[3].val, sizeof m[3].val, "%s", plan_str(pf, pf->hdr->model_name));
    snprintf(m[4].key, sizeof m[4].key, "source_hash");
    snprintf(m[4].val, sizeof m[4].val, "%016" PRIx64, pf->hdr->source_hash);
    int nm = 5;
    if (ls && ls->scale > 0) {
        int64_t c[3] = {ls->good, ls->bad, ls->skipped};
        snprintf(m[nm].key, sizeof m[nm].key, "%s", lscale_keys[0]);
        snprintf(m[nm++].val, sizeof m[0].val, "%.17g", ls->scale);
        for (int k = 0; k < 3; k++) {
            snprintf(m[nm].key, sizeof m[nm].key, "%s", lscale_keys[k + 1]);
            snprintf(m[nm++].val, sizeof m[0].val, "%" PRId64, c[k]);
        }
    }
    return ckpt_save(ex, path, m, nm, err, errlen);
}

/* a plan name as a JSON string (names hold no control characters) */
static void json_name(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fputc('\\', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

static void fmt_eta(double s, char *buf, size_t n)
{
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

/* ---- --trace DIR: what an independent reimplementation (tests/parity)
 * needs to replay a run exactly: the config and per-param weight decay, the
 * weights before step 1, every micro-batch, each step's loss and lr, and
 * step 1's accumulated gradients before the optimizer touches them. */
typedef struct trace {
    char dir[3072];
    FILE *log, *batches;
} trace;

static int trace_fail(const char *dir, const char *file, char *err, size_t errlen)
{
    return fail(err, errlen, "cannot write trace file %s/%s: %s; check the --trace directory",
                dir, file, strerror(errno));
}

static int trace_open(trace *tr, const char *dir, exec_state *ex, int64_t start, const rng *g,
                      char *err, size_t errlen)
{
    const plan_file *pf = ex->pf;
    const plan_train *t = pf->train;
    static const char *const opt[] = {"adamw", "sgd"};
    static const char *const sched[] = {"constant", "cosine", "linear"};
    char path[4096];
    snprintf(tr->dir, sizeof tr->dir, "%s", dir);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return fail(err, errlen, "cannot create trace directory %s: %s; check the path", dir,
                    strerror(errno));
    snprintf(path, sizeof path, "%s/trace.jsonl", dir);
    if (!(tr->log = fopen(path, "w")))
        return trace_fail(dir, "trace.jsonl", err, errlen);
    snprintf(path, sizeof path, "%s/batches.bin", dir);
    if (!(tr->batches = fopen(path, "wb")))
        return trace_fail(dir, "batches.bin", err, errlen);
    fprintf(tr->log, "{\"model\":");
    json_name(tr->log, plan_str(pf, pf->hdr->model_name));
    fprintf(tr->log, ",\"batch\":%" PRId64 ",\"seq\":%" PRId64 ",\"grad_accum\":%" PRId64
            ",\"steps\":%" PRId64 ",\"vocab\":%" PRId64 ",\"start\":%" PRId64
            ",\"optimizer\":\"%s\",\"schedule\":\"%s\",\"warmup\":%" PRId64
            ",\"lr\":%.9g,\"min_lr\":%.9g,\"beta1\":%.9g,\"beta2\":%.9g,\"eps\":%.9g"
            ",\"momentum\":%.9g,\"clip_grad\":%.9g,\"precision\":%u,\"params\":[",
            t->batch, t->seq, t->grad_accum, t->steps, t->vocab, start,
            opt[t->optimizer < 2 ? t->optimizer : 0], sched[t->schedule < 3 ? t->schedule : 0],
            t->warmup, (double)t->lr, (double)t->min_lr, (double)t->beta1, (double)t->beta2,
            (double)t->eps, (double)t->momentum, (double)t->clip_grad, t->precision);
    for (uint64_t i = 0; i < pf->nparams; i++) {
        fprintf(tr->log, "%s{\"name\":", i ? "," : "");
        json_name(tr->log, plan_str(pf, pf->tensors[pf->params[i].tensor].name));
        fprintf(tr->log, ",\"weight_decay\":%.9g,\"trained\":%s}",
                (double)pf->params[i].weight_decay, pf->params[i].grad >= 0 ? "true" : "false");
    }
    fprintf(tr->log, "]}\n");
    snprintf(path, sizeof path, "%s/init.safetensors", dir);
    if (fflush(tr->log) != 0)
        return trace_fail(dir, "trace.jsonl", err, errlen);
    return save(ex, path, start, g, NULL, err, errlen);
}

static int trace_batch(trace *tr, const int32_t *tok, const int32_t *tgt, size_t n, char *err,
                       size_t errlen)
{
    if (fwrite(tok, 4, n, tr->batches) != n || fwrite(tgt, 4, n, tr->batches) != n)
        return trace_fail(tr->dir, "batches.bin", err, errlen);
    return 0;
}

static int trace_grads(trace *tr, exec_state *ex, int64_t step, char *err, size_t errlen)
{
    char path[4096];
    ckpt_meta m[1];
    memset(m, 0, sizeof m);
    snprintf(m[0].key, sizeof m[0].key, "step");
    snprintf(m[0].val, sizeof m[0].val, "%" PRId64, step);
    snprintf(path, sizeof path, "%s/grads.safetensors", tr->dir);
    return ckpt_save_grads(ex, path, m, 1, err, errlen);
}

static int trace_step(trace *tr, int64_t step, double loss, float lr, double norm, char *err,
                      size_t errlen)
{
    fprintf(tr->log, "{\"step\":%" PRId64 ",\"loss\":%.9g,\"lr\":%.9g,\"norm\":%.9g}\n",
            step, loss, (double)lr, isfinite(norm) ? norm : -1.0);
    if (fflush(tr->log) != 0 || fflush(tr->batches) != 0)
        return trace_fail(tr->dir, "trace.jsonl", err, errlen);
    return 0;
}

/* ---- expert load statistics (issue 4; docs/moe.md) ---------------------
 * Each MoE layer's PLAN_ROLE_EXPERT_LOAD tensor "<layer>.load" holds, for
 * the last micro-batch run, the slots routed to each of its E experts and
 * then the slots dropped by capacity: float[E + 1]. */
typedef struct load_sum {
    double min, mean, max, cv, dropped_share;
    int64_t dead, experts;
} load_sum;

static load_sum load_summary(const float *c, int64_t n)
{
    load_sum s = {.experts = n - 1, .min = c[0], .max = c[0]};
    double sum = 0, sq = 0;
    for (int64_t e = 0; e < n - 1; e++) {
        sum += c[e];
        s.min = c[e] < s.min ? c[e] : s.min;
        s.max = c[e] > s.max ? c[e] : s.max;
        s.dead += c[e] == 0;
    }
    s.mean = sum / (double)(n - 1);
    for (int64_t e = 0; e < n - 1; e++)
        sq += (c[e] - s.mean) * (c[e] - s.mean);
    s.cv = s.mean > 0 ? sqrt(sq / (double)(n - 1)) / s.mean : 0.0;
    s.dropped_share = sum > 0 ? c[n - 1] / sum : 0.0;
    return s;
}

/* Reads every load tensor into one array (NULL when the plan has none). */
static int loads_read(exec_state *ex, float **out, char *err, size_t errlen)
{
    const plan_file *pf = ex->pf;
    uint64_t total = 0;
    *out = NULL;
    for (uint64_t i = 0; i < pf->ntensors; i++)
        if (pf->tensors[i].role == PLAN_ROLE_EXPERT_LOAD)
            total += (uint64_t)pf->tensors[i].shape[0];
    if (!total)
        return 0;
    float *buf = malloc(total * 4);
    if (!buf)
        return fail(err, errlen, "out of memory");
    uint64_t at = 0;
    for (uint64_t i = 0; i < pf->ntensors; i++) {
        const plan_tensor *t = &pf->tensors[i];
        if (t->role != PLAN_ROLE_EXPERT_LOAD)
            continue;
        if (exec_read(ex, i, 0, buf + at, t->bytes, err, errlen)) {
            free(buf);
            return -1;
        }
        at += (uint64_t)t->shape[0];
    }
    *out = buf;
    return 0;
}

/* One line per MoE layer: tokens per expert min/mean/max, coefficient of
 * variation, dead experts, dropped share; `all` adds every count. */
static void loads_print(const plan_file *pf, const float *buf, int all, FILE *out)
{
    uint64_t at = 0;
    for (uint64_t i = 0; buf && i < pf->ntensors; i++) {
        const plan_tensor *t = &pf->tensors[i];
        if (t->role != PLAN_ROLE_EXPERT_LOAD)
            continue;
        const float *c = buf + at;
        load_sum s = load_summary(c, t->shape[0]);
        fprintf(out, "  %s | tokens/expert min %.0f mean %.1f max %.0f | cv %.2f | dead %lld/%lld | "
                "dropped %.1f%%\n", plan_str(pf, t->name), s.min, s.mean, s.max, s.cv,
                (long long)s.dead, (long long)s.experts, 100.0 * s.dropped_share);
        if (all) {
            fprintf(out, "   ");
            for (int64_t e = 0; e < s.experts; e++)
                fprintf(out, " %lld:%.0f", (long long)e, c[e]);
            fprintf(out, " dropped:%.0f\n", c[s.experts]);
        }
        at += (uint64_t)t->shape[0];
    }
}

/* ,"routing":{"<layer>":{"load":[...],"min":..,...},...} for the JSONL. */
static void loads_json(const plan_file *pf, const float *buf, FILE *mf)
{
    uint64_t at = 0;
    int first = 1;
    for (uint64_t i = 0; buf && i < pf->ntensors; i++) {
        const plan_tensor *t = &pf->tensors[i];
        if (t->role != PLAN_ROLE_EXPERT_LOAD)
            continue;
        const float *c = buf + at;
        load_sum s = load_summary(c, t->shape[0]);
        char layer[512];
        snprintf(layer, sizeof layer, "%s", plan_str(pf, t->name));
        size_t n = strlen(layer);
        if (n > 5 && strcmp(layer + n - 5, ".load") == 0)
            layer[n - 5] = '\0';
        fputs(first ? ",\"routing\":{" : ",", mf);
        first = 0;
        json_name(mf, layer);
        fputs(":{\"load\":[", mf);
        for (int64_t e = 0; e < s.experts; e++)
            fprintf(mf, "%s%.0f", e ? "," : "", c[e]);
        fprintf(mf, "],\"min\":%.0f,\"mean\":%.6g,\"max\":%.0f,\"cv\":%.6g,\"dead\":%lld,"
                "\"dropped\":%.0f,\"dropped_share\":%.6g}", s.min, s.mean, s.max, s.cv,
                (long long)s.dead, c[s.experts], s.dropped_share);
        at += (uint64_t)t->shape[0];
    }
    if (!first)
        fputc('}', mf);
}

int train_routing_stats(exec_state *ex, const train_opts *o, FILE *out, char *err, size_t errlen)
{
    const plan_file *pf = ex->pf;
    const plan_train *t = pf->train;
    roles r;
    data_file d = {0};
    int32_t *tok = NULL, *tgt = NULL;
    float *loads = NULL;
    int rc = -1;
    char path[4096];
    if (find_roles(pf, &r))
        return fail(err, errlen, "out of memory");
    if (plan_find_role(pf, PLAN_ROLE_EXPERT_LOAD) < 0) {
        fail(err, errlen, "the plan has no MoE layer (no expert_load tensor); nothing to count");
        goto out;
    }
    ckpt_meta m[16];
    int nm = 0;
    const char *w = o->resume_path ? o->resume_path : o->init_from;
    if (train_init_params(ex, err, errlen) ||
        (w && ckpt_load(ex, w, CKPT_WEIGHTS, m, 16, &nm, err, errlen)) ||
        train_data_path(pf, o->data_path, o->exe_dir, path, sizeof path, err, errlen) ||
        data_open(&d, path, t->data_format, t->val_fraction, err, errlen))
        goto out;
    tok = malloc((size_t)(t->batch * t->seq) * 4);
    tgt = malloc((size_t)(t->batch * t->seq) * 4);
    if (!tok || !tgt) {
        fail(err, errlen, "out of memory");
        goto out;
    }
    float hyper[MOEK_HYPER_COUNT] = {0};
    hyper[MOEK_HYPER_STEP] = 1;
    rng g = rng_seeded((uint64_t)t->seed, "data");
    float loss;
    if ((r.hyper >= 0 && exec_write(ex, (uint64_t)r.hyper, 0, hyper, sizeof hyper, err, errlen)) ||
        micro_step(ex, &r, &d, DATA_TRAIN, &g, tok, tgt, 0, &loss, NULL, err, errlen) ||
        exec_check(ex, "routing stats", PLAN_PHASE_FORWARD, PLAN_PHASE_FORWARD, err, errlen) ||
        loads_read(ex, &loads, err, errlen))
        goto out;
    fprintf(out, "routing of one batch (%lld tokens, weights %s): loss %.4f\n",
            (long long)(t->batch * t->seq), w ? w : "initial", loss);
    loads_print(pf, loads, 1, out);
    rc = 0;
out:
    free(loads);
    free(tok);
    free(tgt);
    free(r.metric);
    data_close(&d);
    return rc;
}

int train_eval_logits(exec_state *ex, const train_opts *o, const char *out_path, char *err,
                      size_t errlen)
{
    const plan_file *pf = ex->pf;
    const plan_train *t = pf->train;
    roles r;
    data_file d = {0};
    int32_t *tok = NULL, *tgt = NULL;
    float *mine = NULL, *all = NULL;
    int rc = -1;
    char path[4096];
    if (find_roles(pf, &r))
        return fail(err, errlen, "out of memory");
    r.shard = comm_rank(ex->ctx.comm);
    r.nshards = comm_world(ex->ctx.comm);
    if (r.logits < 0 || pf->tensors[r.logits].dtype != PLAN_F32) {
        fail(err, errlen, "--eval-logits: the plan keeps no fp32 logits tensor (role logits); "
             "return the logits from the model in fp32");
        goto out;
    }
    uint64_t rows = (uint64_t)(t->batch * t->seq), bytes = rows * (uint64_t)t->vocab * 4;
    ckpt_meta m[16];
    int nm = 0;
    const char *w = o->resume_path ? o->resume_path : o->init_from;
    if (train_init_params(ex, err, errlen) ||
        (w && ckpt_load(ex, w, CKPT_WEIGHTS, m, 16, &nm, err, errlen)) ||
        train_data_path(pf, o->data_path, o->exe_dir, path, sizeof path, err, errlen) ||
        data_open(&d, path, t->data_format, t->val_fraction, err, errlen))
        goto out;
    tok = malloc(rows * 4);
    tgt = malloc(rows * 4);
    mine = malloc(bytes);
    all = malloc(bytes * (uint64_t)r.nshards);
    if (!tok || !tgt || !mine || !all) {
        fail(err, errlen, "out of memory");
        goto out;
    }
    /* the first validation batch, as evaluate() draws it: every rank runs the
     * forward (expert exchanges need all of them) on its block of rows */
    rng g = rng_seeded((uint64_t)t->seed, "eval");
    float loss;
    if (micro_step(ex, &r, &d, DATA_VAL, &g, tok, tgt, 0, &loss, NULL, err, errlen) ||
        exec_check(ex, "--eval-logits", PLAN_PHASE_FORWARD, PLAN_PHASE_FORWARD, err, errlen) ||
        exec_read(ex, (uint64_t)r.logits, 0, mine, bytes, err, errlen) ||
        comm_allgather_host(ex->ctx.comm, mine, all, (int64_t)bytes, COMM_GROUP_DP,
                            "gather of the logits (--eval-logits)", err, errlen))
        goto out;
    if (r.shard == 0) {
        /* raw little-endian fp32 [ranks x batch x seq, vocab], rows in rank order */
        FILE *f = fopen(out_path, "wb");
        if (!f || fwrite(all, 1, bytes * (uint64_t)r.nshards, f) != bytes * (uint64_t)r.nshards) {
            if (f)
                fclose(f);
            fail(err, errlen, "--eval-logits: cannot write %s", out_path);
            goto out;
        }
        if (fclose(f)) {
            fail(err, errlen, "--eval-logits: cannot write %s", out_path);
            goto out;
        }
    }
    rc = 0;
out:
    free(all);
    free(mine);
    free(tok);
    free(tgt);
    free(r.metric);
    data_close(&d);
    return rc;
}

int train_run(exec_state *ex, const train_opts *o, char *err, size_t errlen)
{
    return train_run_trace(ex, o, NULL, err, errlen);
}

int train_run_trace(exec_state *ex, const train_opts *o, const char *trace_dir, char *err,
                    size_t errlen)
{
    trace tr = {.log = NULL, .batches = NULL};
    const plan_file *pf = ex->pf;
    const plan_train *t = pf->train;
    roles r;
    data_file d = {0};
    int32_t *tok = NULL, *tgt = NULL;
    double *metrics = NULL;
    FILE *mf = NULL;
    int rc = -1;
    char path[4096];
    if (find_roles(pf, &r))
        return fail(err, errlen, "out of memory");
    r.shard = comm_rank(ex->ctx.comm);
    r.nshards = comm_world(ex->ctx.comm);
    if (train_data_path(pf, o->data_path, o->exe_dir, path, sizeof path, err, errlen) ||
        data_open(&d, path, t->data_format, t->val_fraction, err, errlen))
        goto out;
    tok = malloc((size_t)(t->batch * t->seq) * 4);
    tgt = malloc((size_t)(t->batch * t->seq) * 4);
    metrics = calloc((size_t)r.nmetric + 1, sizeof *metrics);
    if (!tok || !tgt || !metrics) {
        fail(err, errlen, "out of memory");
        goto out;
    }
    rng g = rng_seeded((uint64_t)t->seed, "data");
    int64_t start = 0;
    lscale ls = {t->precision == PLAN_F16 ? (double)t->loss_scale : 0.0, 0, 0, 0};
    if (o->resume_path) {
        ckpt_meta m[16];
        int nm = 0;
        if (ckpt_load(ex, o->resume_path, CKPT_FULL, m, 16, &nm, err, errlen))
            goto out;
        const char *fmt = ckpt_meta_get(m, nm, "format");
        const char *st = ckpt_meta_get(m, nm, "step");
        const char *rs = ckpt_meta_get(m, nm, "data_rng");
        char *e1 = NULL, *e2 = NULL;
        if (!fmt || strcmp(fmt, "moec-1") != 0 || !st || !rs) {
            fail(err, errlen, "%s: no moec training state (format/step/data_rng metadata); "
                 "use --init-from to load weights only", o->resume_path);
            goto out;
        }
        start = strtoll(st, &e1, 10);
        g.s = strtoull(rs, &e2, 16);
        if (*e1 || *e2 || start < 0 || lscale_load(&ls, m, nm)) {
            fail(err, errlen, "%s: bad step or data_rng metadata; the checkpoint is damaged",
                 o->resume_path);
            goto out;
        }
    } else if (o->init_from) {
        ckpt_meta m[16];
        int nm = 0;
        if (train_init_params(ex, err, errlen) ||
            ckpt_load(ex, o->init_from, CKPT_WEIGHTS, m, 16, &nm, err, errlen))
            goto out;
    } else if (train_init_params(ex, err, errlen)) {
        goto out;
    }
    int64_t total = o->steps >= 0 ? o->steps : t->steps;
    if (trace_dir && trace_open(&tr, trace_dir, ex, start, &g, err, errlen))
        goto out;
    if (o->metrics_path && !(mf = fopen(o->metrics_path, o->resume_path ? "a" : "w"))) {
        fail(err, errlen, "cannot write metrics file %s; check the directory or pass --metrics",
             o->metrics_path);
        goto out;
    }
    int can_eval = t->eval_every > 0 && t->eval_batches > 0 && data_has_split(&d, DATA_VAL, t->seq);
    if (o->out)
        fprintf(o->out, "run: data %s: %llu tokens (%llu train, %llu validation)\n", path,
                (unsigned long long)d.ntok,
                (unsigned long long)(d.split[DATA_TRAIN][1] - d.split[DATA_TRAIN][0]),
                (unsigned long long)(d.split[DATA_VAL][1] - d.split[DATA_VAL][0]));
    double t0 = now_s();
    int64_t step = start;
    while (step < total) {
        step++;
        double ts = now_s();
        float hyper[MOEK_HYPER_COUNT];
        hyper[MOEK_HYPER_LR] = (float)train_lr(t, step);
        hyper[MOEK_HYPER_BETA1] = t->beta1;
        hyper[MOEK_HYPER_BETA2] = t->beta2;
        hyper[MOEK_HYPER_EPS] = t->eps;
        /* bias corrections count the updates made: fp16 skips overflowing steps */
        hyper[MOEK_HYPER_BC1] = (float)(1.0 - pow(t->beta1, (double)(step - ls.skipped)));
        hyper[MOEK_HYPER_BC2] = (float)(1.0 - pow(t->beta2, (double)(step - ls.skipped)));
        hyper[MOEK_HYPER_MAX_NORM] = t->clip_grad;
        hyper[MOEK_HYPER_MOMENTUM] = t->momentum;
        hyper[MOEK_HYPER_STEP] = (float)step;   /* exact below 2^24 steps */
        hyper[MOEK_HYPER_LOSS_SCALE] = (float)ls.scale;
        /* the all-reduced gradient is then the mean over every rank's micro-batches;
         * fp16 scales only the seed, so the loss read back stays unscaled */
        float seed = (float)((ls.scale > 0 ? ls.scale : 1.0) / (double)(t->grad_accum * r.nshards));
        if ((r.hyper >= 0 && exec_write(ex, (uint64_t)r.hyper, 0, hyper, sizeof hyper, err, errlen)) ||
            (r.seed >= 0 && exec_write(ex, (uint64_t)r.seed, 0, &seed, 4, err, errlen)))
            goto out;
        double loss = 0;
        memset(metrics, 0, ((size_t)r.nmetric + 1) * sizeof *metrics);
        for (int64_t a = 0; a < t->grad_accum; a++) {
            float l;
            char what[48];   /* device errors surface here, once per micro-step */
            snprintf(what, sizeof what, "step %lld", (long long)step);
            if (micro_step(ex, &r, &d, DATA_TRAIN, &g, tok, tgt, 1, &l, metrics, err, errlen) ||
                exec_check(ex, what, PLAN_PHASE_FORWARD, PLAN_PHASE_BACKWARD, err, errlen) ||
                (tr.batches && trace_batch(&tr, tok, tgt, (size_t)(t->batch * t->seq), err, errlen)))
                goto out;
            loss += l;
        }
        if (r.nshards > 1) {
            /* every rank logs and checks the same global loss, so all agree to stop */
            metrics[r.nmetric] = loss;
            if (comm_allreduce_host(ex->ctx.comm, metrics, r.nmetric + 1, COMM_GROUP_DP,
                                    "loss and metrics", err, errlen))
                goto out;
            loss = metrics[r.nmetric] / (double)r.nshards;
            for (int m = 0; m < r.nmetric; m++)
                metrics[m] /= (double)r.nshards;
        }
        loss /= (double)t->grad_accum;
        if (!isfinite(loss)) {
            fail(err, errlen, "loss is %g at step %lld; stopped before the update (nothing "
                 "saved); lower the learning rate or check the data", loss, (long long)step);
            goto out;
        }
        if ((tr.log && step == start + 1 && trace_grads(&tr, ex, step, err, errlen)) ||
            exec_run(ex, PLAN_PHASE_OPTIMIZER, PLAN_PHASE_OPTIMIZER, err, errlen))
            goto out;
        double norm = NAN;
        if (r.norm >= 0) {
            float nsq;
            if (exec_read(ex, (uint64_t)r.norm, 0, &nsq, 4, err, errlen))
                goto out;
            norm = sqrt((double)nsq);
            if (ls.scale > 0 && !isfinite(norm)) {
                /* the kernels skipped the update (moek.h): halve S and go on */
                double was = ls.scale;
                ls.scale = ls.scale > 1.0 ? ls.scale / 2 : 1.0;
                ls.good = 0;
                ls.skipped++;
                ls.bad = was <= 1.0 ? ls.bad + 1 : 0;
                norm = NAN;   /* no update was made: no norm to report */
                if (o->out)
                    fprintf(o->out, "step %lld: gradient overflow, skipped; loss scale %.17g -> %.17g\n",
                            (long long)step, was, ls.scale);
                int64_t limit = t->loss_scale_window > 0 ? t->loss_scale_window : 1000;
                if (ls.bad >= limit) {
                    fail(err, errlen, "gradients overflow fp16 at loss scale 1 for %lld steps in a "
                         "row (step %lld); stopped (the last checkpoint is intact); lower the "
                         "learning rate or use precision = bf16", (long long)ls.bad, (long long)step);
                    goto out;
                }
            } else if (ls.scale > 0) {
                norm /= ls.scale;   /* the unscaled norm */
                ls.bad = 0;
                if (t->loss_scale_window > 0 && ++ls.good >= (int64_t)t->loss_scale_window) {
                    if (ls.scale < 1e38)   /* stays a finite float */
                        ls.scale *= 2;
                    ls.good = 0;
                }
            }
            if (ls.scale == 0 && !isfinite(norm)) {
                fail(err, errlen, "gradient norm is %g at step %lld; stopped (the last "
                     "checkpoint is intact); lower the learning rate or enable clip_grad",
                     norm, (long long)step);
                goto out;
            }
        }
        if (tr.log && trace_step(&tr, step, loss, hyper[MOEK_HYPER_LR], norm, err, errlen))
            goto out;
        double te = now_s(), ms = (te - ts) * 1e3;
        double tps = (double)(t->batch * t->seq * t->grad_accum * r.nshards) / (te - ts);
        char eta[32];
        fmt_eta((te - t0) / (double)(step - start) * (double)(total - step), eta, sizeof eta);
        float *loads = NULL;   /* this step's routing, read before evaluation reruns the model */
        if (loads_read(ex, &loads, err, errlen))
            goto out;
        if (o->out && (t->log_every <= 1 || step % t->log_every == 0 || step == total)) {
            fprintf(o->out, "step %lld/%lld | loss %.4f | lr %.2e | norm %.2f | %.1fk tok/s | "
                    "%.1f ms | eta %s", (long long)step, (long long)total, loss,
                    (double)hyper[0], norm, tps / 1e3, ms, eta);
            for (int m = 0; m < r.nmetric; m++)
                fprintf(o->out, " | %s %.4f", plan_str(pf, pf->tensors[r.metric[m]].name),
                        metrics[m] / (double)t->grad_accum);
            fprintf(o->out, "\n");
            loads_print(pf, loads, 0, o->out);
            fflush(o->out);
        }
        double val = NAN;
        if (can_eval && (step % t->eval_every == 0 || step == total)) {
            if (evaluate(ex, &r, &d, tok, tgt, &val, err, errlen)) {
                free(loads);
                goto out;
            }
            if (o->out)
                fprintf(o->out, "eval step %lld | val loss %.4f\n", (long long)step, val);
        }
        if (mf) {
            fprintf(mf, "{\"step\":%lld,\"loss\":%.9g,\"lr\":%.9g,\"norm\":%.9g,"
                    "\"tok_per_s\":%.1f,\"ms\":%.3f", (long long)step, loss, (double)hyper[0],
                    isfinite(norm) ? norm : -1.0, tps, ms);
            for (int m = 0; m < r.nmetric; m++) {
                fputc(',', mf);
                json_name(mf, plan_str(pf, pf->tensors[r.metric[m]].name));
                fprintf(mf, ":%.9g", metrics[m] / (double)t->grad_accum);
            }
            if (isfinite(val))
                fprintf(mf, ",\"val_loss\":%.9g", val);
            if (ls.scale > 0)   /* the scale the next step uses */
                fprintf(mf, ",\"loss_scale\":%.9g", ls.scale);
            loads_json(pf, loads, mf);
            fprintf(mf, "}\n");
            fflush(mf);
        }
        free(loads);
        int stop = o->stop && *o->stop;
        if (o->ckpt_path && !stop && step != total && t->checkpoint_every > 0 &&
            step % t->checkpoint_every == 0 && save(ex, o->ckpt_path, step, &g, &ls, err, errlen))
            goto out;
        if (stop) {
            if (o->ckpt_path && save(ex, o->ckpt_path, step, &g, &ls, err, errlen))
                goto out;
            if (o->out)
                fprintf(o->out, "run: interrupted after step %lld; saved %s (resume with "
                        "--resume %s)\n", (long long)step, o->ckpt_path ? o->ckpt_path : "nothing",
                        o->ckpt_path ? o->ckpt_path : "");
            rc = 0;
            goto out;
        }
    }
    if (o->ckpt_path && save(ex, o->ckpt_path, step, &g, &ls, err, errlen))
        goto out;
    if (o->out && o->ckpt_path)
        fprintf(o->out, "run: saved %s after step %lld\n", o->ckpt_path, (long long)step);
    rc = 0;
out:
    if (mf)
        fclose(mf);
    if (tr.log)
        fclose(tr.log);
    if (tr.batches)
        fclose(tr.batches);
    free(tok);
    free(tgt);
    free(metrics);
    free(r.metric);
    data_close(&d);
    return rc;
}

static int sample_next(const float *logits, int64_t V, double temp, int64_t top_k, rng *g)
{
    int64_t best = 0;
    for (int64_t v = 1; v < V; v++)
        if (logits[v] > logits[best])
            best = v;
    if (temp <= 0)
        return (int)best;
    /* threshold = k-th largest logit (top-k), found by counting */
    float thr = -INFINITY;
    if (top_k > 0 && top_k < V) {
        float lo = logits[best];
        for (;;) {   /* walk down distinct values until k are at or above */
            float next = -INFINITY;
            int64_t cnt = 0;
            for (int64_t v = 0; v < V; v++) {
                if (logits[v] >= lo)
                    cnt++;
                else if (logits[v] > next)
                    next = logits[v];
            }
            if (cnt >= top_k || next == -INFINITY)
                break;
            lo = next;
        }
        thr = lo;
    }
    double sum = 0, mx = logits[best];
    for (int64_t v = 0; v < V; v++)
        if (logits[v] >= thr)
            sum += exp(((double)logits[v] - mx) / temp);
    double u = rng_uniform(g) * sum, acc = 0;
    for (int64_t v = 0; v < V; v++)
        if (logits[v] >= thr) {
            acc += exp(((double)logits[v] - mx) / temp);
            if (u < acc)
                return (int)v;
        }
    return (int)best;
}

int train_sample(exec_state *ex, const sample_opts *o, FILE *out, char *err, size_t errlen)
{
    const plan_file *pf = ex->pf;
    const plan_train *t = pf->train;
    roles r;
    if (find_roles(pf, &r))
        return fail(err, errlen, "out of memory");
    int rc = -1;
    int32_t *tok = NULL, *tgt = NULL, *ctx = NULL;
    float *row = NULL;
    if (r.logits < 0) {
        fail(err, errlen, "the plan has no logits tensor (role logits), so it cannot sample; "
             "compile a model whose output is a language-model head");
        goto out;
    }
    if (t->data_format != 0 || t->vocab > 256) {
        fail(err, errlen, "sampling text needs a byte-level model (vocab <= 256, text data); "
             "this plan uses vocab %lld", (long long)t->vocab);
        goto out;
    }
    ckpt_meta m[16];
    int nm;
    if (!o->ckpt_path) {
        fail(err, errlen, "sampling needs weights; pass --checkpoint FILE (or --resume FILE)");
        goto out;
    }
    if (ckpt_load(ex, o->ckpt_path, CKPT_WEIGHTS, m, 16, &nm, err, errlen))
        goto out;
    int64_t B = t->batch, T = t->seq, V = t->vocab;
    int64_t plen = (int64_t)strlen(o->prompt ? o->prompt : "");
    int64_t cap = plen + o->tokens + 1;
    tok = calloc((size_t)(B * T), 4);
    tgt = calloc((size_t)(B * T), 4);
    ctx = malloc((size_t)cap * 4);
    row = malloc((size_t)V * 4);
    uint64_t esz = plan_dtype_size(pf->tensors[r.logits].dtype);   /* f32 or bf16 logits */
    if (!tok || !tgt || !ctx || !row) {
        fail(err, errlen, "out of memory");
        goto out;
    }
    int64_t n = 0;
    for (int64_t i = 0; i < plen; i++) {
        unsigned char c = (unsigned char)o->prompt[i];
        if (c >= V) {
            fail(err, errlen, "prompt byte %u is outside the model's vocab %lld", c, (long long)V);
            goto out;
        }
        ctx[n++] = c;
    }
    if (n == 0)
        ctx[n++] = '\n';   /* an empty prompt starts a new line */
    if (o->prompt)
        fputs(o->prompt, out);
    rng g = rng_seeded(o->seed, "sample");
    for (int64_t k = 0; k < o->tokens; k++) {
        int64_t len = n < T ? n : T;
        memset(tok, 0, (size_t)(B * T) * 4);
        memcpy(tok, ctx + n - len, (size_t)len * 4);
        if (exec_write(ex, (uint64_t)r.tokens, 0, tok, (uint64_t)(B * T) * 4, err, errlen) ||
            exec_write(ex, (uint64_t)r.targets, 0, tgt, (uint64_t)(B * T) * 4, err, errlen) ||
            exec_phase(ex, PLAN_PHASE_FORWARD, err, errlen) ||
            exec_read(ex, (uint64_t)r.logits, (uint64_t)((len - 1) * V) * esz, row,
                      (uint64_t)V * esz, err, errlen))
            goto out;
        if (esz == 2) {   /* bf16 or f16 logits: widen in place, last first (exact) */
            const uint16_t *b = (const uint16_t *)row;
            int f16 = pf->tensors[r.logits].dtype == PLAN_F16;
            for (int64_t v = V - 1; v >= 0; v--) {
                uint32_t u = (uint32_t)b[v] << 16;
                if (f16) {   /* IEEE half: rebias, subnormals scaled exactly */
                    uint32_t h = b[v], e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
                    float sub = (float)m * 5.9604644775390625e-8f;   /* m * 2^-24 */
                    memcpy(&u, &sub, 4);
                    u = ((h & 0x8000u) << 16) |
                        (e == 0x1fu ? 0x7f800000u | (m << 13)
                         : e ? ((e + 112u) << 23) | (m << 13) : u);
                }
                memcpy(&row[v], &u, 4);
            }
        }
        int next = sample_next(row, V, o->temperature, o->top_k, &g);
        ctx[n++] = next;
        fputc(next, out);
        fflush(out);
    }
    fputc('\n', out);
    rc = 0;
out:
    free(r.metric);
    free(tok);
    free(tgt);
    free(ctx);
    free(row);
    return rc;
}
