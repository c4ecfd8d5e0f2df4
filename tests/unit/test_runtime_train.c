/* test_runtime_train.c - schedule, RNG, data files, checkpoints (roundtrip,
 * strict loading, corrupt files, exact resume) and sampling, on a byte-level
 * bigram model built by hand and a test kernel library.
 * `test_runtime_train --fixture DIR` writes plan.bin, libmoek_cpu.so and
 * data.txt into DIR for the shell tests of ./run. */
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "test_runtime_plan.h"
#include "../../runtime/checkpoint.h"
#include "../../runtime/data.h"
#include "../../runtime/rng.h"
#include "../../runtime/train.h"

static int has(const char *s, const char *sub) { return strstr(s, sub) != NULL; }

static void write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(p, 1, n, f);
        fclose(f);
    }
}

static char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long k = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = calloc(1, (size_t)k + 1);
    *n = fread(b, 1, (size_t)k, f);
    fclose(f);
    return b;
}

/* "abc" repeated: a bigram model learns it exactly */
static void write_abc(const char *path, int n)
{
    char *t = malloc((size_t)n);
    for (int i = 0; i < n; i++)
        t[i] = "abc"[i % 3];
    write_file(path, t, (size_t)n);
    free(t);
}

static void test_schedule(void)
{
    plan_train t;
    memset(&t, 0, sizeof t);
    t.lr = 0.1f; t.min_lr = 0.01f; t.warmup = 2; t.steps = 10; t.schedule = PLAN_SCHED_COSINE;
    double lr = t.lr, mn = t.min_lr;
    CHECK("sched.warmup1", check_close(train_lr(&t, 1), lr / 2, 1e-12, 0), "%g", train_lr(&t, 1));
    CHECK("sched.warmup2", check_close(train_lr(&t, 2), lr, 1e-12, 0), "%g", train_lr(&t, 2));
    CHECK("sched.cosine_start", check_close(train_lr(&t, 3), lr, 1e-12, 0), "%g", train_lr(&t, 3));
    /* step 6: p = 3/8, min + (lr-min)/2 (1 + cos(3pi/8)) */
    CHECK("sched.cosine_mid", check_close(train_lr(&t, 6), mn + 0.5 * (lr - mn) * 1.3826834323650898,
          1e-9, 0), "%.9g", train_lr(&t, 6));
    CHECK("sched.cosine_end", check_close(train_lr(&t, 10), mn + 0.5 * (lr - mn) * (1 - 0.9238795325112867),
          1e-9, 0), "%.9g", train_lr(&t, 10));
    CHECK("sched.cosine_past", check_close(train_lr(&t, 50), mn, 1e-9, 0), "%g", train_lr(&t, 50));
    t.schedule = PLAN_SCHED_LINEAR;
    CHECK("sched.linear_mid", check_close(train_lr(&t, 6), lr + (mn - lr) * 0.375, 1e-9, 0), "%g",
          train_lr(&t, 6));
    t.schedule = PLAN_SCHED_CONSTANT;
    CHECK("sched.constant", train_lr(&t, 9) == lr && train_lr(&t, 1) == lr / 2, "%g", train_lr(&t, 9));
    t.warmup = 0;
    CHECK("sched.no_warmup", train_lr(&t, 1) == lr, "%g", train_lr(&t, 1));
}

static void test_rng(void)
{
    rng a = rng_seeded(7, "x"), b = rng_seeded(7, "x"), c = rng_seeded(7, "y");
    uint64_t va = rng_next(&a), vb = rng_next(&b), vc = rng_next(&c);
    CHECK("rng.deterministic", va == vb && va != vc, "%llx %llx %llx", (unsigned long long)va,
          (unsigned long long)vb, (unsigned long long)vc);
    double s = 0, s2 = 0;
    int n = 200000, below_ok = 1;
    for (int i = 0; i < n; i++) {
        double z = rng_normal(&a);
        s += z;
        s2 += z * z;
        if (rng_below(&a, 10) >= 10)
            below_ok = 0;
    }
    CHECK("rng.normal", fabs(s / n) < 0.01 && fabs(s2 / n - 1) < 0.02, "mean %g var %g", s / n, s2 / n);
    CHECK("rng.below", below_ok, "out of range");
}

