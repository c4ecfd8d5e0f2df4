/* exec.c - the executor.  Everything that can fail (finding libraries and
 * symbols, allocating pools, preparing call frames) happens in exec_open;
 * exec_phase is then only ffi_call over a flat array. */
#include "exec.h"

#include "comm.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

void exec_describe_op(const plan_file *pf, uint64_t op, char *buf, size_t n)
{
    const plan_op *o = &pf->ops[op];
    const char *file = plan_str(pf, o->src_file);
    snprintf(buf, n, "op %llu (%s, %s:%u:%u)", (unsigned long long)op, plan_str(pf, o->what),
             *file ? file : "<no source>", o->src_line, o->src_col);
}

/* Try dir/name; on success remember the directory. */
static void *try_open(const char *dir, const char *name, char *found_dir, char *dlerr, size_t n)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
        return NULL;
    /* NODELETE: dlclose must not unmap a library whose thread pools (OpenMP,
     * OpenBLAS) may still be running; that crashed ./run at exit on 16 cores */
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!h) {
        const char *e = dlerror();
        /* a library that exists but fails to load is worth reporting */
        if (e && !strstr(e, "No such file"))
            snprintf(dlerr, n, "%s", e);
        return NULL;
    }
    if (!realpath(dir, found_dir)) {
        size_t l = strnlen(dir, PATH_MAX - 1);
        memcpy(found_dir, dir, l);
        found_dir[l] = '\0';
    }
    return h;
}

static void *open_device_lib(const exec_opts *o, const char *name, char *found_dir, char *dlerr,
                             size_t n, char *searched, size_t sn)
{
    const char *env = getenv("MOEC_KERNELS");
    char dirs[4][PATH_MAX];
    int nd = 0;
    if (env && *env)
        snprintf(dirs[nd++], PATH_MAX, "%s", env);
    if (o->exe_dir && *o->exe_dir) {
        snprintf(dirs[nd++], PATH_MAX, "%s/build", o->exe_dir);
        snprintf(dirs[nd++], PATH_MAX, "%s", o->exe_dir);
        snprintf(dirs[nd++], PATH_MAX, "%s/../lib/moec", o->exe_dir);
    }
    searched[0] = '\0';
    for (int i = 0; i < nd; i++) {
        void *h = try_open(dirs[i], name, found_dir, dlerr, n);
        if (h)
            return h;
        size_t l = strlen(searched);
        snprintf(searched + l, sn - l, "%s%s", l ? ", " : "", dirs[i]);
    }
    return NULL;
}

/* Whether the CUDA driver library exists: without it there is no GPU, and
 * the cheap answer spares the default (auto) device choice from loading the
 * CUDA kernel library with cuBLAS, whose relocations alone make ~150 MiB
 * resident on a machine that then runs on the CPU anyway. */
static int driver_present(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (!h)
        return 0;
    dlclose(h);
    return 1;
}

