/* test_compiler_emit.c - plan.bin written by pass_emit, read back with the
 * runtime/plan.h structs: header, checksum, every table against the graph,
 * every index in range, kernel dedup, user libraries, determinism, and the
 * write errors. */
#include <dirent.h>
#include <inttypes.h>
#include <stdlib.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "test_compiler_graphs.h"
#include "../../compiler/explain.h"

typedef struct plan_file {
    unsigned char *p;
    size_t n;
    const plan_header *h;
} plan_file;

static int load(const char *path, plan_file *f)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return -1;
    fseek(fp, 0, SEEK_END);
    f->n = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    f->p = malloc(f->n + 1);
    size_t got = fread(f->p, 1, f->n, fp);
    fclose(fp);
    f->h = (const plan_header *)f->p;
    return got == f->n ? 0 : -1;
}

#define SEC(f, id, type) ((const type *)((f)->p + (f)->h->sections[id].offset))

static const char *str(const plan_file *f, uint32_t off)
{
    return (const char *)f->p + f->h->sections[PLAN_SEC_STRINGS].offset + off;
}

/* the graph: fan-out, a tied param, and a custom op from a user library */
static ir_graph *build(tg_ids *t, int *probe)
{
    ir_graph *g = tg_fanout(t, true, true);
    g->source_hash = 0x1234abcdULL;
    g->data_path = "data/tiny.txt";
    ir_opdef d;
    memset(&d, 0, sizeof d);
    d.name = "probe";
    d.lib = "libmyops.so";
    d.ninputs = 1; d.noutputs = 1; d.ndims = 1;
    d.dim_names[0] = "n";
    d.fwd_symbol = "my_probe_fwd";
    const ir_ref f[] = {T_IN(0), T_OUT(0), T_DIM(0), {IR_REF_FLOAT, 0, 0, 2.5}, {IR_REF_INT, 0, 7, 0}};
    d.nfwd = 5; memcpy(d.fwd, f, sizeof f);
    const ir_opdef *pd = ir_def_add(g, &d);
    *probe = tg_value(g, "probe", PLAN_F32, PLAN_ST_ACT, 1, 0);
    g->values[*probe].role = PLAN_ROLE_METRIC;
    int in[] = {t->logits}, out[] = {*probe};
    int64_t dims[] = {TG_N * TG_V};
    tg_node(g, pd, in, out, dims, 0, 8);
    return g;
}

static int count_files(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        n += e->d_name[0] != '.';
    if (d)
        closedir(d);
    return n;
}