static void test_data(const char *dir)
{
    char p[512], err[1024];
    data_file d;
    snprintf(p, sizeof p, "%s/text.txt", dir);
    write_abc(p, 1000);
    CHECK("data.bytes", data_open(&d, p, DATA_BYTES, 0.1, err, sizeof err) == 0 && d.ntok == 1000 &&
          d.split[0][1] == 900 && d.split[1][0] == 900 && data_token(&d, 4) == 'b', "%s", err);
    int32_t tok[16], tgt[16], tok2[16];
    rng r = rng_seeded(1, "data"), r2 = rng_seeded(1, "data");
    data_batch(&d, DATA_TRAIN, &r, 2, 8, 256, tok, tgt, err, sizeof err);
    data_batch(&d, DATA_TRAIN, &r2, 2, 8, 256, tok2, tgt, err, sizeof err);
    int shift_ok = 1;
    for (int i = 0; i < 16; i++)
        if ((i % 8 != 7 && tgt[i] != tok[i + 1]) || "abc"[(strchr("abc", tok[i]) - "abc" + 1) % 3] != tgt[i])
            shift_ok = 0;
    CHECK("data.batch", shift_ok && memcmp(tok, tok2, sizeof tok) == 0, "targets not shifted tokens");
    CHECK("data.vocab", data_batch(&d, DATA_TRAIN, &r, 2, 8, 98, tok, tgt, err, sizeof err) != 0 &&
          has(err, "is >= the model's vocab 98"), "%s", err);
    CHECK("data.split_small", data_batch(&d, DATA_VAL, &r, 2, 200, 256, tok, tgt, err, sizeof err) != 0 &&
          has(err, "the validation split has 100 tokens, fewer than seq + 1 = 201"), "%s", err);
    data_close(&d);

    /* llm.c shards */
    int32_t h[256];
    memset(h, 0, sizeof h);
    h[0] = 20240520; h[1] = 1; h[2] = 5;
    uint16_t t16[5] = {1, 2, 300, 4, 50000};
    unsigned char buf[1024 + 40];
    memcpy(buf, h, 1024);
    memcpy(buf + 1024, t16, 10);
    snprintf(p, sizeof p, "%s/s16.bin", dir);
    write_file(p, buf, 1034);
    CHECK("data.llmc16", data_open(&d, p, DATA_LLMC_U16, 0, err, sizeof err) == 0 && d.ntok == 5 &&
          data_token(&d, 2) == 300 && data_token(&d, 4) == 50000, "%s", err);
    data_close(&d);
    CHECK("data.llmc_width", data_open(&d, p, DATA_LLMC_U32, 0, err, sizeof err) != 0 &&
          has(err, "s16.bin: bad llm.c magic 20240520 (expected 20240801); the shard has the other "
              "token width"), "%s", err);
    write_file(p, buf, 1033);
    CHECK("data.llmc_size", data_open(&d, p, DATA_LLMC_U16, 0, err, sizeof err) != 0 &&
          has(err, "header says 5 tokens but the file holds 9 bytes"), "%s", err);
    h[1] = 3;
    memcpy(buf, h, 1024);
    write_file(p, buf, 1034);
    CHECK("data.llmc_version", data_open(&d, p, DATA_LLMC_U16, 0, err, sizeof err) != 0 &&
          has(err, "llm.c shard version 3 (expected 1"), "%s", err);
    h[0] = 1234;
    memcpy(buf, h, 1024);
    write_file(p, buf, 1034);
    CHECK("data.llmc_magic", data_open(&d, p, DATA_LLMC_U16, 0, err, sizeof err) != 0 &&
          has(err, "bad llm.c magic 1234 (expected 20240520); is this an llm.c token shard?"), "%s", err);
    write_file(p, buf, 100);
    CHECK("data.llmc_short", data_open(&d, p, DATA_LLMC_U16, 0, err, sizeof err) != 0 &&
          has(err, "too short for an llm.c shard (100 bytes"), "%s", err);
    h[0] = 20240801; h[1] = 7; h[2] = 2;
    uint32_t t32[2] = {70000, 3};
    memcpy(buf, h, 1024);
    memcpy(buf + 1024, t32, 8);
    write_file(p, buf, 1032);
    CHECK("data.llmc32", data_open(&d, p, DATA_LLMC_U32, 0, err, sizeof err) == 0 && d.ntok == 2 &&
          data_token(&d, 0) == 70000, "%s", err);
    data_close(&d);
    snprintf(p, sizeof p, "%s/nope.txt", dir);
    CHECK("data.missing", data_open(&d, p, DATA_BYTES, 0, err, sizeof err) != 0 &&
          has(err, "nope.txt: cannot open data file: No such file"), "%s", err);
    snprintf(p, sizeof p, "%s/empty.txt", dir);
    write_file(p, "", 0);
    CHECK("data.empty", data_open(&d, p, DATA_BYTES, 0, err, sizeof err) != 0 &&
          has(err, "empty.txt: data file is empty"), "%s", err);
}

