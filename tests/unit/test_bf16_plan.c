/* test_bf16_plan.c - precision = bf16 through the compiler and the plan
 * loader: bf16 params with fp32 masters and fp32 grads, the _bf16 kernels,
 * pool sizes against the fp32 plan of the same model, the plan's precision
 * and workspace, the loader's checks of masters, the elaborator's bf16
 * errors, and the runtime's host bf16 rounding. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "half_plan_common.h"
#include "diag.h"
#include "../../compiler/elaborate.h"
#include "../../compiler/explain.h"
#include "../../compiler/internal_ops.h"
#include "../../compiler/passes.h"
#include "../../runtime/checkpoint.h"
#include "../../runtime/plan_load.h"

static char root[1024], stdlib_dir[1100], tmpdir[64];

static void graph_checks(const ir_graph *bf, const ir_graph *fp)
{
    int trained = 0, bad_dtype = 0, bad_master = 0;
    for (int p = 0; p < bf->nparams; p++) {
        const ir_param *pp = &bf->params[p];
        const ir_value *v = &bf->values[pp->value];
        if (pp->tied_to >= 0)
            continue;
        bad_dtype += v->dtype != PLAN_BF16 || (pp->grad >= 0 && bf->values[pp->grad].dtype != PLAN_F32);
        if (pp->grad >= 0) {
            trained++;
            const ir_value *m = pp->master >= 0 ? &bf->values[pp->master] : NULL;
            bad_master += !m || m->dtype != PLAN_F32 || m->storage != PLAN_ST_OPTSTATE ||
                          ir_value_numel(m) != ir_value_numel(v) || !hp_ends_with(m->name, ".master");
        }
    }
    CHECK("bf16: params are bf16, grads fp32", trained > 10 && bad_dtype == 0, "%d of %d wrong",
          bad_dtype, bf->nparams);
    CHECK("bf16: every trained param has an fp32 OPTSTATE master", bad_master == 0,
          "%d params without a proper master", bad_master);
    int fpmaster = 0;
    for (int p = 0; p < fp->nparams; p++)
        fpmaster += fp->params[p].master >= 0;
    CHECK("bf16: fp32 plan has no masters", fpmaster == 0, "%d masters", fpmaster);

    CHECK("bf16: matmuls call the bf16 kernels",
          hp_count_sym(bf, "moek_matmul_fwd") == 0 && hp_count_sym(bf, "moek_matmul_fwd_bf16") ==
          hp_count_sym(fp, "moek_matmul_fwd") && hp_count_sym(bf, "moek_matmul_bwd_bf16") > 0,
          "fp32 %d bf16 %d", hp_count_sym(bf, "moek_matmul_fwd"), hp_count_sym(bf, "moek_matmul_fwd_bf16"));
    CHECK("bf16: routing stays fp32 (topk, balance loss), softmax reads bf16 logits",
          hp_count_sym(bf, "moek_topk_fwd") == 2 && hp_count_sym(bf, "moek_balance_loss_fwd") == 2 &&
          hp_count_sym(bf, "moek_softmax_fwd_bf16") == 2 && hp_count_sym(bf, "moek_softmax_fwd") == 0,
          "topk %d softmax_bf16 %d", hp_count_sym(bf, "moek_topk_fwd"), hp_count_sym(bf, "moek_softmax_fwd_bf16"));
    CHECK("bf16: one accumulate_bf16 and one adamw_bf16 per trained param",
          hp_count_sym(bf, "moek_accumulate_bf16") == trained && hp_count_sym(bf, "moek_adamw_bf16") == trained &&
          hp_count_sym(bf, "moek_adamw") == 0 && hp_count_sym(bf, "moek_accumulate") == 0,
          "accumulate_bf16 %d adamw_bf16 %d trained %d", hp_count_sym(bf, "moek_accumulate_bf16"),
          hp_count_sym(bf, "moek_adamw_bf16"), trained);
    CHECK("bf16: gradient sums of bf16 values use add_bf16",
          hp_count_sym(bf, "moek_add_fwd_bf16") > hp_count_sym(bf, "moek_add_fwd"), "add_bf16 %d add %d",
          hp_count_sym(bf, "moek_add_fwd_bf16"), hp_count_sym(bf, "moek_add_fwd"));
    int64_t pb = bf->pool_bytes[PLAN_ST_PARAM], pf = fp->pool_bytes[PLAN_ST_PARAM];
    CHECK("bf16: param pool is half the fp32 one (2 bytes/param, 64-byte aligned)",
          pb * 2 >= pf && pb * 2 <= pf + 2 * 64 * bf->nparams, "bf16 %" PRId64 " fp32 %" PRId64, pb, pf);
    CHECK("bf16: grad pool is the fp32 one (grads stay fp32)",
          bf->pool_bytes[PLAN_ST_GRAD] == fp->pool_bytes[PLAN_ST_GRAD], "%" PRId64 " vs %" PRId64,
          bf->pool_bytes[PLAN_ST_GRAD], fp->pool_bytes[PLAN_ST_GRAD]);
    int64_t ob = bf->pool_bytes[PLAN_ST_OPTSTATE], of = fp->pool_bytes[PLAN_ST_OPTSTATE];
    CHECK("bf16: optstate pool holds m, v and the master (1.5x the fp32 one)",
          ob * 2 >= of * 3 && ob * 2 <= of * 3 + 2 * 64 * bf->nparams, "bf16 %" PRId64 " fp32 %" PRId64,
          ob, of);
    CHECK("bf16: activations shrink", bf->pool_bytes[PLAN_ST_ACT] < fp->pool_bytes[PLAN_ST_ACT] * 3 / 4,
          "bf16 %" PRId64 " fp32 %" PRId64, bf->pool_bytes[PLAN_ST_ACT], fp->pool_bytes[PLAN_ST_ACT]);
}

/* Loads the plan file into an 8-aligned buffer. */
static unsigned char *slurp(const char *path, uint64_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)len + 8);
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) {
        free(b);
        b = NULL;
    }
    fclose(f);
    *n = (uint64_t)len;
    return b;
}

