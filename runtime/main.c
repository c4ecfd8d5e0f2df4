/* main.c - `run`: train a plan, inspect it, or sample from a checkpoint. */
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm.h"
#include "exec.h"
#include "inspect.h"
#include "memstat.h"
#include "plan_load.h"
#include "train.h"

/* The one global: a signal handler can only talk through a flag. */
static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void usage(FILE *f)
{
    fputs("usage: run [options] plan.bin\n"
          "  --inspect              print the plan and exit\n"
          "  --device cpu|cuda      kernel library (default: cuda if a GPU is usable, else cpu)\n"
          "  --steps N              stop after step N (the schedule still spans the plan's steps)\n"
          "  --data PATH            training data (overrides the plan)\n"
          "  --metrics PATH         JSONL metrics, one object per step (default metrics.jsonl)\n"
          "  --memory-report        print each rank's peak resident memory and the plan's pools\n"
          "  --checkpoint PATH      checkpoint to write (default checkpoint.safetensors; \"\" = none)\n"
          "  --resume PATH          continue exactly from a checkpoint\n"
          "  --init-from PATH       load weights only, then train from step 1\n"
          "  --allow-lib DIR        also load user kernel libraries from DIR\n"
          "  --trace DIR            write a replay trace (config, batches, losses, initial\n"
          "                         weights, step 1 gradients) for tests/parity\n"
          "  --workspace-mb N       kernel workspace at least N MiB (default: the plan's on CPU, 64 on CUDA)\n"
          "  --no-graph             on cuda, run every op eagerly (no CUDA graph replay)\n"
          "  --routing-stats        one forward pass on a batch, then each MoE layer's\n"
          "                         per-expert token counts (weights: --checkpoint/--resume)\n"
          "  --eval-logits PATH     one forward pass on the first validation batch; write\n"
          "                         its logits as raw fp32 (weights: --resume/--init-from)\n"
          "  --sample               generate text: --prompt S --tokens N --temperature T\n"
          "                         --top-k K --seed S, weights from --checkpoint/--resume\n"
          "  -q, --quiet            no per-step lines\n"
          "  --comm auto|single|mpi|nccl  communication backend (default auto: mpi when\n"
          "                         started by mpirun, else single); see docs/parallel.md\n"
          "  --comm-timeout SEC     deadline of every collective (default 300)\n", f);
}

/* One line per rank (one write, so ranks do not interleave): the peak the
 * kernel measured, split into what was resident before the pools and what
 * came after, next to the pools moec --explain predicts. */
static void report_memory(const plan_file *pf, int rank, const memstat *start)
{
    uint64_t pools = 0;
    for (uint64_t i = 0; i < pf->npools; i++)
        pools += pf->pools[i].bytes;
    memstat now;
    const double mib = 1024.0 * 1024.0;
    if (!start || memstat_read(&now) != 0) {
        fprintf(stderr, "run: rank %d memory: not measured (no /proc/self/status); pools %.2f MiB\n",
                rank, (double)pools / mib);
        return;
    }
    fprintf(stderr, "run: rank %d memory: peak resident %.2f MiB = %.2f MiB before the plan + "
            "%.2f MiB after; the plan's pools %.2f MiB\n", rank, (double)now.peak / mib,
            (double)start->resident / mib, (double)(now.peak - start->resident) / mib,
            (double)pools / mib);
}

