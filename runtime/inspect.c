/* inspect.c - one section per table, one line per record. */
#include "inspect.h"

#include <inttypes.h>

static void shape(const plan_tensor *t, FILE *out)
{
    fputc('[', out);
    for (unsigned d = 0; d < t->ndim; d++)
        fprintf(out, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
    fputc(']', out);
}

static void bytes(uint64_t b, FILE *out)
{
    if (b >= (1ull << 30))
        fprintf(out, "%.2f GiB", (double)b / (double)(1ull << 30));
    else if (b >= (1ull << 20))
        fprintf(out, "%.2f MiB", (double)b / (double)(1ull << 20));
    else if (b >= 1024)
        fprintf(out, "%.2f KiB", (double)b / 1024.0);
    else
        fprintf(out, "%llu B", (unsigned long long)b);
}

void inspect_plan(const plan_file *pf, FILE *out)
{
    const plan_header *h = pf->hdr;
    const plan_train *t = pf->train;
    static const char *const opt[] = {"adamw", "sgd"}, *const sch[] = {"constant", "cosine", "linear"};
    static const char *const fmt[] = {"bytes", "llm.c u16", "llm.c u32"}, *const dev[] = {"cpu", "cuda"};
    static const char *const init[] = {"none", "zeros", "ones", "normal"};
    fprintf(out, "plan: model %s, format %u, %s, %llu bytes, source hash %016" PRIx64
            ", checksum %016" PRIx64 "\n", plan_str(pf, h->model_name), h->format_version,
            plan_str(pf, h->compiler_version), (unsigned long long)h->file_bytes, h->source_hash,
            h->checksum);
    fprintf(out, "train: batch %lld, seq %lld, grad_accum %lld, steps %lld, seed %lld, vocab %lld\n",
            (long long)t->batch, (long long)t->seq, (long long)t->grad_accum, (long long)t->steps,
            (long long)t->seed, (long long)t->vocab);
    fprintf(out, "  optimizer %s: lr %g, min_lr %g, betas (%g, %g), eps %g, weight_decay %g, "
            "momentum %g, clip_grad %g\n", opt[t->optimizer], (double)t->lr, (double)t->min_lr,
            (double)t->beta1, (double)t->beta2, (double)t->eps, (double)t->weight_decay,
            (double)t->momentum, (double)t->clip_grad);
    fprintf(out, "  schedule %s, warmup %lld; eval every %lld x %lld batches; checkpoint every "
            "%lld; log every %lld\n", sch[t->schedule], (long long)t->warmup,
            (long long)t->eval_every, (long long)t->eval_batches, (long long)t->checkpoint_every,
            (long long)t->log_every);
    const char *dp = plan_str(pf, t->data_path);
    fprintf(out, "  data %s (%s), val_fraction %g, device %s\n", *dp ? dp : "<default corpus>",
            fmt[t->data_format], (double)t->val_fraction, dev[t->device]);
    fprintf(out, "  params %llu (active %llu), %llu FLOPs per token\n",
            (unsigned long long)t->param_count, (unsigned long long)t->active_param_count,
            (unsigned long long)t->flops_per_token);
    fprintf(out, "  precision %s, kernel workspace %llu bytes on cpu, %llu on cuda\n",
            t->precision == PLAN_BF16   ? "bf16 (fp32 master weights, grads and optimizer state)"
            : t->precision == PLAN_F16 ? "fp16 (fp32 master weights, grads and optimizer state)"
                                        : "fp32", (unsigned long long)t->workspace_bytes,
            (unsigned long long)t->gpu_workspace_bytes);
    if (t->precision == PLAN_F16) {
        if (t->loss_scale_window > 0)
            fprintf(out, "  loss scale dynamic: initial %g, doubled after %u good steps, halved "
                    "on overflow\n", (double)t->loss_scale, t->loss_scale_window);
        else
            fprintf(out, "  loss scale static %g (halved on overflow)\n", (double)t->loss_scale);
    }
    fprintf(out, "pools (%llu):\n", (unsigned long long)pf->npools);
    for (uint64_t i = 0; i < pf->npools; i++) {
        fprintf(out, "  %llu %-10s %-9s ", (unsigned long long)i, plan_str(pf, pf->pools[i].name),
                plan_storage_name(pf->pools[i].storage));
        bytes(pf->pools[i].bytes, out);
        fprintf(out, " (%llu)\n", (unsigned long long)pf->pools[i].bytes);
    }
    fprintf(out, "tensors (%llu):\n", (unsigned long long)pf->ntensors);
    for (uint64_t i = 0; i < pf->ntensors; i++) {
        const plan_tensor *x = &pf->tensors[i];
        fprintf(out, "  %llu %s %s ", (unsigned long long)i, plan_str(pf, x->name),
                plan_dtype_name(x->dtype));
        shape(x, out);
        fprintf(out, " %s pool %u +%llu (%llu bytes)", plan_storage_name(x->storage), x->pool,
                (unsigned long long)x->offset, (unsigned long long)x->bytes);
        if (x->role)
            fprintf(out, " role %s", plan_role_name(x->role));
        fputc('\n', out);
    }
    fprintf(out, "libraries (%llu):\n", (unsigned long long)pf->nlibs);
    for (uint64_t i = 0; i < pf->nlibs; i++) {
        const char *p = plan_str(pf, pf->libs[i].path);
        fprintf(out, "  %llu %s\n", (unsigned long long)i, *p ? p : "<device kernel library>");
    }
    fprintf(out, "kernels (%llu):\n", (unsigned long long)pf->nkernels);
    for (uint64_t i = 0; i < pf->nkernels; i++) {
        const plan_kernel *k = &pf->kernels[i];
        fprintf(out, "  %llu %s(ctx", (unsigned long long)i, plan_str(pf, k->symbol));
        for (uint32_t a = 0; a < k->nargs; a++)
            fprintf(out, ", %s", plan_arg_kind_name(k->arg_kinds[a]));
        fprintf(out, ") lib %u\n", k->lib);
    }
    fprintf(out, "ops (%llu):\n", (unsigned long long)pf->nops);
    for (uint64_t i = 0; i < pf->nops; i++) {
        const plan_op *op = &pf->ops[i];
        const char *f = plan_str(pf, op->src_file);
        fprintf(out, "  %llu %-9s %s(", (unsigned long long)i, plan_phase_name(op->phase),
                plan_str(pf, pf->kernels[op->kernel].symbol));
        for (uint32_t a = 0; a < op->nargs; a++) {
            const plan_arg *g = &pf->args[op->first_arg + a];
            fputs(a ? ", " : "", out);
            switch (g->kind) {
            case PLAN_ARG_TENSOR: fputs(plan_str(pf, pf->tensors[g->v.tensor].name), out); break;
            case PLAN_ARG_I64: fprintf(out, "%lld", (long long)g->v.i64); break;
            case PLAN_ARG_F32: fprintf(out, "%gf", (double)g->v.f32); break;
            default: fprintf(out, "%g", g->v.f64); break;
            }
        }
        fprintf(out, ")  # %s at %s:%u:%u\n", plan_str(pf, op->what), *f ? f : "<none>",
                op->src_line, op->src_col);
    }
    fprintf(out, "params (%llu):\n", (unsigned long long)pf->nparams);
    for (uint64_t i = 0; i < pf->nparams; i++) {
        const plan_param *p = &pf->params[i];
        const plan_tensor *x = &pf->tensors[p->tensor];
        fprintf(out, "  %s ", plan_str(pf, x->name));
        shape(x, out);
        fprintf(out, " init %s", init[p->init]);
        if (p->init == PLAN_INIT_NORMAL)
            fprintf(out, "(std %g)", (double)p->init_std);
        fprintf(out, " weight_decay %g grad %s", (double)p->weight_decay,
                p->grad >= 0 ? plan_str(pf, pf->tensors[p->grad].name) : "-");
        if (p->state0 >= 0)
            fprintf(out, " state %s", plan_str(pf, pf->tensors[p->state0].name));
        if (p->state1 >= 0)
            fprintf(out, ", %s", plan_str(pf, pf->tensors[p->state1].name));
        if (p->master >= 0)
            fprintf(out, " master %s", plan_str(pf, pf->tensors[p->master].name));
        fputc('\n', out);
    }
}