static void reseal(unsigned char *img, uint64_t n)
{
    plan_header *h = (plan_header *)img;
    h->checksum = plan_fnv1a(img + h->header_bytes, n - h->header_bytes, PLAN_FNV_OFFSET);
}

/* Applies mutation k to a copy of the plan image; expects the loader's error. */
static void loader_rejects(const unsigned char *img0, uint64_t n, int k, const char *want)
{
    unsigned char *img = malloc(n + 8);
    memcpy(img, img0, n);
    plan_header *h = (plan_header *)img;
    plan_train *t = (plan_train *)(img + h->header_bytes);
    plan_param *p = (plan_param *)(img + h->sections[PLAN_SEC_PARAMS].offset);
    switch (k) {
    case 0: p[0].master = -1; break;            /* a trained bf16 param without master */
    case 1: p[0].master = p[0].grad; break;     /* master in the grad pool */
    case 2: p[0].master = p[0].state0; break;   /* an fp32 plan: f32 param with a master */
    case 3: t->precision = 7; break;
    case 4: p[0].master = 1 << 30; break;
    default: break;
    }
    reseal(img, n);
    plan_file pf;
    char err[512] = "";
    int rc = plan_parse(img, n, &pf, err, sizeof err);
    char name[128];
    snprintf(name, sizeof name, "bf16 loader: mutation %d rejected (%s)", k, want);
    CHECK(name, rc != 0 && strstr(err, want) != NULL, "rc %d err '%s'", rc, err);
    free(img);
}