typedef struct env { char dir[256], plan[300], data[300]; pb b; plan_file pf; exec_state ex; } env;

static int env_open(env *e, int grad_accum, char *err, size_t n)
{
    pb_init(&e->b);
    pb_bigram(&e->b, grad_accum);
    e->b.train.eval_every = 5;
    if (pb_write(&e->b, e->plan) || plan_load(e->plan, &e->pf, err, n))
        return -1;
    exec_opts o = {"cpu", e->plan, e->dir, NULL, 0, 0, NULL};
    if (exec_open(&e->ex, &e->pf, &o, err, n)) {
        plan_close(&e->pf);
        return -1;
    }
    return 0;
}

static void env_close(env *e)
{
    exec_close(&e->ex);
    plan_close(&e->pf);
}

static int train(env *e, int64_t steps, const char *metrics, const char *ckpt, const char *resume,
                 char *err, size_t n)
{
    if (env_open(e, 2, err, n))
        return -1;
    train_opts o = {steps, e->data, e->dir, metrics, ckpt, resume, NULL, NULL, NULL};
    int rc = train_run(&e->ex, &o, err, n);
    env_close(e);
    return rc;
}

/* one "loss" value per JSONL line, as text */
static int losses(const char *path, char out[][32], int max)
{
    size_t n;
    char *s = slurp(path, &n);
    int k = 0;
    for (char *p = s; p && (p = strstr(p, "\"loss\":")) && k < max; p++)
        sscanf(p + 7, "%31[^,]", out[k++]);
    free(s);
    return k;
}

/* a safetensors file from a JSON header and a data blob */
static void write_st(const char *path, const char *json, const void *data, size_t n)
{
    size_t hl = strlen(json);
    unsigned char *b = malloc(8 + hl + n);
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, json, hl);
    memcpy(b + 8 + hl, data, n);
    write_file(path, b, 8 + hl + n);
    free(b);
}

