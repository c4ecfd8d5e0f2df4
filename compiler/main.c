/* main.c - moec: .moe source -> plan.bin.
 *
 *   elaborate -> the passes of moec_pipeline[] below (-O0/-O1/-O2 or --passes=
 *   pick the optional ones) -> pass_emit
 *
 * Exit status: 0 ok, 1 the model has errors, 2 bad usage. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ast.h"
#include "diag.h"
#include "elaborate.h"
#include "dot.h"
#include "explain.h"
#include "fuse.h"
#include "passes.h"

#define MOEC_VERSION "moec 0.1.0"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: moec [options] model.moe\n"
            "  -o PATH          write the plan to PATH (default plan.bin)\n"
            "  --explain        print parameters, FLOPs and memory per rank\n"
            "  --dump=ast|ir    print the syntax tree or the graph IR and stop\n"
            "  --dot            print the final graph as Graphviz (dot -Tsvg) and stop\n"
            "  --layout ranks=R,expert=E,zero=Z\n"
            "                   with --explain: that parallel layout instead of parallel { }\n"
            "  --after=PASS     with --dump=ir: print the IR right after PASS\n"
            "  -O0 | -O1 | -O2  optimisation level (default -O2; docs/passes.md)\n"
            "  --passes=A,B,..  run exactly these optional passes (cse, fuse,\n"
            "                   multi_tensor, dce, schedule, inplace); the required\n"
            "                   ones always run\n"
            "  -I DIR           add DIR to the import search path (repeatable)\n"
            "  --stdlib DIR     the standard library (default: <moec dir>/stdlib,\n"
            "                   <moec dir>/../stdlib, then $PREFIX/share/moec/stdlib)\n"
            "  --max-errors N   stop after N errors (default 20)\n"
            "  --version, --help\n"
            "Imports are searched in the importing file's directory, the -I dirs,\n"
            "$MOEC_PATH (colon-separated), then the standard library.\n");
}

/* <dir of the executable>/stdlib (a top-level moec), <dir>/../stdlib (a
 * moec inside a build folder, e.g. the sanitizer build), then
 * <dir>/../share/moec/stdlib (installed). */
static const char *default_stdlib(char *buf, size_t n)
{
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0)
        return NULL;
    exe[len] = 0;
    char *slash = strrchr(exe, '/');
    if (!slash)
        return NULL;
    *slash = 0;
    snprintf(buf, n, "%s/stdlib", exe);
    if (access(buf, R_OK) == 0)
        return buf;
    snprintf(buf, n, "%s/../stdlib", exe);
    if (access(buf, R_OK) == 0)
        return buf;
    snprintf(buf, n, "%s/../share/moec/stdlib", exe);
    if (access(buf, R_OK) == 0)
        return buf;
    return NULL;
}

static int report(diag_ctx *d, const moec_error *e)
{
    diag_span at = {e->loc.file && e->loc.file[0] ? e->loc.file : NULL, e->loc.line, e->loc.col, e->loc.line,
                    e->loc.col};
    diag_error(d, at, e->hint[0] ? e->hint : NULL, "%s", e->msg);
    return 1;
}

/* The passes between elaboration and emission, in the order they run.
 * Recompute must follow autodiff (it re-runs forward ops inside backward)
 * and precede memplan (whose liveness it changes). */
typedef struct moec_pass {
    const char *name;
    int (*run)(ir_graph *g, moec_error *err);
    int level;   /* lowest -O level that runs it; 0: always (the plan needs it) */
} moec_pass;

static const moec_pass moec_pipeline[] = {
    {"cse", pass_cse, 1},             /* before autodiff: one backward op per merged op */
    {"fuse", pass_fuse, 2},           /* before autodiff: fused ops bring their backward */
    {"autodiff", pass_autodiff, 0},
    {"parallel", pass_parallel, 0},   /* before optimizer: its ops precede the norm */
    {"optimizer", pass_optimizer, 0},
    {"multi_tensor", pass_multi_tensor, 2}, /* after optimizer, which writes the updates it
                                               groups; before dce and schedule, which then
                                               see one update and one fill per group */
    {"dce", pass_dce, 1},             /* after optimizer: every gradient reader is known */
    {"recompute", pass_recompute, 0},
    {"schedule", pass_schedule, 2},   /* after recompute, before memplan: the final order */
    {"inplace", pass_inplace, 2},     /* after schedule: fixes which write comes last */
    {"memplan", pass_memplan, 0},
};

#define MOEC_NPASSES ((int)(sizeof moec_pipeline / sizeof moec_pipeline[0]))