static int load_device(exec_state *ex, const exec_opts *o, char *err, size_t errlen)
{
    char dlerr[512] = "", searched[4 * PATH_MAX + 16];
    const char *want = o->device;
    if (!want && !driver_present())
        want = "cpu";   /* no GPU driver: skip loading cuBLAS (~150 MiB resident) to learn that */
    if (!want || strcmp(want, "cuda") == 0) {
        void *h = open_device_lib(o, "libmoek_cuda.so", ex->kernel_dir, dlerr, sizeof dlerr,
                                  searched, sizeof searched);
        int (*count)(void) = h ? (int (*)(void))dlsym(h, "moek_device_count") : NULL;
        if (h && count && count() > 0) {
            ex->devlib = h;
            snprintf(ex->device, sizeof ex->device, "cuda");
        } else {
            if (h)
                dlclose(h);
            if (want)
                return fail(err, errlen, "cannot use device cuda: %s; build it with nvcc (make "
                            "cuda) on a machine with a GPU, or use --device cpu",
                            h ? "no usable GPU (moek_device_count() == 0)"
                              : *dlerr ? dlerr : "libmoek_cuda.so not found");
        }
    } else if (strcmp(want, "cpu") != 0) {
        return fail(err, errlen, "unknown device '%s'; use --device cpu or --device cuda", want);
    }
    if (!ex->devlib) {
        dlerr[0] = '\0';
        ex->devlib = open_device_lib(o, "libmoek_cpu.so", ex->kernel_dir, dlerr, sizeof dlerr,
                                     searched, sizeof searched);
        if (!ex->devlib)
            return fail(err, errlen, "cannot load libmoek_cpu.so (%s; searched %s); run make, "
                        "or set MOEC_KERNELS to the directory that holds it",
                        *dlerr ? dlerr : "not found", *searched ? searched : "nowhere");
        snprintf(ex->device, sizeof ex->device, "cpu");
    }
    struct { const char *name; void **slot; } svc[] = {
        {"moek_device_count", (void **)&ex->dev.count},
        {"moek_device_half_native", (void **)&ex->dev.half_native},
        {"moek_device_init", (void **)&ex->dev.init},
        {"moek_device_fini", (void **)&ex->dev.fini}, {"moek_device_alloc", (void **)&ex->dev.alloc},
        {"moek_device_free", (void **)&ex->dev.free}, {"moek_device_copy", (void **)&ex->dev.copy},
        {"moek_device_sync", (void **)&ex->dev.sync}};
    for (size_t i = 0; i < sizeof svc / sizeof svc[0]; i++) {
        *svc[i].slot = dlsym(ex->devlib, svc[i].name);
        if (!*svc[i].slot)
            return fail(err, errlen, "kernel library %s/libmoek_%s.so lacks %s; rebuild it from "
                        "this source tree", ex->kernel_dir, ex->device, svc[i].name);
    }
    /* graphs are optional: without them every phase simply runs eagerly */
    struct { const char *name; void **slot; } gsvc[] = {
        {"moek_graph_begin", (void **)&ex->dev.graph_begin},
        {"moek_graph_end", (void **)&ex->dev.graph_end},
        {"moek_graph_launch", (void **)&ex->dev.graph_launch},
        {"moek_graph_free", (void **)&ex->dev.graph_free}};
    int ngraph = 0;
    for (size_t i = 0; i < sizeof gsvc / sizeof gsvc[0]; i++)
        ngraph += (*gsvc[i].slot = dlsym(ex->devlib, gsvc[i].name)) != NULL;
    if (ngraph != 4)
        ex->dev.graph_begin = NULL;
    if (o->log)
        fprintf(o->log, "run: device %s: loaded %s/libmoek_%s.so\n", ex->device, ex->kernel_dir,
                ex->device);
    return 0;
}

/* A user library loads only from an allowed directory: the plan's own, the
 * installed kernel directory, or one given with --allow-lib. */