static void test_checkpoints(env *e)
{
    char err[2048], m1[300], m2[300], c1[300], c2[300], c3[300];
    snprintf(e->data, sizeof e->data, "%s/abc.txt", e->dir);
    write_abc(e->data, 3000);
    snprintf(m1, sizeof m1, "%s/m1.jsonl", e->dir);
    snprintf(m2, sizeof m2, "%s/m2.jsonl", e->dir);
    snprintf(c1, sizeof c1, "%s/c1.safetensors", e->dir);
    snprintf(c2, sizeof c2, "%s/c2.safetensors", e->dir);
    snprintf(c3, sizeof c3, "%s/c3.safetensors", e->dir);

    int rc = train(e, 20, m1, c1, NULL, err, sizeof err);
    CHECK("train.run", rc == 0, "%s", err);
    char l1[32][32], l2[32][32];
    int n1 = losses(m1, l1, 32);
    CHECK("train.metrics_lines", n1 == 20, "%d lines", n1);
    CHECK("train.learns", n1 == 20 && atof(l1[19]) < 0.5 * atof(l1[0]) && atof(l1[0]) > 5.0,
          "loss %s -> %s", l1[0], n1 ? l1[n1 - 1] : "?");
    size_t n;
    char *mt = slurp(m1, &n);
    CHECK("train.metrics_fields", mt && has(mt, "{\"step\":1,\"loss\":") && has(mt, ",\"lr\":0.100000001,\"norm\":") &&
          has(mt, "\"val_loss\":") && has(mt, "\"tok_per_s\":"), "%.300s", mt ? mt : "");
    /* the metric is logged by name: half of the loss */
    char *hl_at = mt ? strstr(mt, "\"half_loss\":") : NULL;
    CHECK("train.metric", hl_at && check_close(atof(hl_at + 12), atof(l1[0]) / 2, 1e-6, 1e-6),
          "%.200s", hl_at ? hl_at : "no half_loss");
    free(mt);

    /* 10 steps, stop, resume for 10 more: the same losses and checkpoint */
    rc = train(e, 10, m2, c2, NULL, err, sizeof err);
    CHECK("train.first_half", rc == 0, "%s", err);
    rc = train(e, 20, m2, c2, c2, err, sizeof err);
    CHECK("train.resume", rc == 0, "%s", err);
    int n2 = losses(m2, l2, 32), same = n1 == n2;
    for (int i = 0; same && i < n1; i++)
        same = strcmp(l1[i], l2[i]) == 0;
    CHECK("train.resume_bit_identical", same, "n %d/%d, step 11: %s vs %s", n1, n2,
          n1 > 10 ? l1[10] : "?", n2 > 10 ? l2[10] : "?");
    size_t s1, s2;
    char *b1 = slurp(c1, &s1), *b2 = slurp(c2, &s2);
    CHECK("train.resume_same_checkpoint", b1 && b2 && s1 == s2 && memcmp(b1, b2, s1) == 0,
          "sizes %zu %zu", s1, s2);
    CHECK("ckpt.format", b1 && s1 > 8 && has(b1 + 8, "\"__metadata__\":{\"format\":\"moec-1\","
          "\"step\":\"20\",\"data_rng\":\"") && has(b1 + 8, "\"bigram.weight\":{\"dtype\":\"F32\","
          "\"shape\":[256,256],\"data_offsets\":[0,262144]}") &&
          has(b1 + 8, "\"bigram.weight.adam_v\"") && !has(b1 + 8, "grad\""), "%.400s", b1 ? b1 + 8 : "");
    uint64_t hl = 0;
    for (int i = 7; b1 && i >= 0; i--)
        hl = hl << 8 | (unsigned char)b1[i];
    CHECK("ckpt.aligned", hl % 8 == 0 && s1 == 8 + hl + 3 * 262144, "header %llu file %zu",
          (unsigned long long)hl, s1);
    free(b2);

    /* sampling: the bigram learned a->b->c->a */
    if (env_open(e, 2, err, sizeof err) == 0) {
        char *out = NULL;
        size_t on = 0;
        FILE *f = open_memstream(&out, &on);
        sample_opts so = {c1, "ab", 7, 0.0, 0, 1};
        rc = train_sample(&e->ex, &so, f, err, sizeof err);
        fclose(f);
        CHECK("sample.greedy", rc == 0 && out && strcmp(out, "abcabcabc\n") == 0, "rc %d '%s' %s",
              rc, out ? out : "", err);
        free(out);
        out = NULL;
        f = open_memstream(&out, &on);
        sample_opts so2 = {c1, "c", 30, 0.8, 1, 5};   /* top-1 sampling == greedy */
        rc = train_sample(&e->ex, &so2, f, err, sizeof err);
        fclose(f);
        CHECK("sample.top_k", rc == 0 && out && strncmp(out, "cabcabcabcabcabcabcabcabcabcabc\n", 32) == 0,
              "'%s' %s", out ? out : "", err);
        free(out);
        char *o1 = NULL, *o2 = NULL;
        size_t n1s, n2s;
        sample_opts so4 = {c1, "a", 40, 1.0, 0, 9};
        f = open_memstream(&o1, &n1s);
        train_sample(&e->ex, &so4, f, err, sizeof err);
        fclose(f);
        f = open_memstream(&o2, &n2s);
        train_sample(&e->ex, &so4, f, err, sizeof err);
        fclose(f);
        CHECK("sample.seeded", n1s == 42 && n1s == n2s && memcmp(o1, o2, n1s) == 0, "%zu %zu", n1s, n2s);
        free(o1);
        free(o2);
        sample_opts so3 = {NULL, "ab", 3, 0, 0, 1};
        CHECK("sample.no_ckpt", train_sample(&e->ex, &so3, stdout, err, sizeof err) != 0 &&
              has(err, "sampling needs weights; pass --checkpoint"), "%s", err);

        /* strict loading */
        char bad[300];
        snprintf(bad, sizeof bad, "%s/bad.safetensors", e->dir);
        ckpt_meta meta[8];
        int nm;
        static float zeros[65536 * 3];
        struct { const char *json; size_t n; int mode; const char *want; } cases[] = {
            {"{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],\"data_offsets\":[0,262144]}}",
             262144, CKPT_FULL, "tensor 'bigram.weight.adam_m' is missing; use a checkpoint of this model "
             "(or --init-from for weights only)"},
            {"{\"__metadata__\":{},\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],\"data_offsets\":[0,262144]},"
             "\"extra\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
             262144, CKPT_WEIGHTS, "tensor 'extra' is not in this plan"},
            {"{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,255],\"data_offsets\":[0,261120]}}",
             262144, CKPT_WEIGHTS, "tensor 'bigram.weight' has shape [256,255], the plan wants [256,256]"},
            {"{\"bigram.weight\":{\"dtype\":\"BF16\",\"shape\":[256,256],\"data_offsets\":[0,131072]}}",
             262144, CKPT_WEIGHTS, "tensor 'bigram.weight' is BF16, the plan wants F32"},
            {"{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],\"data_offsets\":[0,262144]}}",
             1000, CKPT_WEIGHTS, "tensor 'bigram.weight' data [0, 262144) does not fit the 1000-byte data section"},
            {"{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],\"data_offsets\":[0,262144]},"
             "\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],\"data_offsets\":[0,262144]}}",
             262144, CKPT_WEIGHTS, "tensor 'bigram.weight' appears twice"},
            {"{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],\"data_offsets\":[0,262144]",
             262144, CKPT_WEIGHTS, "corrupt safetensors header: expected '}'"},
            {"{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],\"data_offsets\":[0,99999999999999999999]}}",
             262144, CKPT_WEIGHTS, "corrupt safetensors header: integer too large"},
            {"{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
             262144, CKPT_WEIGHTS, "corrupt safetensors header: array too long"},
            {"{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],\"data_offsets\":[0,262144],\"x\":1}}",
             262144, CKPT_WEIGHTS, "unknown key in a tensor entry"},
            {"{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],\"data_offsets\":[0,262144]}} x",
             262144, CKPT_WEIGHTS, "trailing bytes after the JSON object"},
            {"{\"bigram\\q\":{}}", 0, CKPT_WEIGHTS, "bad escape"},
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            write_st(bad, cases[i].json, zeros, cases[i].n);
            char name[64];
            snprintf(name, sizeof name, "ckpt.strict.%zu", i);
            rc = ckpt_load(&e->ex, bad, cases[i].mode, meta, 8, &nm, err, sizeof err);
            CHECK(name, rc != 0 && has(err, cases[i].want) && has(err, "bad.safetensors: "),
                  "rc %d: %s", rc, err);
        }
        CHECK("ckpt.weights_only", ckpt_load(&e->ex, c1, CKPT_WEIGHTS, meta, 8, &nm, err, sizeof err) == 0 &&
              nm == 5 && strcmp(ckpt_meta_get(meta, nm, "step"), "20") == 0, "%s", err);
        write_file(bad, "\x10\0\0\0", 4);
        CHECK("ckpt.tiny", ckpt_load(&e->ex, bad, CKPT_FULL, meta, 8, &nm, err, sizeof err) != 0 &&
              has(err, "truncated checkpoint (4 bytes)"), "%s", err);
        write_file(bad, "\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10);
        CHECK("ckpt.huge_header", ckpt_load(&e->ex, bad, CKPT_FULL, meta, 8, &nm, err, sizeof err) != 0 &&
              has(err, "truncated or not a safetensors file"), "%s", err);
        /* every truncation of a real checkpoint is an error, never a crash */
        int trunc_ok = 0;
        for (size_t len = 0; len < s1; len += (len < 400 ? 1 : 4099)) {
            write_file(bad, b1, len);
            if (ckpt_load(&e->ex, bad, CKPT_FULL, meta, 8, &nm, err, sizeof err) == 0)
                trunc_ok++;
        }
        CHECK("ckpt.truncations", trunc_ok == 0, "%d truncations loaded", trunc_ok);
        /* a non-finite model is never saved */
        float nan = NAN;
        exec_write(&e->ex, 4, 400, &nan, 4, err, sizeof err);
        rc = ckpt_save(&e->ex, c3, NULL, 0, err, sizeof err);
        CHECK("ckpt.nonfinite", rc != 0 && has(err, "refusing to save a non-finite model: "
              "bigram.weight[100] is nan") && access(c3, F_OK) != 0, "%s", err);
        env_close(e);
    }
    free(b1);

    /* resume errors */
    char bad[300];
    snprintf(bad, sizeof bad, "%s/nometa.safetensors", e->dir);
    size_t cn;
    char *cb = slurp(c1, &cn);
    char *meta_at = cb ? strstr(cb + 8, "\"format\":\"moec-1\"") : NULL;
    if (meta_at) {
        memcpy(meta_at, "\"fxrmat\"", 8);
        write_file(bad, cb, cn);
        rc = train(e, 25, NULL, NULL, bad, err, sizeof err);
        CHECK("train.resume_no_state", rc != 0 && has(err, "no moec training state") &&
              has(err, "--init-from"), "%s", err);
    }
    free(cb);
    /* --init-from: weights only; NaN weights give a non-finite loss, which
     * stops before the update */
    {
        char nanck[300];
        snprintf(nanck, sizeof nanck, "%s/nan.safetensors", e->dir);
        float *w = calloc(65536, 4);
        w[0] = NAN;
        write_st(nanck, "{\"bigram.weight\":{\"dtype\":\"F32\",\"shape\":[256,256],"
                 "\"data_offsets\":[0,262144]}}", w, 262144);
        free(w);
        snprintf(e->data, sizeof e->data, "%s/abc.txt", e->dir);
        env_open(e, 1, err, sizeof err);
        train_opts o = {3, e->data, e->dir, NULL, NULL, NULL, c1, NULL, NULL};
        rc = train_run(&e->ex, &o, err, sizeof err);
        CHECK("train.init_from", rc == 0, "%s", err);
        o.init_from = nanck;
        o.ckpt_path = c3;
        /* 'a' is token 97: row 0 holds the NaN, so use data that starts there */
        char zdata[300];
        snprintf(zdata, sizeof zdata, "%s/zeros.bin", e->dir);
        static const char z[100];
        write_file(zdata, z, sizeof z);
        o.data_path = zdata;
        rc = train_run(&e->ex, &o, err, sizeof err);
        CHECK("train.nan_loss", rc != 0 && has(err, "loss is nan at step 1; stopped before the "
              "update (nothing saved)") && access(c3, F_OK) != 0, "%s", err);
        o.init_from = NULL;
        o.data_path = e->data;
        /* the stopped step left NaN gradients behind (the optimizer phase
         * resets them), so the next update sees a NaN gradient norm */
        rc = train_run(&e->ex, &o, err, sizeof err);
        CHECK("train.nan_norm", rc != 0 && has(err, "gradient norm is nan at step 1; stopped"),
              "%s", err);
        env_close(e);
        env_open(e, 1, err, sizeof err);
        o.metrics_path = "/nonexistent/dir/m.jsonl";
        rc = train_run(&e->ex, &o, err, sizeof err);
        CHECK("train.metrics_unwritable", rc != 0 && has(err, "cannot write metrics file "
              "/nonexistent/dir/m.jsonl"), "%s", err);
        o.metrics_path = NULL;
        o.ckpt_path = "/nonexistent/dir/c.safetensors";
        rc = train_run(&e->ex, &o, err, sizeof err);
        CHECK("train.ckpt_unwritable", rc != 0 && has(err, "cannot write checkpoint "
              "/nonexistent/dir/c.safetensors.tmp: No such file"), "%s", err);
        env_close(e);
    }
    /* data missing */
    snprintf(e->data, sizeof e->data, "%s/missing.txt", e->dir);
    rc = train(e, 2, NULL, NULL, NULL, err, sizeof err);
    CHECK("train.data_missing", rc != 0 && has(err, "missing.txt: cannot open data file"), "%s", err);
}

static int fixture(const char *dir)
{
    pb b;
    char p[512];
    pb_init(&b);
    pb_bigram(&b, 2);
    b.train.steps = 30;
    b.train.eval_every = 10;
    b.train.checkpoint_every = 10;
    snprintf(p, sizeof p, "%s/plan.bin", dir);
    if (pb_write(&b, p))
        return 1;
    snprintf(p, sizeof p, "%s/data.txt", dir);
    write_abc(p, 3000);
    return pb_build_lib(dir, "libmoek_cpu.so", NULL) ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--fixture") == 0)
        return fixture(argv[2]);
    unsetenv("MOEC_KERNELS");
    test_schedule();
    test_rng();
    env e;
    memset(&e, 0, sizeof e);
    snprintf(e.dir, sizeof e.dir, "/tmp/moec_rt_trainXXXXXX");
    if (!mkdtemp(e.dir)) {
        CHECK("train.tmpdir", 0, "mkdtemp");
        CHECK_DONE();
    }
    snprintf(e.plan, sizeof e.plan, "%s/plan.bin", e.dir);
    test_data(e.dir);
    if (pb_build_lib(e.dir, "libmoek_cpu.so", NULL))
        SKIP("train.all", "no C compiler for the test kernel library");
    else
        test_checkpoints(&e);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", e.dir);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", e.dir);
    CHECK_DONE();
}