int main(int argc, char **argv)
{
    const char *plan_path = NULL, *device = NULL, *data = NULL, *metrics = "metrics.jsonl";
    const char *ckpt = NULL, *resume = NULL, *init_from = NULL, *prompt = "";
    const char *trace = NULL, *comm_name = NULL, *eval_logits = NULL;
    double comm_timeout = 300;
    const char *allow[64];
    int nallow = 0, inspect = 0, sample = 0, quiet = 0, no_graph = 0, routing_stats = 0,
        memory_report = 0;
    int64_t steps = -1, tokens = 200, top_k = 0, workspace_mb = -1;
    double temperature = 0.8;
    uint64_t seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && (v || (fprintf(stderr, "run: %s needs a value\n", name), usage(stderr), exit(2), 0)) && ++i)
        char *end = NULL;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) { usage(stdout); return 0; }
        else if (strcmp(a, "--inspect") == 0) inspect = 1;
        else if (strcmp(a, "--sample") == 0) sample = 1;
        else if (strcmp(a, "--routing-stats") == 0) routing_stats = 1;
        else if (strcmp(a, "--no-graph") == 0) no_graph = 1;
        else if (strcmp(a, "--memory-report") == 0) memory_report = 1;
        else if (strcmp(a, "-q") == 0 || strcmp(a, "--quiet") == 0) quiet = 1;
        else if (OPT("--device")) device = v;
        else if (OPT("--data")) data = v;
        else if (OPT("--metrics")) metrics = v;
        else if (OPT("--checkpoint")) ckpt = v;
        else if (OPT("--resume")) resume = v;
        else if (OPT("--init-from")) init_from = v;
        else if (OPT("--trace")) trace = v;
        else if (OPT("--eval-logits")) eval_logits = v;
        else if (OPT("--prompt")) prompt = v;
        else if (OPT("--comm")) comm_name = v;
        else if (OPT("--comm-timeout")) { comm_timeout = strtod(v, &end); if (*end || !(comm_timeout > 0)) goto bad; }
        else if (OPT("--allow-lib")) {
            if (nallow == 64) { fprintf(stderr, "run: too many --allow-lib\n"); return 2; }
            allow[nallow++] = v;
        }
        else if (OPT("--steps")) { steps = strtoll(v, &end, 10); if (*end || steps < 0) goto bad; }
        else if (OPT("--tokens")) { tokens = strtoll(v, &end, 10); if (*end || tokens < 0) goto bad; }
        else if (OPT("--top-k")) { top_k = strtoll(v, &end, 10); if (*end || top_k < 0) goto bad; }
        else if (OPT("--workspace-mb")) { workspace_mb = strtoll(v, &end, 10); if (*end || workspace_mb < 0 || workspace_mb > (1 << 20)) goto bad; }
        else if (OPT("--seed")) { seed = strtoull(v, &end, 10); if (*end) goto bad; }
        else if (OPT("--temperature")) { temperature = strtod(v, &end); if (*end || !(temperature >= 0)) goto bad; }
        else if (a[0] == '-') { fprintf(stderr, "run: unknown option %s\n", a); usage(stderr); return 2; }
        else if (plan_path) { fprintf(stderr, "run: more than one plan given (%s, %s)\n", plan_path, a); return 2; }
        else plan_path = a;
        continue;
    bad:
        fprintf(stderr, "run: bad value '%s' for %s\n", argv[i], argv[i - 1]);
        return 2;