static void plan_checks(ir_graph *bf, ir_graph *fp)
{
    char pbf[128], pfp[128];
    snprintf(pbf, sizeof pbf, "%s/bf16.bin", tmpdir);
    snprintf(pfp, sizeof pfp, "%s/fp32.bin", tmpdir);
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = pass_emit(bf, pbf, &err) || pass_emit(fp, pfp, &err);
    CHECK("bf16: plans emit", rc == 0, "%s", err.msg);
    if (rc)
        return;
    plan_file a, b;
    char e1[512] = "", e2[512] = "";
    int la = plan_load(pbf, &a, e1, sizeof e1), lb = plan_load(pfp, &b, e2, sizeof e2);
    CHECK("bf16: plans load", la == 0 && lb == 0, "%s %s", e1, e2);
    if (la || lb)
        return;
    CHECK("bf16: plan records precision", a.train->precision == PLAN_BF16 && b.train->precision == PLAN_F32,
          "%u %u", a.train->precision, b.train->precision);
    uint64_t ws = explain_workspace_bytes(bf);
    CHECK("bf16: plan records the workspace of its largest bf16 op (fp32: 0)",
          a.train->workspace_bytes == ws && ws > (uint64_t)MOEK_BF16_WORKSPACE_BYTES(8 * 64 * 256) - 1 &&
          b.train->workspace_bytes == 0, "%" PRIu64 " vs %" PRIu64 ", fp32 %" PRIu64,
          a.train->workspace_bytes, ws, b.train->workspace_bytes);
    int masters = 0, named = 1;
    for (uint64_t i = 0; i < a.nparams; i++) {
        if (a.params[i].master < 0)
            continue;
        masters++;
        char want[600];
        snprintf(want, sizeof want, "%s.master", plan_str(&a, a.tensors[a.params[i].tensor].name));
        named &= strcmp(plan_str(&a, a.tensors[a.params[i].master].name), want) == 0;
    }
    CHECK("bf16: plan params name their masters", masters == (int)a.nparams && named, "%d of %llu",
          masters, (unsigned long long)a.nparams);
    int64_t lg = plan_find_role(&a, PLAN_ROLE_LOGITS);
    CHECK("bf16: logits are bf16", lg >= 0 && a.tensors[lg].dtype == PLAN_BF16, "logits %lld", (long long)lg);
    plan_close(&a);
    plan_close(&b);

    uint64_t n, nf;
    unsigned char *img = slurp(pbf, &n), *fimg = slurp(pfp, &nf);
    if (!img || !fimg) {
        CHECK("bf16: read plans back", 0, "cannot read %s", pbf);
        free(img);
        free(fimg);
        return;
    }
    loader_rejects(img, n, 0, "has no fp32 master copy");
    loader_rejects(img, n, 1, "has storage grad, expected optstate");
    loader_rejects(fimg, nf, 2, "only bf16 params have one");
    loader_rejects(img, n, 3, "neither f32 nor bf16");
    loader_rejects(img, n, 4, "master tensor");
    free(img);
    free(fimg);
}

/* Compiles text; expects failure with `want` in the diagnostics. */
static void elab_error(const char *name, const char *text, const char *want)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ir_graph *g = hp_compile(stdlib_dir, "bf16_test.moe", text, f);
    fclose(f);
    CHECK(name, !g && buf && strstr(buf, want), "compiled %d, diagnostics: %s", g != NULL, buf ? buf : "");
    if (g)
        ir_graph_free(g);
    free(buf);
}

