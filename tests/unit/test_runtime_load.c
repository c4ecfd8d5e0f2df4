/* test_runtime_load.c - the plan reader: every error path with its message,
 * byte flips and truncations that must never crash, and --inspect output. */
#include <unistd.h>

#include "check.h"
#include "test_runtime_plan.h"
#include "../../runtime/inspect.h"
#include "../../runtime/plan_load.h"

#define HDR ((plan_header *)img)
#define SEC(id) (HDR->sections[id])

/* Mutations of the builder (before the image is made). */
static void mut_pb(int k, pb *b)
{
    plan_tensor *t = b->tensors;
    switch (k) {
    case 10: b->tensors[4].dtype = 9; break;
    case 11: b->tensors[4].storage = 9; break;
    case 12: b->tensors[4].ndim = 7; break;
    case 13: b->tensors[4].shape[1] = 0; break;
    case 14: b->tensors[4].bytes += 4; break;
    case 57: b->tensors[4].expert_shard = 7; break;
    case 58: b->train.par_ranks = 2; b->train.par_zero = 3; break;   /* no ".gathered" tensor */
    case 15: b->tensors[4].pool = 9; break;
    case 16: b->tensors[4].offset += 4; break;
    case 17: b->tensors[4].offset += 1024; break;
    case 18: t[0].dtype = PLAN_F32; break;
    case 19: b->tensors[13].role = PLAN_ROLE_LOSS; break;
    case 20: b->tensors[10].role = 0; break;
    case 21: b->kernels[0].lib = 5; break;
    case 22: b->kernels[0].nargs = 30; break;
    case 23: b->kernels[0].arg_kinds[1] = 7; break;
    case 24: b->ops[0].kernel = 99; break;
    case 25: b->ops[0].phase = 3; break;
    case 26: b->ops[0].nargs = 5; break;
    case 27: b->ops[8].first_arg = b->nargs - 1; break;
    case 28: b->args[0].kind = PLAN_ARG_I64; break;
    case 29: b->args[1].v.tensor = 99; break;
    case 30: b->params[0].tensor = 99; break;
    case 31: b->params[0].tensor = 8; break;
    case 32: b->params[0].grad = 6; break;
    case 33: b->params[0].state0 = 13; b->tensors[13].storage = PLAN_ST_OPTSTATE; break;
    case 34: b->params[0].init = 9; break;
    case 35: b->train.batch = 0; break;
    case 36: b->train.optimizer = 5; break;
    case 37: b->train.val_fraction = 1.0f; break;
    case 38: b->train.lr = NAN; break;
    case 39: b->tensors[3].role = 0; break;
    case 40: b->kernels[0].symbol = 0; break;
    case 41: b->tensors[2].shape[0] = 3; b->tensors[2].bytes = 12; break;
    case 42: b->ops[0].what = 60000; break;
    case 43: b->train.schedule = 7; break;
    case 44: b->params[0].init_std = -1; break;
    case 45: b->params[0].grad = -5; b->params[0].state0 = -1; b->params[0].state1 = -1; break;
    case 46: b->train.data_format = 3; break;
    case 47: b->tensors[8].shape[1] = 255; b->tensors[8].bytes = 16 * 255 * 4; break;
    case 48: b->train.gpu_workspace_bytes = 1ull << 41; break;
    default: break;
    }
}

/* Mutations of the finished image; the checksum is resealed when asked. */
static void mut_img(int k, unsigned char *img, uint64_t *n)
{
    switch (k) {
    case 1: img[0] = 'X'; break;
    case 2: HDR->format_version = 3; break;
    case 3: HDR->format_version = 0; break;
    case 4: *n = 20; break;
    case 5: HDR->header_bytes = 100; break;
    case 6: HDR->file_bytes += 8; break;
    case 7: HDR->file_bytes -= 8; break;
    case 8: img[*n - 1] ^= 1; break;
    case 9: HDR->format_version = 1; break;
    case 50: SEC(PLAN_SEC_TENSORS).offset += 4; break;
    case 51: SEC(PLAN_SEC_TENSORS).count = 1000; break;
    case 52: SEC(PLAN_SEC_OPS).offset = 8; break;
    case 53: img[SEC(PLAN_SEC_STRINGS).offset + SEC(PLAN_SEC_STRINGS).count - 1] = 'x'; break;
    case 54: SEC(PLAN_SEC_ARGS).count = UINT64_MAX / 4; break;
    case 55: HDR->model_name = 70000; break;
    case 56: {   /* a newline inside the tensor name "tokens" */
        unsigned char *str = img + SEC(PLAN_SEC_STRINGS).offset;
        unsigned char *at = memmem(str, SEC(PLAN_SEC_STRINGS).count, "tokens", 7);
        if (at)
            at[2] = '\n';
        break;
    }
    default: break;
    }
}

