/* main.c - moec: .moe source -> plan.bin.
 *
 *   elaborate -> pass_autodiff -> pass_optimizer -> pass_recompute -> pass_memplan
 *   -> pass_emit
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
#include "passes.h"

#define MOEC_VERSION "moec 0.1.0"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: moec [options] model.moe\n"
            "  -o PATH          write the plan to PATH (default plan.bin)\n"
            "  --explain        print parameters, FLOPs and memory per rank\n"
            "  --dump=ast|ir    print the syntax tree or the graph IR and stop\n"
            "  -I DIR           add DIR to the import search path (repeatable)\n"
            "  --stdlib DIR     the standard library (default: <moec dir>/stdlib,\n"
            "                   then " "$PREFIX/share/moec/stdlib)\n"
            "  --max-errors N   stop after N errors (default 20)\n"
            "  --version, --help\n"
            "Imports are searched in the importing file's directory, the -I dirs,\n"
            "$MOEC_PATH (colon-separated), then the standard library.\n");
}

/* <dir of the executable>/stdlib, then <dir>/../share/moec/stdlib. */
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
} moec_pass;

static const moec_pass moec_pipeline[] = {
    {"autodiff", pass_autodiff},
    {"optimizer", pass_optimizer},
    {"recompute", pass_recompute},
    {"memplan", pass_memplan},
};

static int run_pipeline(ir_graph *g, moec_error *err)
{
    for (size_t i = 0; i < sizeof moec_pipeline / sizeof moec_pipeline[0]; i++)
        if (moec_pipeline[i].run(g, err))
            return -1;
    return 0;
}

int main(int argc, char **argv)
{
    const char *out_path = "plan.bin", *input = NULL, *dump = NULL, *stdlib = NULL;
    const char *inc[64];
    int ninc = 0, explain = 0, max_errors = 20;
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
        } else if (strcmp(a, "--explain") == 0) {
            explain = 1;
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
    } else if (run_pipeline(g, &err) || (!dump && !explain && pass_emit(g, out_path, &err))) {
        rc = report(d, &err);
    } else if (dump) {
        ir_dump(g, stdout);
    } else if (explain) {
        explain_print(g, stdout);
    }
    if (rc && diag_count(d))
        fprintf(stderr, "moec: %d error%s\n", diag_count(d), diag_count(d) == 1 ? "" : "s");
    ir_graph_free(g);
    diag_free(d);
    return rc;
}