static void test_roundtrip(const char *dir)
{
    tg_ids t;
    int probe;
    ir_graph *g = build(&t, &probe);
    moec_error err;
    CHECK("emit: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    char path[512];
    snprintf(path, sizeof path, "%s/plan.bin", dir);
    CHECK("emit: writes", pass_emit(g, path, &err) == 0, "%s", err.msg);
    CHECK("emit: no temp file left", count_files(dir) == 1, "%d files", count_files(dir));
    struct stat st;
    mode_t mask = umask(0);
    umask(mask);
    CHECK("emit: file mode follows the umask", stat(path, &st) == 0 &&
          (st.st_mode & 0777) == (0666 & ~mask), "mode %o", (unsigned)(st.st_mode & 0777));
    plan_file f;
    if (load(path, &f) < 0) {
        CHECK("emit: read back", 0, "cannot read %s", path);
        ir_graph_free(g);
        return;
    }
    const plan_header *h = f.h;
    CHECK("emit: magic and version", memcmp(h->magic, "MOECPLAN", 8) == 0 &&
          h->format_version == PLAN_FORMAT_VERSION && h->header_bytes == sizeof(plan_header), "%u %u",
          h->format_version, h->header_bytes);
    CHECK("emit: file size", h->file_bytes == f.n && f.n % 8 == 0, "%" PRIu64 " vs %zu",
          h->file_bytes, f.n);
    uint64_t sum = plan_fnv1a(f.p + h->header_bytes, f.n - h->header_bytes, PLAN_FNV_OFFSET);
    CHECK("emit: checksum", sum == h->checksum, "%" PRIx64 " vs %" PRIx64, sum, h->checksum);
    CHECK("emit: source hash", h->source_hash == 0x1234abcdULL, "%" PRIx64, h->source_hash);
    int secs_ok = 1;
    for (int s = 0; s < PLAN_SEC_COUNT; s++)
        secs_ok &= h->sections[s].offset % 8 == 0 && h->sections[s].offset <= f.n &&
                   h->sections[s].offset >= sizeof(plan_header) + sizeof(plan_train);
    CHECK("emit: sections aligned, inside the file", secs_ok, "bad section table");
    const char *strs = str(&f, 0);
    uint64_t slen = h->sections[PLAN_SEC_STRINGS].count;
    CHECK("emit: string table starts empty and ends with NUL", slen > 1 && strs[0] == 0 &&
          strs[slen - 1] == 0, "len %" PRIu64, slen);
    CHECK("emit: names", strcmp(str(&f, h->compiler_version), "moec 0.1.0") == 0 &&
          strcmp(str(&f, h->model_name), "test") == 0, "%s / %s", str(&f, h->compiler_version),
          str(&f, h->model_name));

    const plan_train *tr = (const plan_train *)(f.p + sizeof(plan_header));
    explain_counts c;
    explain_count(g, &c);
    /* wte 20 + w1 16 + gnorm 4 (lm_head tied: counted once) */
    CHECK("emit: train counts", tr->param_count == 40 && tr->active_param_count == 40 &&
          tr->flops_per_token == 240 && tr->flops_per_token == c.flops_per_token &&
          tr->batch == TG_B && tr->seq == TG_T && strcmp(str(&f, tr->data_path), "data/tiny.txt") == 0,
          "%" PRIu64 " %" PRIu64 " %" PRIu64, tr->param_count, tr->active_param_count,
          tr->flops_per_token);

    const plan_pool *pools = SEC(&f, PLAN_SEC_POOLS, plan_pool);
    int pools_ok = h->sections[PLAN_SEC_POOLS].count == PLAN_ST_COUNT;
    for (int s = 0; pools_ok && s < PLAN_ST_COUNT; s++)
        pools_ok &= pools[s].storage == (uint32_t)s && pools[s].bytes == (uint64_t)g->pool_bytes[s];
    CHECK("emit: pools", pools_ok && strcmp(str(&f, pools[PLAN_ST_ACT].name), "act") == 0, "wrong contents");

    const plan_tensor *ts = SEC(&f, PLAN_SEC_TENSORS, plan_tensor);
    uint64_t nt = h->sections[PLAN_SEC_TENSORS].count;
    uint64_t planned = 0;
    for (int v = 0; v < g->nvalues; v++)
        planned += g->values[v].pool >= 0;
    int tens_ok = nt == planned;
    int found_wte = 0, found_head = 0;
    for (uint64_t i = 0; tens_ok && i < nt; i++) {
        tens_ok &= ts[i].pool < PLAN_ST_COUNT && ts[i].offset % PLAN_ALIGN == 0 &&
                   ts[i].offset + ts[i].bytes <= pools[ts[i].pool].bytes &&
                   ts[i].name < slen && ts[i].ndim <= PLAN_MAX_DIMS;
        if (!strcmp(str(&f, ts[i].name), "wte"))
            found_wte = ts[i].storage == PLAN_ST_PARAM && ts[i].shape[0] == TG_V &&
                        ts[i].shape[1] == TG_D && ts[i].bytes == 80;
        if (!strcmp(str(&f, ts[i].name), "lm_head"))
            found_head = ts[i].offset == g->values[t.wte].offset;
    }
    CHECK("emit: tensors", tens_ok && found_wte && found_head, "%" PRIu64 " vs %" PRIu64
          " wte %d head %d", nt, planned, found_wte, found_head);

    const plan_lib *libs = SEC(&f, PLAN_SEC_LIBS, plan_lib);
    CHECK("emit: libs", h->sections[PLAN_SEC_LIBS].count == 2 && libs[0].path == 0 &&
          strcmp(str(&f, libs[1].path), "libmyops.so") == 0, "%" PRIu64,
          h->sections[PLAN_SEC_LIBS].count);

    const plan_kernel *ks = SEC(&f, PLAN_SEC_KERNELS, plan_kernel);
    uint64_t nk = h->sections[PLAN_SEC_KERNELS].count;
    int uniq = 1, mm = 0, probe_lib = -1;
    for (uint64_t i = 0; i < nk; i++) {
        for (uint64_t j = i + 1; j < nk; j++)
            uniq &= !(ks[i].symbol == ks[j].symbol && ks[i].lib == ks[j].lib);
        mm += !strcmp(str(&f, ks[i].symbol), "moek_matmul_fwd");
        if (!strcmp(str(&f, ks[i].symbol), "my_probe_fwd"))
            probe_lib = (int)ks[i].lib;
    }
    /* embedding/matmul/rmsnorm/add/ce fwd, 4 bwd, fill, sumsq, adamw, accumulate, probe */
    CHECK("emit: kernels deduplicated", uniq && mm == 1 && nk == 14 && probe_lib == 1,
          "uniq %d matmul %d count %" PRIu64 " probe lib %d", uniq, mm, nk, probe_lib);

    const plan_op *ops = SEC(&f, PLAN_SEC_OPS, plan_op);
    const plan_arg *args = SEC(&f, PLAN_SEC_ARGS, plan_arg);
    uint64_t nops = h->sections[PLAN_SEC_OPS].count, nargs = h->sections[PLAN_SEC_ARGS].count;
    int ops_ok = nops == (uint64_t)g->nnodes, bad = -1;
    uint64_t next_arg = 0;
    for (uint64_t i = 0; ops_ok && i < nops; i++) {
        const plan_op *o = &ops[i];
        ops_ok &= o->kernel < nk && o->nargs == ks[o->kernel].nargs && o->first_arg == next_arg &&
                  o->first_arg + o->nargs <= nargs && o->phase == g->nodes[i].phase &&
                  o->what < slen && o->src_file < slen;
        for (uint32_t a = 0; ops_ok && a < o->nargs; a++) {
            const plan_arg *pa = &args[o->first_arg + a];
            ops_ok &= pa->kind == ks[o->kernel].arg_kinds[a];
            if (pa->kind == PLAN_ARG_TENSOR)
                ops_ok &= pa->v.tensor < nt;
        }
        next_arg += o->nargs;
        if (!ops_ok)
            bad = (int)i;
    }
    CHECK("emit: every op and arg index in range", ops_ok && next_arg == nargs, "op %d", bad);
    /* op 0: embedding at t.moe:2:5, args tokens, wte, h, N, V, D */
    const plan_op *o0 = &ops[0];
    CHECK("emit: op source location and args", !strcmp(str(&f, o0->src_file), "t.moe") &&
          o0->src_line == 2 && o0->src_col == 5 && !strcmp(str(&f, o0->what), "embedding") &&
          !strcmp(str(&f, ts[args[o0->first_arg + 1].v.tensor].name), "wte") &&
          args[o0->first_arg + 3].v.i64 == TG_N && args[o0->first_arg + 5].v.i64 == TG_D, "wrong contents");
    int rms = -1, prb = -1;
    for (uint64_t i = 0; i < nops; i++) {
        if (!strcmp(str(&f, ks[ops[i].kernel].symbol), "moek_rmsnorm_fwd"))
            rms = (int)i;
        if (!strcmp(str(&f, ks[ops[i].kernel].symbol), "my_probe_fwd"))
            prb = (int)i;
    }
    CHECK("emit: attr and literal args", rms >= 0 && prb >= 0 &&
          args[ops[rms].first_arg + 6].kind == PLAN_ARG_F32 &&
          args[ops[rms].first_arg + 6].v.f32 == 1e-5f &&
          args[ops[prb].first_arg + 3].v.f32 == 2.5f && args[ops[prb].first_arg + 4].v.i64 == 7,
          "rms %d probe %d", rms, prb);
    int bwd = 0;
    for (uint64_t i = 0; i < nops; i++)
        bwd += !strcmp(str(&f, ops[i].what), "rmsnorm (backward)") &&
               ops[i].phase == PLAN_PHASE_BACKWARD && ops[i].src_line == 3;
    CHECK("emit: backward op labelled", bwd == 1, "%d", bwd);

    const plan_param *ps = SEC(&f, PLAN_SEC_PARAMS, plan_param);
    uint64_t np = h->sections[PLAN_SEC_PARAMS].count;
    int params_ok = np == 3;   /* lm_head is tied to wte: no row of its own */
    for (uint64_t i = 0; params_ok && i < np; i++) {
        params_ok &= ps[i].tensor < nt && ps[i].grad >= 0 && (uint64_t)ps[i].grad < nt &&
                     ps[i].state0 >= 0 && ps[i].state1 >= 0 &&
                     ts[ps[i].grad].storage == PLAN_ST_GRAD &&
                     ts[ps[i].state1].storage == PLAN_ST_OPTSTATE;
        const char *nm = str(&f, ts[ps[i].tensor].name);
        if (!strcmp(nm, "gnorm"))
            params_ok &= ps[i].weight_decay == 0.0f && ps[i].init == PLAN_INIT_ONES;
        if (!strcmp(nm, "w1"))
            params_ok &= ps[i].weight_decay == 0.1f && ps[i].init == PLAN_INIT_NORMAL &&
                         ps[i].init_std == 0.02f;
    }
    CHECK("emit: params table", params_ok, "%" PRIu64 " rows", np);

    /* determinism: the same graph emits the same bytes */
    char path2[512];
    snprintf(path2, sizeof path2, "%s/plan2.bin", dir);
    plan_file f2 = {0};
    CHECK("emit: deterministic", pass_emit(g, path2, &err) == 0 && load(path2, &f2) == 0 &&
          f2.n == f.n && memcmp(f.p, f2.p, f.n) == 0, "differs");
    free(f2.p);
    unlink(path2);
    unlink(path);
    free(f.p);
    ir_graph_free(g);
}

static void test_errors(const char *dir)
{
    tg_ids t;
    int probe;
    moec_error err;
    ir_graph *g = build(&t, &probe);
    CHECK("emit errors: compiles", tg_compile(g, &err) == 0, "%s", err.msg);
    CHECK("emit error: missing folder", pass_emit(g, "/nonexistent-moec-dir/plan.bin", &err) == -1 &&
          strstr(err.msg, "cannot write plan '/nonexistent-moec-dir/plan.bin': No such file") != NULL,
          "%s", err.msg);
    printf("# message: %s (hint: %s)\n", err.msg, err.hint);
    /* the target is a folder: the rename fails and the temp file goes away */
    char sub[512];
    snprintf(sub, sizeof sub, "%s/adir", dir);
    mkdir(sub, 0755);
    CHECK("emit error: target is a folder", pass_emit(g, sub, &err) == -1 &&
          strstr(err.msg, "cannot write plan") != NULL && count_files(dir) == 1,
          "%s (%d files)", err.msg, count_files(dir));
    printf("# message: %s (hint: %s)\n", err.msg, err.hint);
    rmdir(sub);
    /* a write that fails half way (as on a full disk): a file size limit in
     * a child process makes write() fail with EFBIG */
    {
        char path[512];
        snprintf(path, sizeof path, "%s/big.bin", dir);
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            signal(SIGXFSZ, SIG_IGN);
            struct rlimit rl = {1000, 1000};
            setrlimit(RLIMIT_FSIZE, &rl);
            int rc = pass_emit(g, path, &err);
            printf("# message: %s (hint: %s)\n", err.msg, err.hint);
            fflush(stdout);
            _exit(rc == -1 && strstr(err.msg, "File too large") ? 0 : 1);
        }
        int status = -1;
        waitpid(pid, &status, 0);
        CHECK("emit error: write fails half way", WIFEXITED(status) && WEXITSTATUS(status) == 0 &&
              count_files(dir) == 0, "status %d, %d files", status, count_files(dir));
    }
    /* one symbol, two argument lists */
    ir_opdef d = *g->nodes[t.n_mm1].def;
    d.name = "matmul_i";
    d.fwd[5].kind = IR_REF_FLOAT;
    const ir_opdef *bad = ir_def_add(g, &d);
    ir_node n = g->nodes[t.n_mm1];
    n.def = bad;
    n.outputs[0] = tg_value(g, "a2", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    ir_node_add(g, &n);
    g->values[n.outputs[0]].pool = PLAN_ST_ACT;
    char path[512];
    snprintf(path, sizeof path, "%s/plan.bin", dir);
    CHECK("emit error: kernel signature conflict", pass_emit(g, path, &err) == -1 &&
          strstr(err.msg, "kernel 'moek_matmul_fwd' is called with two different argument lists") != NULL,
          "%s", err.msg);
    printf("# message: %s (hint: %s)\n", err.msg, err.hint);
    CHECK("emit error: nothing written", count_files(dir) == 0, "%d files", count_files(dir));
    ir_graph_free(g);
}

int main(void)
{
    char dir[] = "/tmp/moec-emit-XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK("emit: temp folder", 0, "mkdtemp failed");
        CHECK_DONE();
    }
    test_roundtrip(dir);
    test_errors(dir);
    rmdir(dir);
    CHECK_DONE();
}