static const struct { int k; int reseal; const char *want; } cases[] = {
    {1, 0, "^not a moec plan \\(no MOECPLAN magic\\); give run a plan.bin"},
    {2, 0, "compiled by a newer moec \\(plan format 3, this run reads 2\\); recompile with this version"},
    {9, 0, "compiled by an older moec \\(plan format 1, this run reads 2\\); recompile with this version"},
    {3, 0, "unknown plan format version 0"},
    {4, 0, "truncated: 20 bytes, the header needs"},
    {5, 0, "corrupt: header size 100"},
    {6, 0, "truncated: header says"},
    {7, 0, "trailing bytes"},
    {8, 0, "^corrupt: checksum mismatch; recompile the model with moec$"},
    {10, 1, "tensor 4 'bigram.weight': unknown dtype 9"},
    {11, 1, "unknown storage class 9"},
    {12, 1, "7 dimensions \\(at most 6\\)"},
    {13, 1, "dimension 1 is 0 \\(must be > 0\\)"},
    {14, 1, "262148 bytes, but 65536 elements of f32 need 262144"},
    {15, 1, "pool 9 out of range"},
    {16, 1, "is not 64-byte aligned"},
    {17, 1, "lies outside pool 'param'"},
    {18, 1, "role tokens must be i32"},
    {19, 1, "more than one tensor has role loss"},
    {20, 1, "no tensor has the required role loss"},
    {21, 1, "kernel 0 'moek_embedding_fwd' names library 5 of 1"},
    {22, 1, "30 arguments \\(at most 24\\)"},
    {23, 1, "argument 1 has unknown kind 7"},
    {24, 1, "op 0 \\(embedding\\) names kernel 99"},
    {25, 1, "unknown phase 3"},
    {26, 1, "passes 5 arguments to moek_embedding_fwd, which takes 6"},
    {27, 1, "outside the .*-entry argument table"},
    {28, 1, "argument 0 is a i64, kernel moek_embedding_fwd expects a tensor"},
    {29, 1, "argument 1 names tensor 99 of 15"},
    {30, 1, "param 0 names tensor 99"},
    {31, 1, "is a act tensor, not a param or buffer"},
    {32, 1, "grad tensor 'bigram.weight.adam_m' has storage optstate, expected grad"},
    {33, 1, "state0 tensor 'grad_norm_sq' has 1 elements, the param 65536"},
    {34, 1, "unknown init 9"},
    {35, 1, "train.batch = 0 \\(must be >= 1\\)"},
    {36, 1, "unknown optimizer 5"},
    {37, 1, "val_fraction 1 outside"},
    {38, 1, "hyper-parameter is not finite"},
    {39, 1, "backward ops but no loss_seed"},
    {40, 1, "empty symbol name"},
    {41, 1, "role hyper must be f32 with at least [0-9]+ elements"},
    {42, 1, "op 0 names string offset 60000"},
    {43, 1, "unknown schedule 7"},
    {44, 1, "bad init_std"},
    {45, 1, "negative index other than -1"},
    {46, 1, "unknown data format 3"},
    {48, 1, "corrupt: train.workspace_bytes [0-9]+ / gpu_workspace_bytes 2199023255552 implausibly large"},
    {47, 1, "role logits must be f32 with batch\\*seq rows of vocab = 256"},
    {50, 1, "section tensors at offset .* is not 8-byte aligned"},
    {51, 1, "section tensors \\(1000 records of 80 bytes"},
    {52, 1, "section ops offset 8 outside"},
    {53, 1, "string table must start and end with a NUL"},
    {54, 1, "section args .* runs past the end"},
    {55, 1, "header.model_name 0 names string offset 70000"},
    {56, 1, "corrupt: tensor 0 names a string with control characters"},
    {57, 1, "tensor 4 'bigram.weight': unknown expert_shard marker 7"},
    {58, 1, "param 0 'bigram.weight': ZeRO stage 3 needs an activation tensor 'bigram.weight.gathered'"},
};

#include <regex.h>
static int matches(const char *s, const char *re)
{
    regex_t r;
    if (regcomp(&r, re, REG_EXTENDED | REG_NOSUB))
        return 0;
    int ok = regexec(&r, s, 0, NULL, 0) == 0;
    regfree(&r);
    return ok;
}