/* Which passes run, and what to report on the way. */
typedef struct moec_run {
    bool on[MOEC_NPASSES];
    int after;                  /* --after: stop after this pass (index), -1 = run all */
    explain_pass_row *rows;     /* --explain: one row before the passes and one per pass */
    int nrows;
} moec_run;

static int pass_index(const char *name)
{
    for (int i = 0; i < MOEC_NPASSES; i++)
        if (strcmp(moec_pipeline[i].name, name) == 0)
            return i;
    return -1;
}

/* "unknown pass `x` in --passes (did you mean `y`?)" plus the list. */
static void unknown_pass(diag_ctx *d, const char *opt, const char *name)
{
    const char *names[MOEC_NPASSES];
    char list[512] = "";
    for (int i = 0; i < MOEC_NPASSES; i++) {
        names[i] = moec_pipeline[i].name;
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "", names[i]);
    }
    const char *near = diag_closest(name, names, MOEC_NPASSES);
    diag_plain(d, "unknown pass `%s` in %s%s%s%s; the passes are: %s", name, opt,
               near ? " (did you mean `" : "", near ? near : "", near ? "`?)" : "", list);
}

/* --passes=a,b,c: the optional passes named run, others not.  0 or -1. */
static int parse_passes(diag_ctx *d, const char *spec, moec_run *r)
{
    for (int i = 0; i < MOEC_NPASSES; i++)
        r->on[i] = moec_pipeline[i].level == 0;
    char buf[512];
    snprintf(buf, sizeof buf, "%s", spec);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int i = pass_index(tok);
        if (i < 0) {
            unknown_pass(d, "--passes", tok);
            return -1;
        }
        r->on[i] = true;
    }
    return 0;
}