static int load_user_lib(exec_state *ex, const exec_opts *o, const char *name, void **out,
                         char *err, size_t errlen)
{
    char plan_dir[PATH_MAX], cand[PATH_MAX], real[PATH_MAX], realdir[PATH_MAX];
    const char *slash = o->plan_path ? strrchr(o->plan_path, '/') : NULL;
    if (slash)
        snprintf(plan_dir, sizeof plan_dir, "%.*s", (int)(slash - o->plan_path), o->plan_path);
    else
        snprintf(plan_dir, sizeof plan_dir, ".");
    if (slash == o->plan_path)
        snprintf(plan_dir, sizeof plan_dir, "/");
    int ndirs = 2 + o->nallow;
    for (int i = 0; i < ndirs; i++) {
        const char *d = i == 0 ? plan_dir : i == 1 ? ex->kernel_dir : o->allow_dirs[i - 2];
        if (name[0] == '/')
            snprintf(cand, sizeof cand, "%s", name);
        else if (snprintf(cand, sizeof cand, "%s/%s", d, name) >= (int)sizeof cand)
            continue;
        if (!realpath(cand, real))
            continue;
        /* the file's real directory must be one of the allowed ones */
        char *s = strrchr(real, '/');
        snprintf(realdir, sizeof realdir, "%.*s", s == real ? 1 : (int)(s - real), real);
        for (int j = 0; j < ndirs; j++) {
            const char *a = j == 0 ? plan_dir : j == 1 ? ex->kernel_dir : o->allow_dirs[j - 2];
            char areal[PATH_MAX];
            if (!realpath(a, areal) || strcmp(areal, realdir) != 0)
                continue;
            void *h = dlopen(real, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
            if (!h)
                return fail(err, errlen, "cannot load user library %s: %s; rebuild it", real,
                            dlerror());
            if (o->log)
                fprintf(o->log, "run: user library: loaded %s\n", real);
            *out = h;
            return 0;
        }
        return fail(err, errlen, "user library %s (found as %s) is outside the allowed "
                    "directories; move it next to the plan or pass --allow-lib %s", name, real,
                    realdir);
    }
    return fail(err, errlen, "user library %s not found next to the plan (%s) or in %s; put it "
                "there or pass --allow-lib DIR", name, plan_dir, ex->kernel_dir);
}

static ffi_type *kind_type(uint8_t kind)
{
    switch (kind) {
    case PLAN_ARG_TENSOR: return &ffi_type_pointer;
    case PLAN_ARG_I64: return &ffi_type_sint64;
    case PLAN_ARG_F32: return &ffi_type_float;
    default: return &ffi_type_double;
    }
}

int exec_open(exec_state *ex, const plan_file *pf, const exec_opts *o, char *err, size_t errlen)
{
    memset(ex, 0, sizeof *ex);
    ex->pf = pf;
    ex->ctxp = &ex->ctx;
    if (load_device(ex, o, err, errlen))
        goto fail;
    ex->libs = calloc(pf->nlibs + 1, sizeof *ex->libs);
    ex->arena = calloc(pf->npools + 1, sizeof *ex->arena);
    ex->cifs = calloc(pf->nkernels + 1, sizeof *ex->cifs);
    ex->types = calloc((pf->nkernels + 1) * (1 + PLAN_MAX_KERNEL_ARGS), sizeof(ffi_type *));
    ex->calls = calloc(pf->nops + 1, sizeof *ex->calls);
    ex->avalues = calloc(pf->nops + pf->nargs + 1, sizeof *ex->avalues);
    ex->slots = calloc(pf->nargs + 1, sizeof *ex->slots);
    if (!ex->libs || !ex->arena || !ex->cifs || !ex->types || !ex->calls || !ex->avalues ||
        !ex->slots) {
        fail(err, errlen, "out of memory preparing %llu ops; free some memory",
             (unsigned long long)pf->nops);
        goto fail;
    }
    for (uint64_t i = 0; i < pf->nlibs; i++) {
        const char *path = plan_str(pf, pf->libs[i].path);
        if (!*path)
            ex->libs[i] = ex->devlib;
        else if (strcmp(path, COMM_LIB) == 0)
            ex->libs[i] = NULL;   /* collectives: built into run (comm.h) */
        else if (load_user_lib(ex, o, path, &ex->libs[i], err, errlen))
            goto fail;
    }
    char e[512];
    /* the plan's need for this library or the user's, the larger: the CPU
     * library widens half tensors into it, the CUDA one only keeps the
     * fused ops' scratch there (moek_device_half_native, docs/gpu.md) */
    uint64_t need = ex->dev.half_native() ? pf->train->gpu_workspace_bytes
                                          : pf->train->workspace_bytes;
    int64_t ws = o->workspace_bytes;
    if (ws < 0)   /* not given: on a GPU keep room for scratch the plan does not count */
        ws = strcmp(ex->device, "cuda") == 0 ? (int64_t)64 << 20 : 0;
    if ((uint64_t)ws < need)
        ws = (int64_t)need;
    if (ex->dev.init(&ex->ctx, 0, ws, e, sizeof e) != 0) {
        fail(err, errlen, "device %s failed to start: %s; check the device or use --device cpu",
             ex->device, e);
        goto fail;
    }
    ex->dev_ready = 1;
    ex->ctx.status = &ex->status;
    for (uint64_t i = 0; i < pf->npools; i++) {
        uint64_t bytes = pf->pools[i].bytes;
        if (bytes == 0)
            continue;
        ex->arena[i] = ex->dev.alloc(&ex->ctx, (int64_t)bytes, e, sizeof e);
        if (!ex->arena[i]) {
            fail(err, errlen, "cannot allocate pool '%s' (%llu bytes) on %s: %s; use a smaller "
                 "batch or model", plan_str(pf, pf->pools[i].name), (unsigned long long)bytes,
                 ex->device, e);
            goto fail;
        }
    }
    if (o->log) {
        /* one write: with several ranks on one terminal, a line built from
         * many writes interleaves with the other ranks' lines */
        char line[1024];
        size_t at = (size_t)snprintf(line, sizeof line, "run: allocated");
        uint64_t total = 0;
        for (uint64_t i = 0; i < pf->npools && at < sizeof line; i++) {
            at += (size_t)snprintf(line + at, sizeof line - at, " %s %llu,",
                                   plan_str(pf, pf->pools[i].name),
                                   (unsigned long long)pf->pools[i].bytes);
            total += pf->pools[i].bytes;
        }
        if (at < sizeof line)
            snprintf(line + at, sizeof line - at, " total %llu bytes (exactly the plan's pools)\n",
                     (unsigned long long)total);
        fputs(line, o->log);
    }
    /* one call interface per kernel signature */
    for (uint64_t k = 0; k < pf->nkernels; k++) {
        const plan_kernel *kn = &pf->kernels[k];
        ffi_type **ty = ex->types + k * (1 + PLAN_MAX_KERNEL_ARGS);
        ty[0] = &ffi_type_pointer;
        for (uint32_t a = 0; a < kn->nargs; a++)
            ty[1 + a] = kind_type(kn->arg_kinds[a]);
        if (ffi_prep_cif(&ex->cifs[k], FFI_DEFAULT_ABI, 1 + kn->nargs, &ffi_type_void, ty) !=
            FFI_OK) {
            fail(err, errlen, "libffi cannot prepare a call to %s; report this bug",
                 plan_str(pf, kn->symbol));
            goto fail;
        }
    }
    /* ops grouped by phase (stable), arguments bound to final pointers */
    uint64_t n = 0, av = 0;
    for (uint32_t ph = 0; ph <= PLAN_PHASE_OPTIMIZER; ph++) {
        ex->phase_begin[ph] = n;
        for (uint64_t i = 0; i < pf->nops; i++) {
            const plan_op *op = &pf->ops[i];
            if (op->phase != ph)
                continue;
            const plan_kernel *kn = &pf->kernels[op->kernel];
            const char *sym = plan_str(pf, kn->symbol);
            void *fn = ex->libs[kn->lib] ? dlsym(ex->libs[kn->lib], sym) : comm_symbol(sym);
            if (!fn) {
                char where[512];
                exec_describe_op(pf, i, where, sizeof where);
                const char *lib = plan_str(pf, pf->libs[kn->lib].path);
                char devname[32];
                snprintf(devname, sizeof devname, "libmoek_%s.so", ex->device);
                fail(err, errlen, "kernel %s not found in %s, needed by %s; rebuild the "
                     "library or fix the extern op", sym, *lib ? lib : devname, where);
                goto fail;
            }
            exec_call *c = &ex->calls[n++];
            c->cif = &ex->cifs[op->kernel];
            memcpy(&c->fn, &fn, sizeof fn);
            c->op = (uint32_t)i;
            c->avalues = &ex->avalues[av];
            av += 1 + op->nargs;
            c->avalues[0] = (void *)&ex->ctxp;
            for (uint32_t a = 0; a < op->nargs; a++) {
                uint64_t ai = op->first_arg + a;
                const plan_arg *arg = &pf->args[ai];
                exec_slot *s = &ex->slots[ai];
                switch (arg->kind) {
                case PLAN_ARG_TENSOR: {
                    const plan_tensor *t = &pf->tensors[arg->v.tensor];
                    s->p = (char *)ex->arena[t->pool] + t->offset;
                    break;
                }
                case PLAN_ARG_I64: s->i = arg->v.i64; break;
                case PLAN_ARG_F32: s->f = arg->v.f32; break;
                default: s->d = arg->v.f64; break;
                }
                c->avalues[1 + a] = s;
            }
        }
    }
    ex->phase_begin[3] = n;
    ex->warn = ex->log = o->log;
    exec_set_graphs(ex, 1, o->log);
    return 0;
fail:
    exec_close(ex);
    return -1;
}

int exec_phase(exec_state *ex, uint32_t phase, char *err, size_t errlen)
{
    const exec_call *c = ex->calls + ex->phase_begin[phase];
    const exec_call *end = ex->calls + ex->phase_begin[phase + 1];
    for (; c < end; c++) {
        ffi_call(c->cif, c->fn, NULL, c->avalues);
        if (ex->status)
            break;
    }
    if (!ex->status)
        return 0;
    static const char *const why[] = {"ok", "an index read from data is out of range",
                                      "inconsistent sizes", "a device call failed"};
    int st = ex->status;
    char where[512];
    if (c < end)
        exec_describe_op(ex->pf, c->op, where, sizeof where);
    else
        snprintf(where, sizeof where, "the %s phase", plan_phase_name(phase));
    ex->status = 0;
    return fail(err, errlen, "kernel error in %s: %s (status %d); check the data and the model",
                where, st >= 0 && st <= 3 ? why[st] : "unknown error", st);
}

static void free_graphs(exec_state *ex);

void exec_set_graphs(exec_state *ex, int on, FILE *warn)
{
    ex->warn = warn;
    if (!on)
        free_graphs(ex);
    ex->graphs_on = on && ex->dev.graph_begin && strcmp(ex->device, "cuda") == 0;
}

static const char *phase_range(uint32_t first, uint32_t last, char *buf, size_t n)
{
    if (first == last)
        snprintf(buf, n, "the %s phase", plan_phase_name(first));
    else
        snprintf(buf, n, "the %s..%s phases", plan_phase_name(first), plan_phase_name(last));
    return buf;
}

static int run_eager(exec_state *ex, uint32_t first, uint32_t last, char *err, size_t errlen)
{
    for (uint32_t ph = first; ph <= last; ph++)
        if (exec_phase(ex, ph, err, errlen))
            return -1;
    return 0;
}

static void free_graphs(exec_state *ex)
{
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            if (ex->graphs[i][j].graph && ex->dev.graph_free)
                ex->dev.graph_free(ex->graphs[i][j].graph);
            ex->graphs[i][j].graph = NULL;
        }
}

