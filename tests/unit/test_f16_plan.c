/* test_f16_plan.c - precision = fp16 through the compiler and the plan
 * loader: f16 params with fp32 masters and fp32 grads, only _f16 kernels,
 * the half helper that maps dtypes to kernel families, the loss scale in
 * plan_train (defaults, dynamic(initial), a fixed number, the window) and
 * the loader's checks of it. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "half_plan_common.h"
#include "diag.h"
#include "../../compiler/elaborate.h"
#include "../../compiler/internal_ops.h"
#include "../../compiler/passes.h"
#include "../../runtime/plan_load.h"

static char root[1024], stdlib_dir[1100], tmpdir[64];

static const char *model =
    "import \"nn\"\nconfig { vocab = 256 d = 32 seq = 16 }\n"
    "model m(tokens: i32[B, seq], targets: i32[B, seq]) {\n"
    "  return cross_entropy(linear(rmsnorm(embedding(tokens, vocab, d)), vocab), targets)\n}\n";

static ir_graph *compile_train(const char *train)
{
    char text[2048];
    snprintf(text, sizeof text, "%strain { batch = 2 %s }\n", model, train);
    return hp_compile(stdlib_dir, "f16_test.moe", text, NULL);
}

static void test_helpers(void)
{
    CHECK("f16 plan: half suffixes and names",
          strcmp(iop_half_suffix(PLAN_BF16), "_bf16") == 0 && strcmp(iop_half_suffix(PLAN_F16), "_f16") == 0 &&
              !iop_half_suffix(PLAN_F32) && !iop_half_suffix(PLAN_I32) &&
              strcmp(iop_half_name(PLAN_F16), "fp16") == 0,
          "wrong");
    CHECK("f16 plan: internal-op variants by dtype",
          iop_for_dtype(IOP_ADD, PLAN_F16) == IOP_ADD_F16 && iop_for_dtype(IOP_ADAMW, PLAN_F16) == IOP_ADAMW_F16 &&
              iop_for_dtype(IOP_SGD, PLAN_BF16) == IOP_SGD_BF16 && iop_for_dtype(IOP_ADD, PLAN_F32) == IOP_ADD &&
              iop_for_dtype(IOP_COPY, PLAN_F16) == IOP_COPY,
          "wrong");
}

static void test_graph(void)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/examples/tiny_dense.moe", root);
    ir_graph *fp = hp_compile(stdlib_dir, path, NULL, NULL);
    ir_graph *h = compile_train("precision = fp16");
    ir_graph *b = compile_train("precision = bf16");
    CHECK("f16 plan: compiles", fp && h && b, "see the errors above (ROOT=%s)", root);
    if (!h || !b || !fp)
        goto out;
    int trained = 0, bad = 0;
    for (int p = 0; p < h->nparams; p++) {
        const ir_param *pp = &h->params[p];
        if (pp->tied_to >= 0)
            continue;
        bad += h->values[pp->value].dtype != PLAN_F16;
        if (pp->grad >= 0) {
            trained++;
            bad += h->values[pp->grad].dtype != PLAN_F32 || pp->master < 0 ||
                   h->values[pp->master].dtype != PLAN_F32;
        }
    }
    CHECK("f16 plan: params f16, grads and masters fp32", trained >= 3 && bad == 0, "%d wrong of %d", bad,
          trained);
    CHECK("f16 plan: only _f16 kernels for float tensors, none _bf16",
          hp_count_suffix(h, "_bf16") == 0 && hp_count_sym(h, "moek_matmul_fwd_f16") == 1 &&
              hp_count_sym(h, "moek_adamw_f16") == trained && hp_count_sym(h, "moek_accumulate_f16") == trained &&
              hp_count_sym(h, "moek_matmul_fwd") == 0 && hp_count_sym(h, "moek_adamw") == 0,
          "bf16 %d matmul_f16 %d adamw_f16 %d", hp_count_suffix(h, "_bf16"), hp_count_sym(h, "moek_matmul_fwd_f16"),
          hp_count_sym(h, "moek_adamw_f16"));
    CHECK("f16 plan: the same pools as the bf16 plan",
          memcmp(h->pool_bytes, b->pool_bytes, sizeof h->pool_bytes) == 0, "differ");
    CHECK("f16 plan: default dynamic loss scale 65536, window 1000; fp32/bf16: none",
          h->train.precision == PLAN_F16 && h->train.loss_scale == 65536.0f && h->train.loss_scale_window == 1000 &&
              b->train.loss_scale == 0.0f && b->train.loss_scale_window == 0 && fp->train.loss_scale == 0.0f,
          "%g/%u bf16 %g", (double)h->train.loss_scale, h->train.loss_scale_window, (double)b->train.loss_scale);
out:
    if (fp) ir_graph_free(fp);
    if (h) ir_graph_free(h);
    if (b) ir_graph_free(b);
}

static void test_keys(void)
{
    static const struct { const char *train; float scale; uint32_t window; } cases[] = {
        {"precision = fp16 loss_scale = dynamic(initial = 1099511627776)", 1099511627776.0f, 1000},
        {"precision = fp16 loss_scale = dynamic loss_scale_window = 7", 65536.0f, 7},
        {"precision = fp16 loss_scale = 128", 128.0f, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ir_graph *g = compile_train(cases[i].train);
        char name[200];
        snprintf(name, sizeof name, "f16 plan: %s -> S %g, window %u", cases[i].train, (double)cases[i].scale,
                 cases[i].window);
        CHECK(name, g && g->train.loss_scale == cases[i].scale && g->train.loss_scale_window == cases[i].window,
              "got %g/%u", g ? (double)g->train.loss_scale : -1.0, g ? g->train.loss_scale_window : 0);
        if (g)
            ir_graph_free(g);
    }
}

static unsigned char *emit_image(ir_graph *g, uint64_t *n)
{
    char path[128];
    snprintf(path, sizeof path, "%s/f16.bin", tmpdir);
    moec_error err;
    memset(&err, 0, sizeof err);
    if (pass_emit(g, path, &err))
        return NULL;
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

/* mutation k of plan_train; expects the loader's error */
static void loader_rejects(const unsigned char *img0, uint64_t n, int k, const char *want)
{
    unsigned char *img = malloc(n + 8);
    memcpy(img, img0, n);
    plan_header *hd = (plan_header *)img;
    plan_train *t = (plan_train *)(img + hd->header_bytes);
    switch (k) {
    case 0: t->loss_scale = 0.5f; break;                          /* fp16 with S < 1 */
    case 1: t->precision = PLAN_BF16; break;                      /* bf16 with a loss scale */
    case 2: t->loss_scale = INFINITY; break;
    default: break;
    }
    hd->checksum = plan_fnv1a(img + hd->header_bytes, n - hd->header_bytes, PLAN_FNV_OFFSET);
    plan_file pf;
    char err[512] = "";
    int rc = plan_parse(img, n, &pf, err, sizeof err);
    char name[160];
    snprintf(name, sizeof name, "f16 loader: mutation %d rejected (%s)", k, want);
    CHECK(name, rc != 0 && strstr(err, want) != NULL, "rc %d err '%s'", rc, err);
    if (rc == 0)
        plan_close(&pf);
    free(img);
}