static int run_pipeline(ir_graph *g, moec_run *r, moec_error *err)
{
    if (r->rows)
        explain_pass_fill(g, "(elaborated)", &r->rows[r->nrows++]);
    for (int i = 0; i < MOEC_NPASSES; i++) {
        if (!r->on[i])
            continue;
        if (moec_pipeline[i].run(g, err))
            return -1;
        if (r->rows)
            explain_pass_fill(g, moec_pipeline[i].name, &r->rows[r->nrows++]);
        if (i == r->after)
            break;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *out_path = "plan.bin", *input = NULL, *dump = NULL, *stdlib = NULL;
    const char *inc[64];
    int ninc = 0, explain = 0, max_errors = 20, level = 2;
    const char *passes = NULL, *after = NULL;
    int dot = 0;
    const char *layout = NULL;
    explain_layout lay;
    char lerr[256];
    diag_ctx *d = diag_new(stderr, 20);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            diag_free(d);
            return 0;
        } else if (strcmp(a, "--version") == 0) {
            printf("%s (plan format %u)\n", MOEC_VERSION, PLAN_FORMAT_VERSION);
            diag_free(d);
            return 0;
        } else if (strcmp(a, "-o") == 0 && i + 1 < argc) {
            out_path = argv[++i];
        } else if (strcmp(a, "-I") == 0 && i + 1 < argc) {
            if (ninc < 64)
                inc[ninc++] = argv[++i];
        } else if (strncmp(a, "-I", 2) == 0 && a[2]) {
            if (ninc < 64)
                inc[ninc++] = a + 2;
        } else if (strcmp(a, "--stdlib") == 0 && i + 1 < argc) {
            stdlib = argv[++i];
        } else if (strncmp(a, "--stdlib=", 9) == 0) {
            stdlib = a + 9;
        } else if (strcmp(a, "-O0") == 0 || strcmp(a, "-O1") == 0 || strcmp(a, "-O2") == 0) {
            level = a[2] - '0';
        } else if (strncmp(a, "--passes=", 9) == 0) {
            passes = a + 9;
        } else if (strncmp(a, "--after=", 8) == 0) {
            after = a + 8;
        } else if (strcmp(a, "--explain") == 0) {
            explain = 1;
        } else if (strcmp(a, "--dot") == 0) {
            dot = 1;
        } else if ((strcmp(a, "--layout") == 0 && i + 1 < argc) || strncmp(a, "--layout=", 9) == 0) {
            layout = a[8] == '=' ? a + 9 : argv[++i];
            if (explain_layout_parse(layout, &lay, lerr, sizeof lerr)) {
                diag_plain(d, "%s", lerr);
                diag_free(d);
                return 2;
            }
        } else if (strncmp(a, "--dump=", 7) == 0 && (strcmp(a + 7, "ast") == 0 || strcmp(a + 7, "ir") == 0)) {
            dump = a + 7;
        } else if (strcmp(a, "--max-errors") == 0 && i + 1 < argc) {
            max_errors = atoi(argv[++i]);
            if (max_errors <= 0) {
                diag_plain(d, "--max-errors needs a positive number");
                diag_free(d);
                return 2;
            }
        } else if (a[0] == '-' && a[1]) {
            diag_plain(d, "unknown option `%s` (try --help)", a);
            diag_free(d);
            return 2;
        } else if (input) {
            diag_plain(d, "more than one input file (`%s` and `%s`)", input, a);
            diag_free(d);
            return 2;
        } else {
            input = a;
        }
    }
    if (!input) {
        diag_plain(d, "no input file");
        usage(stderr);
        diag_free(d);
        return 2;
    }
    if ((layout && !explain) || (dot && (dump || explain))) {
        diag_plain(d, layout && !explain ? "--layout goes with --explain (it changes only what --explain prints)"
                                         : "--dot cannot be combined with --dump or --explain");
        diag_free(d);
        return 2;
    }
    moec_run prun;
    memset(&prun, 0, sizeof prun);
    prun.after = -1;
    for (int i = 0; i < MOEC_NPASSES; i++)
        prun.on[i] = moec_pipeline[i].level <= level;
    if (passes && parse_passes(d, passes, &prun)) {
        diag_free(d);
        return 2;
    }
    if (after) {
        prun.after = pass_index(after);
        if (!dump || strcmp(dump, "ir") != 0) {
            diag_plain(d, "--after=%s needs --dump=ir (it picks where the IR is printed)", after);
        } else if (prun.after < 0) {
            unknown_pass(d, "--after", after);
        } else if (!prun.on[prun.after]) {
            diag_plain(d, "pass `%s` does not run here (-O%d%s%s): --after names a pass that runs",
                       after, level, passes ? ", --passes=" : "", passes ? passes : "");
        }
        if (diag_count(d)) {
            diag_free(d);
            return 2;
        }
    }
    diag_free(d);
    d = diag_new(stderr, max_errors);
    if (access(input, R_OK) != 0) {
        diag_plain(d, "cannot read `%s`", input);
        diag_free(d);
        return 2;
    }
    char stdbuf[PATH_MAX + 32];
    if (!stdlib)
        stdlib = default_stdlib(stdbuf, sizeof stdbuf);

    if (dump && strcmp(dump, "ast") == 0) {
        /* the syntax tree of the given file only (imports are not expanded) */
        FILE *f = fopen(input, "rb");
        char *text = NULL;
        size_t len = 0, cap = 0, r;
        char chunk[65536];
        while (f && (r = fread(chunk, 1, sizeof chunk, f)) > 0) {
            if (len + r > cap) {
                cap = (len + r) * 2;
                text = realloc(text, cap);
                if (!text)
                    abort();
            }
            memcpy(text + len, chunk, r);
            len += r;
        }
        if (f)
            fclose(f);
        ast_arena *arena = ast_arena_new();
        ast_file *af = ast_parse(arena, d, input, text ? text : "", len);
        int bad = diag_count(d) > 0;
        if (!bad)
            ast_dump(af, stdout);
        ast_arena_free(arena);
        free(text);
        diag_free(d);
        return bad ? 1 : 0;
    }

    elab_options opt = {.stdlib_dir = stdlib, .include_dirs = inc, .ninclude = ninc,
                        .moec_path = getenv("MOEC_PATH")};
    ir_graph *g = elaborate(input, &opt, d);
    int rc = 0;
    moec_error err;
    memset(&err, 0, sizeof err);
    if (!g) {
        rc = 1;
    } else if ((prun.rows = explain ? calloc(MOEC_NPASSES + 1, sizeof *prun.rows) : NULL),
               run_pipeline(g, &prun, &err) || (!dump && !explain && !dot && pass_emit(g, out_path, &err))) {
        rc = report(d, &err);
    } else if (dump) {
        ir_dump(g, stdout);
    } else if (dot) {
        dot_write(g, stdout);
    } else if (layout && explain_layout_resolve(g, &lay, lerr, sizeof lerr)) {
        diag_plain(d, "%s", lerr);   /* a usage error: the model itself is fine */
        rc = 2;
    } else if (explain) {
        explain_print_layout(g, layout ? &lay : NULL, stdout);
        explain_pass_table(prun.rows, prun.nrows, stdout);
    }
    if (rc && diag_count(d))
        fprintf(stderr, "moec: %d error%s\n", diag_count(d), diag_count(d) == 1 ? "" : "s");
    free(prun.rows);
    ir_graph_free(g);
    diag_free(d);
    return rc;
}