/* Records first..last into a graph; on failure returns -1 with why in e.
 * Nothing runs while capturing, so a failed capture has changed no tensor. */
static int capture(exec_state *ex, uint32_t first, uint32_t last, void **graph, char *e,
                   size_t en)
{
    *graph = NULL;
    if (ex->dev.graph_begin(&ex->ctx, e, (int64_t)en))
        return -1;
    char perr[1024] = "";
    int prc = run_eager(ex, first, last, perr, sizeof perr);
    /* end the capture even after a failed op, so the stream is usable again */
    int erc = ex->dev.graph_end(&ex->ctx, graph, e, (int64_t)en);
    ex->status = 0;
    if (prc) {
        snprintf(e, en, "%s", perr);
        if (*graph)
            ex->dev.graph_free(*graph);
        *graph = NULL;
        return -1;
    }
    return erc ? -1 : 0;
}

/* The first op of first..last that waits on the host mid-step (a
 * collective that reads sizes or adds on the host), described with why in
 * e; 0 when the range can be captured. */
static int host_wait(const exec_state *ex, uint32_t first, uint32_t last, char *e, size_t en)
{
    const plan_file *pf = ex->pf;
    for (uint64_t c = ex->phase_begin[first]; c < ex->phase_begin[last + 1]; c++) {
        const plan_op *op = &pf->ops[ex->calls[c].op];
        const plan_kernel *kn = &pf->kernels[op->kernel];
        const char *why = ex->libs[kn->lib] ? NULL : comm_symbol_host_wait(plan_str(pf, kn->symbol));
        if (why) {
            char where[512];
            exec_describe_op(pf, ex->calls[c].op, where, sizeof where);
            snprintf(e, en, "%s: %s", where, why);
            return 1;
        }
    }
    return 0;
}