int main(void)
{
    pb b;
    pb_init(&b);
    pb_bigram(&b, 1);
    uint64_t n;
    unsigned char *img = pb_finish(&b, &n);
    plan_file pf;
    char err[1024] = "";
    CHECK("load.valid", plan_parse(img, n, &pf, err, sizeof err) == 0, "%s", err);
    CHECK("load.roles", plan_find_role(&pf, PLAN_ROLE_LOGITS) == 8 &&
          plan_find_role(&pf, PLAN_ROLE_NORM_SQ) == 13 && pf.nops == 10 && pf.nparams == 1,
          "roles/counts wrong");

    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        pb m;
        pb_init(&m);
        pb_bigram(&m, 1);
        mut_pb(cases[c].k, &m);
        uint64_t mn;
        unsigned char *mi = pb_finish(&m, &mn);
        mut_img(cases[c].k, mi, &mn);
        if (cases[c].reseal)
            pb_reseal(mi, mn);
        char name[64];
        snprintf(name, sizeof name, "load.error.%d", cases[c].k);
        err[0] = '\0';
        int rc = plan_parse(mi, mn, &pf, err, sizeof err);
        CHECK(name, rc != 0 && matches(err, cases[c].want) && !strchr(err, '\n'),
              "rc %d, message '%s', wanted /%s/", rc, err, cases[c].want);
        free(mi);
    }

    /* every flip: never a crash; after the header the checksum catches it;
     * magic, version, sizes and checksum reject it.  The rest of the header
     * (hash, string offsets, section table) is outside the checksum by the
     * format's design, so a flip there may survive if it stays consistent:
     * it must then be safe to use. */
    unsigned char *cp = aligned_alloc(8, (n + 7) / 8 * 8);
    FILE *devnull = fopen("/dev/null", "w");
    int bad_body = 0, bad_fixed = 0, hdr_ok = 0;
    for (uint64_t i = 0; i < n; i++) {
        memcpy(cp, img, n);
        cp[i] ^= 0x10;
        if (plan_parse(cp, n, &pf, err, sizeof err) == 0) {
            if (i >= sizeof(plan_header))
                bad_body++;
            else if (i < offsetof(plan_header, source_hash))
                bad_fixed++;
            else
                hdr_ok++;
            inspect_plan(&pf, devnull);
        }
    }
    CHECK("load.flip.body", bad_body == 0, "%d body flips accepted", bad_body);
    CHECK("load.flip.header", bad_fixed == 0, "%d flips of magic/version/sizes/checksum accepted",
          bad_fixed);
    CHECK("load.flip.header_rest", hdr_ok <= 16, "%d flips of the unchecked header accepted", hdr_ok);

    /* flips with a fixed checksum reach the structural checks: whatever
     * passes must be safe to print in full */
    int accepted = 0;
    for (uint64_t i = sizeof(plan_header); i < n; i++) {
        for (int bit = 0; bit < 8; bit += 3) {
            memcpy(cp, img, n);
            cp[i] ^= (unsigned char)(1u << bit);
            pb_reseal(cp, n);
            if (plan_parse(cp, n, &pf, err, sizeof err) == 0) {
                accepted++;
                inspect_plan(&pf, devnull);
            }
        }
    }
    CHECK("load.flip.resealed", accepted < (int)(n * 3), "accepted %d of %llu", accepted,
          (unsigned long long)(n * 3));

    int trunc_ok = 0;
    for (uint64_t len = 0; len < n; len++) {
        memcpy(cp, img, len);
        if (plan_parse(cp, len, &pf, err, sizeof err) == 0)
            trunc_ok++;
    }
    CHECK("load.truncate", trunc_ok == 0, "%d truncations accepted", trunc_ok);
    free(cp);

    /* files */
    char dir[] = "/tmp/moec_rt_loadXXXXXX", path[256];
    CHECK("load.tmpdir", mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(path, sizeof path, "%s/none.bin", dir);
    CHECK("load.file.missing", plan_load(path, &pf, err, sizeof err) != 0 &&
          matches(err, "^cannot open: No such file"), "%s", err);
    CHECK("load.file.dir", plan_load(dir, &pf, err, sizeof err) != 0 &&
          matches(err, "not a regular file"), "%s", err);
    snprintf(path, sizeof path, "%s/empty.bin", dir);
    fclose(fopen(path, "w"));
    CHECK("load.file.empty", plan_load(path, &pf, err, sizeof err) != 0 &&
          matches(err, "not a moec plan \\(0 bytes\\)"), "%s", err);
    unlink(path);
    snprintf(path, sizeof path, "%s/plan.bin", dir);
    pb_write(&b, path);
    CHECK("load.file.ok", plan_load(path, &pf, err, sizeof err) == 0 && pf.ntensors == 15, "%s",
          err);

    /* --inspect */
    char *text = NULL;
    size_t tn = 0;
    FILE *mem = open_memstream(&text, &tn);
    inspect_plan(&pf, mem);
    fclose(mem);
    CHECK("inspect.header", strstr(text, "plan: model testmodel, format 2, moec test") != NULL,
          "%s", text);
    CHECK("inspect.train", strstr(text, "train: batch 2, seq 8, grad_accum 1, steps 10, seed 42")
          != NULL, "%s", text);
    CHECK("inspect.tensor", strstr(text, "  4 bigram.weight f32 [256, 256] param pool 0 +0 "
                                          "(262144 bytes)\n") != NULL, "%s", text);
    CHECK("inspect.op", strstr(text, "  0 forward   moek_embedding_fwd(tokens, bigram.weight, "
                                     "logits, 16, 256, 256)  # embedding at test.moe:4:3\n") != NULL,
          "%s", text);
    CHECK("inspect.kernel", strstr(text, "moek_adamw(ctx, tensor, tensor, tensor, tensor, i64, "
                                         "tensor, tensor, f32) lib 0") != NULL, "%s", text);
    CHECK("inspect.param", strstr(text, "  bigram.weight [256, 256] init normal(std 0.02) "
                                        "weight_decay 0 grad bigram.weight.grad state "
                                        "bigram.weight.adam_m, bigram.weight.adam_v\n") != NULL,
          "%s", text);
    free(text);
    plan_close(&pf);
    unlink(path);
    rmdir(dir);
    fclose(devnull);
    free(img);
    CHECK_DONE();
}