static void elab_errors(void)
{
    const char *head = "import \"nn\"\nconfig { vocab = 256 d = 64 seq = 16 }\n";
    char text[2048];
    snprintf(text, sizeof text, "%smodel m(tokens: i32[B, seq], targets: i32[B, seq]) {\n"
             "  return cross_entropy(linear(embedding(tokens, vocab, d), vocab), targets)\n}\n"
             "train { batch = 2 precision = bf16 loss_scale = dynamic }\n", head);
    elab_error("bf16 errors: loss_scale is refused outside fp16", text,
               "`loss_scale` is only meaningful with precision = fp16");
    snprintf(text, sizeof text, "%sextern op pick(s: float[*N, E], k: int) -> (idx: i32[*N, k], g: float[*N, k]) {\n"
             "  forward = moek_topk_fwd(s, idx, g, N, E, k, 1)\n}\n"
             "model m(tokens: i32[B, seq], targets: i32[B, seq]) {\n"
             "  x = embedding(tokens, vocab, d)\n  i, g = pick(x, 2)\n"
             "  return cross_entropy(linear(x, vocab), targets)\n}\n"
             "train { batch = 2 precision = bf16 }\n", head);
    elab_error("bf16 errors: an op without a _bf16 kernel", text,
               "op `pick` gets bf16 tensors but kernels/moek.h has no `moek_topk_fwd_bf16`");
    snprintf(text, sizeof text, "%smodel m(tokens: i32[B, seq], targets: i32[B, seq]) {\n"
             "  x = embedding(tokens, vocab, d)\n  p = softmax(linear(x, 4, name = \"r\"))\n"
             "  y = p + linear(x, 4, name = \"s\")\n"
             "  return cross_entropy(linear(x, vocab), targets)\n}\n"
             "train { batch = 2 precision = bf16 }\n", head);
    elab_error("bf16 errors: float ports of one call must agree", text,
               "but an earlier float argument is f32[2, 16, 4]");
    snprintf(text, sizeof text, "%smodel m(tokens: i32[B, seq], targets: i32[B, seq]) {\n"
             "  x = embedding(tokens, vocab, d)\n  y = lookup(x, x)\n"
             "  return cross_entropy(linear(x, vocab), targets)\n}\n"
             "train { batch = 2 precision = bf16 }\n", head);
    elab_error("bf16 errors: a float port refuses i32 and the reverse", text,
               "`ids` must be i32, got bf16[2, 16, 64]");
}

static void rounding(void)
{
    union { float f; uint32_t u; } x;
    struct { uint32_t in; uint16_t want; } c[] = {
        {0x3f800000u, 0x3f80}, /* 1.0 */
        {0x3f808000u, 0x3f80}, /* 1 + 2^-8: a tie, to even (down) */
        {0x3f818000u, 0x3f82}, /* 1 + 3*2^-8: a tie, to even (up) */
        {0x3f808001u, 0x3f81}, /* just above the tie: up */
        {0xbf80ffffu, 0xbf81}, /* negative, rounds away */
        {0x7f7fffffu, 0x7f80}, /* FLT_MAX rounds to inf */
        {0x7f800000u, 0x7f80}, /* inf */
        {0x00000001u, 0x0000}, /* tiny subnormal to zero */
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        x.u = c[i].in;
        if (moek_bf16_from_f32(x.f) != c[i].want) {
            printf("# %08x -> %04x, want %04x\n", c[i].in, moek_bf16_from_f32(x.f), c[i].want);
            bad++;
        }
    }
    x.u = 0x7f800001u;   /* a NaN whose payload would round to inf */
    uint16_t nan = moek_bf16_from_f32(x.f);
    CHECK("bf16 host rounding: nearest even, overflow to inf, NaN stays NaN",
          bad == 0 && (nan & 0x7f80) == 0x7f80 && (nan & 0x7f) != 0, "%d wrong, NaN -> %04x", bad, nan);
}

int main(void)
{
    const char *r = getenv("ROOT");
    snprintf(root, sizeof root, "%s", r && *r ? r : ".");
    snprintf(stdlib_dir, sizeof stdlib_dir, "%s/stdlib", root);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/moec_bf16_XXXXXX");
    if (!mkdtemp(tmpdir)) {
        CHECK("bf16: temp dir", 0, "mkdtemp failed");
        CHECK_DONE();
    }
    char pbf[1200], pfp[1200];
    snprintf(pbf, sizeof pbf, "%s/examples/tiny_moe_bf16.moe", root);
    snprintf(pfp, sizeof pfp, "%s/examples/tiny_moe.moe", root);
    ir_graph *bf = hp_compile(stdlib_dir, pbf, NULL, NULL), *fp = hp_compile(stdlib_dir, pfp, NULL, NULL);
    CHECK("bf16: tiny_moe compiles in bf16 and fp32", bf && fp, "see the errors above (ROOT=%s)", root);
    if (bf && fp) {
        graph_checks(bf, fp);
        plan_checks(bf, fp);
    }
    if (bf)
        ir_graph_free(bf);
    if (fp)
        ir_graph_free(fp);
    elab_errors();
    rounding();
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", tmpdir);
    CHECK_DONE();
}