int exec_run(exec_state *ex, uint32_t first, uint32_t last, char *err, size_t errlen)
{
    if (first > last || last > PLAN_PHASE_OPTIMIZER)
        return fail(err, errlen, "internal: bad phase range %u..%u; report this bug", first, last);
    if (!ex->graphs_on)
        return run_eager(ex, first, last, err, errlen);
    exec_graph *g = &ex->graphs[first][last];
    char e[1024], what[64];
    if (g->eager)
        return run_eager(ex, first, last, err, errlen);
    if (!g->graph) {
        if (g->runs++ == 0)
            return run_eager(ex, first, last, err, errlen);   /* warm-up */
        if (host_wait(ex, first, last, e, sizeof e)) {
            /* said once; the other phase ranges still get graphs */
            if (ex->log)
                fprintf(ex->log, "run: no CUDA graph for %s (eager instead): %s\n",
                        phase_range(first, last, what, sizeof what), e);
            g->eager = 1;
            return run_eager(ex, first, last, err, errlen);
        }
        if (capture(ex, first, last, &g->graph, e, sizeof e)) {
            /* not fatal: the same ops run eagerly; said once, not silently */
            if (ex->warn)
                fprintf(ex->warn, "run: CUDA graph capture of %s failed (%s); running every "
                        "phase eagerly from now on\n", phase_range(first, last, what,
                        sizeof what), e);
            free_graphs(ex);
            ex->graphs_on = 0;
            return run_eager(ex, first, last, err, errlen);
        }
        if (ex->log)
            fprintf(ex->log, "run: captured %s as a CUDA graph (%llu ops); replaying it\n",
                    phase_range(first, last, what, sizeof what),
                    (unsigned long long)(ex->phase_begin[last + 1] - ex->phase_begin[first]));
    }
    if (ex->dev.graph_launch(&ex->ctx, g->graph, e, sizeof e))
        return fail(err, errlen, "launching the CUDA graph of %s failed: %s; retry with "
                    "--no-graph", phase_range(first, last, what, sizeof what), e);
    return 0;
}