#undef OPT
    }
    if (!plan_path) {
        fprintf(stderr, "run: no plan given; compile one with `moec model.moe` (writes plan.bin)\n");
        usage(stderr);
        return 2;
    }
    char err[2048];
    plan_file pf;
    if (plan_load(plan_path, &pf, err, sizeof err)) {
        fprintf(stderr, "run: %s: %s\n", plan_path, err);
        return 1;
    }
    if (inspect) {
        inspect_plan(&pf, stdout);
        const plan_train *pt = pf.train;
        int64_t nr = pt->par_ranks > 0 ? pt->par_ranks : 1, ne = pt->par_expert > 0 ? pt->par_expert : 1;
        printf("parallel: ranks %lld, expert %lld, zero %lld; process groups:\n", (long long)nr,
               (long long)ne, (long long)pt->par_zero);
        comm_print_layout(nr, ne, stdout);
        plan_close(&pf);
        return 0;
    }
    char exe_dir[PATH_MAX] = "";
    ssize_t k = readlink("/proc/self/exe", exe_dir, sizeof exe_dir - 1);
    if (k > 0) {
        exe_dir[k] = '\0';
        char *s = strrchr(exe_dir, '/');
        if (s)
            *s = '\0';
    }
    /* communication first: MPI must start before any rank does real work */
    int64_t want_ranks = pf.train->par_ranks > 0 ? pf.train->par_ranks : 1;
    comm_opts co = {comm_name, exe_dir, pf.train->par_expert, comm_timeout,
                    device && strcmp(device, "cuda") == 0};
    comm *cm = comm_open(&co, err, sizeof err);
    if (!cm) {
        fprintf(stderr, "run: %s: %s\n", plan_path, err);
        plan_close(&pf);
        return 1;
    }
    int rank = comm_rank(cm), world = comm_world(cm);
    if (world != want_ranks) {
        if (world == 1)
            fprintf(stderr, "run: %s: the plan was compiled for %lld ranks (parallel { ranks = "
                    "%lld }) but this is a single process; start it with mpirun -np %lld\n",
                    plan_path, (long long)want_ranks, (long long)want_ranks, (long long)want_ranks);
        else
            fprintf(stderr, "run: %s: the plan was compiled for %lld rank%s (parallel { ranks "
                    "}) but %d were started (rank %d); start it with mpirun -np %lld or recompile "
                    "with parallel { ranks = %d }\n", plan_path, (long long)want_ranks,
                    want_ranks == 1 ? "" : "s", world, rank, (long long)want_ranks, world);
        comm_close(cm);
        plan_close(&pf);
        return 1;
    }
    if (rank > 0) {
        /* rank 0 speaks for the job: one log, one metrics file, one trace */
        quiet = 1;
        metrics = "";
        trace = NULL;
    }
    /* what is resident before the plan's pools: code, MPI, libraries */
    memstat mem0;
    int mem_ok = memstat_read(&mem0) == 0;
    exec_opts eo = {device, plan_path, exe_dir, allow, nallow, workspace_mb < 0 ? -1 : workspace_mb << 20,
                    quiet ? NULL : stderr};
    exec_state ex;
    if (exec_open(&ex, &pf, &eo, err, sizeof err)) {
        if (world > 1)
            fprintf(stderr, "run: %s: rank %d: %s\n", plan_path, rank, err);
        else
            fprintf(stderr, "run: %s: %s\n", plan_path, err);
        comm_abort(cm, 1);
        comm_close(cm);
        plan_close(&pf);
        return 1;
    }
    ex.ctx.comm = cm;   /* the collective ops reach the backend through ctx */
    comm_set_device(cm, &(comm_device){ex.dev.copy, ex.dev.alloc, ex.dev.free});
    if (world > 1 && !quiet)
        fprintf(stderr, "run: %d ranks, communication backend %s%s%s\n", world, comm_backend_name(cm),
                strcmp(comm_buffer_mode(cm), "host") ? ", device buffers " : "",
                strcmp(comm_buffer_mode(cm), "host") ? comm_buffer_mode(cm) : "");
    exec_set_graphs(&ex, !no_graph, stderr);   /* a failed capture is said even with -q */
    int rc;
    if (eval_logits) {
        train_opts to = {0};
        to.data_path = data;
        to.exe_dir = exe_dir;
        to.resume_path = resume;
        to.init_from = init_from ? init_from : ckpt;
        rc = train_eval_logits(&ex, &to, eval_logits, err, sizeof err);
    } else if (routing_stats) {
        train_opts to = {0};
        to.data_path = data;
        to.exe_dir = exe_dir;
        to.resume_path = resume;
        to.init_from = init_from ? init_from : ckpt;
        rc = train_routing_stats(&ex, &to, stdout, err, sizeof err);
    } else if (sample) {
        sample_opts so = {ckpt ? ckpt : resume, prompt, tokens, temperature, top_k, seed};
        rc = train_sample(&ex, &so, stdout, err, sizeof err);
    } else {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_sigint;
        sigaction(SIGINT, &sa, NULL);
        train_opts to = {steps, data, exe_dir, *metrics ? metrics : NULL, !ckpt ? "checkpoint.safetensors" : *ckpt ? ckpt : NULL,
                         resume, init_from, &interrupted, quiet ? NULL : stdout};
        rc = train_run_trace(&ex, &to, trace, err, sizeof err);
    }
    if (rc && *comm_error(cm))
        /* a failed collective names the rank and the collective; the kernel
         * status it raised only says "a device call failed" */
        fprintf(stderr, "run: %s\n", comm_error(cm));
    else if (rc && world > 1)
        fprintf(stderr, "run: rank %d: %s\n", rank, err);
    else if (rc)
        fprintf(stderr, "run: %s\n", err);
    if (rc)
        comm_abort(cm, 1);   /* the other ranks would wait for this one until the deadline */
    if (memory_report)
        report_memory(&pf, rank, mem_ok ? &mem0 : NULL);
    if (ex.dev_ready) {   /* a failed step may leave copies queued on the scratch */
        char e[256];
        ex.dev.sync(&ex.ctx, e, sizeof e);
    }
    comm_release_device(cm, &ex.ctx);
    exec_close(&ex);
    comm_close(cm);
    plan_close(&pf);
    return rc ? 1 : 0;
}