static void test_loader(void)
{
    ir_graph *g = compile_train("precision = fp16 loss_scale_window = 9");
    uint64_t n = 0;
    unsigned char *img = g ? emit_image(g, &n) : NULL;
    CHECK("f16 loader: the plan emits", img != NULL, "emit failed");
    if (img) {
        plan_file pf;
        char err[512] = "";
        int rc = plan_parse(img, n, &pf, err, sizeof err);
        CHECK("f16 loader: loads with precision f16, S 65536, window 9",
              rc == 0 && pf.train->precision == PLAN_F16 && pf.train->loss_scale == 65536.0f &&
                  pf.train->loss_scale_window == 9,
              "rc %d %s", rc, err);
        int masters = 0;
        for (uint64_t i = 0; rc == 0 && i < pf.nparams; i++)
            masters += pf.params[i].master >= 0;
        CHECK("f16 loader: every param has its master", rc == 0 && masters == (int)pf.nparams && masters > 0,
              "%d", masters);
        if (rc == 0)
            plan_close(&pf);
        loader_rejects(img, n, 0, "train.loss_scale 0.5 does not fit precision");
        loader_rejects(img, n, 1, "does not fit precision 1");
        loader_rejects(img, n, 2, "train.loss_scale inf does not fit");
    }
    free(img);
    if (g)
        ir_graph_free(g);
}

int main(void)
{
    const char *r = getenv("ROOT");
    snprintf(root, sizeof root, "%s", r && *r ? r : ".");
    snprintf(stdlib_dir, sizeof stdlib_dir, "%s/stdlib", root);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/moec_f16_XXXXXX");
    if (!mkdtemp(tmpdir)) {
        CHECK("f16 plan: temp dir", 0, "mkdtemp failed");
        CHECK_DONE();
    }
    test_helpers();
    test_graph();
    test_keys();
    test_loader();
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", tmpdir);
    CHECK_DONE();
}