/* Re-runs first..last eagerly with a device sync after every op; names the
 * first op that fails. */
static int locate(exec_state *ex, uint32_t first, uint32_t last, char *where, size_t n)
{
    const exec_call *c = ex->calls + ex->phase_begin[first];
    const exec_call *end = ex->calls + ex->phase_begin[last + 1];
    char e[512];
    for (; c < end; c++) {
        ffi_call(c->cif, c->fn, NULL, c->avalues);
        if (ex->status || ex->dev.sync(&ex->ctx, e, sizeof e)) {
            exec_describe_op(ex->pf, c->op, where, n);
            ex->status = 0;
            return 0;
        }
    }
    return -1;
}

int exec_check(exec_state *ex, const char *what, uint32_t first, uint32_t last, char *err,
               size_t errlen)
{
    char e[512];
    ex->status = 0;
    if (ex->dev.sync(&ex->ctx, e, sizeof e) == 0 && !ex->status)
        return 0;
    int st = ex->status;
    ex->status = 0;
    if (st != MOEK_E_INDEX && st != MOEK_E_SHAPE)
        /* a failed device call can leave the device unusable: no re-run */
        return fail(err, errlen, "%s: %s; rerun with --no-graph and CUDA_LAUNCH_BLOCKING=1 to "
                    "name the op", what, e);
    char where[512];
    if (first > last || last > PLAN_PHASE_OPTIMIZER || locate(ex, first, last, where, sizeof where))
        return fail(err, errlen, "%s: %s (an eager re-run did not repeat it); check the data "
                    "and the model", what, e);
    return fail(err, errlen, "%s: %s, first raised by %s; check the data and the model", what,
                e, where);
}

static int check_range(exec_state *ex, uint64_t t, uint64_t off, uint64_t n, char *err,
                       size_t errlen)
{
    if (t >= ex->pf->ntensors || off > ex->pf->tensors[t].bytes ||
        n > ex->pf->tensors[t].bytes - off)
        return fail(err, errlen, "internal: tensor access out of range; report this bug");
    return 0;
}

int exec_read(exec_state *ex, uint64_t t, uint64_t off, void *host, uint64_t n, char *err,
              size_t errlen)
{
    if (check_range(ex, t, off, n, err, errlen))
        return -1;
    const plan_tensor *tt = &ex->pf->tensors[t];
    char e[512];
    if (n && ex->dev.copy(&ex->ctx, host, (char *)ex->arena[tt->pool] + tt->offset + off,
                          (int64_t)n, MOEK_COPY_D2H, e, sizeof e))
        return fail(err, errlen, "device copy of %s failed: %s; check the device",
                    plan_str(ex->pf, tt->name), e);
    return 0;
}

int exec_write(exec_state *ex, uint64_t t, uint64_t off, const void *host, uint64_t n, char *err,
               size_t errlen)
{
    if (check_range(ex, t, off, n, err, errlen))
        return -1;
    const plan_tensor *tt = &ex->pf->tensors[t];
    char e[512];
    if (n && ex->dev.copy(&ex->ctx, (char *)ex->arena[tt->pool] + tt->offset + off, host,
                          (int64_t)n, MOEK_COPY_H2D, e, sizeof e))
        return fail(err, errlen, "device copy to %s failed: %s; check the device",
                    plan_str(ex->pf, tt->name), e);
    return 0;
}

void exec_close(exec_state *ex)
{
    if (ex->dev_ready)
        free_graphs(ex);
    if (ex->arena && ex->dev_ready)
        for (uint64_t i = 0; i < ex->pf->npools; i++)
            if (ex->arena[i])
                ex->dev.free(&ex->ctx, ex->arena[i]);
    if (ex->dev_ready)
        ex->dev.fini(&ex->ctx);
    if (ex->libs && ex->pf)
        for (uint64_t i = 0; i < ex->pf->nlibs; i++)
            if (ex->libs[i] && ex->libs[i] != ex->devlib)
                dlclose(ex->libs[i]);
    if (ex->devlib)
        dlclose(ex->devlib);
    free(ex->libs);
    free(ex->arena);
    free(ex->cifs);
    free(ex->types);
    free(ex->calls);
    free(ex->avalues);
    free(ex->slots);
    memset(ex, 0, sizeof *ex);
}
