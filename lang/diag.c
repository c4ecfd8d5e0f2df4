/* diag.c - diagnostics: location, source line, caret underline, hint. */
#include "diag.h"

#include <stdlib.h>
#include <string.h>

typedef struct diag_src {
    char *file;
    char *text;
    size_t len;
} diag_src;

struct diag_ctx {
    FILE *out;
    int max_errors;
    int errors;
    int suppressed;       /* the "too many errors" line was printed */
    int last_printed;     /* the last error was printed, so its notes are too */
    diag_src *srcs;
    int nsrcs;
};

diag_ctx *diag_new(FILE *out, int max_errors)
{
    diag_ctx *d = calloc(1, sizeof *d);
    if (!d)
        abort();
    d->out = out;
    d->max_errors = max_errors > 0 ? max_errors : 20;
    return d;
}

void diag_free(diag_ctx *d)
{
    if (!d)
        return;
    for (int i = 0; i < d->nsrcs; i++) {
        free(d->srcs[i].file);
        free(d->srcs[i].text);
    }
    free(d->srcs);
    free(d);
}

void diag_add_source(diag_ctx *d, const char *file, const char *text, size_t len)
{
    diag_src *s = realloc(d->srcs, (size_t)(d->nsrcs + 1) * sizeof *s);
    if (!s)
        abort();
    d->srcs = s;
    s = &d->srcs[d->nsrcs++];
    s->file = strdup(file);
    s->text = malloc(len + 1);
    if (!s->file || !s->text)
        abort();
    memcpy(s->text, text, len);
    s->text[len] = 0;
    s->len = len;
}

/* Finds line `line` of `file`; returns its start and sets *n to its length. */
static const char *diag_line(const diag_ctx *d, const char *file, int line, int *n)
{
    for (int i = d->nsrcs - 1; i >= 0; i--) {
        if (strcmp(d->srcs[i].file, file) != 0)
            continue;
        const char *p = d->srcs[i].text, *end = p + d->srcs[i].len;
        for (int l = 1; l < line && p < end; l++) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            if (!nl)
                return NULL;
            p = nl + 1;
        }
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        *n = (int)((nl ? nl : end) - p);
        return p;
    }
    return NULL;
}

static void diag_show(diag_ctx *d, diag_span at)
{
    int n = 0;
    const char *line = at.file && at.line > 0 ? diag_line(d, at.file, at.line, &n) : NULL;
    if (!line)
        return;
    fprintf(d->out, "%5d | %.*s\n      | ", at.line, n, line);
    int col = at.col > 0 ? at.col : 1;
    int end = at.end_line == at.line && at.end_col >= col ? at.end_col : col;
    if (at.end_line > at.line)
        end = n > col ? n : col;   /* a multi-line span: underline to the end of the first line */
    /* keep tabs so the caret lines up under tab-indented source */
    for (int i = 1; i < col; i++)
        fputc(i - 1 < n && line[i - 1] == '\t' ? '\t' : ' ', d->out);
    fputc('^', d->out);
    for (int i = col + 1; i <= end; i++)
        fputc('~', d->out);
    fputc('\n', d->out);
}

static void diag_head(diag_ctx *d, diag_span at, const char *kind)
{
    if (at.file && at.line > 0)
        fprintf(d->out, "%s:%d:%d: %s: ", at.file, at.line, at.col > 0 ? at.col : 1, kind);
    else if (at.file)
        fprintf(d->out, "%s: %s: ", at.file, kind);
    else
        fprintf(d->out, "moec: %s: ", kind);
}

void diag_verror(diag_ctx *d, diag_span at, const char *hint, const char *fmt, va_list ap)
{
    d->errors++;
    d->last_printed = 0;
    if (d->errors > d->max_errors) {
        if (!d->suppressed)
            fprintf(d->out, "moec: too many errors (%d), stopping\n", d->max_errors);
        d->suppressed = 1;
        return;
    }
    d->last_printed = 1;
    diag_head(d, at, "error");
    vfprintf(d->out, fmt, ap);
    fputc('\n', d->out);
    diag_show(d, at);
    if (hint && *hint)
        fprintf(d->out, "  hint: %s\n", hint);
}

void diag_error(diag_ctx *d, diag_span at, const char *hint, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    diag_verror(d, at, hint, fmt, ap);
    va_end(ap);
}

void diag_note(diag_ctx *d, diag_span at, const char *fmt, ...)
{
    if (!d->last_printed)
        return;
    diag_head(d, at, "note");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(d->out, fmt, ap);
    va_end(ap);
    fputc('\n', d->out);
    diag_show(d, at);
}

void diag_plain(diag_ctx *d, const char *fmt, ...)
{
    d->errors++;
    fprintf(d->out, "moec: error: ");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(d->out, fmt, ap);
    va_end(ap);
    fputc('\n', d->out);
}

int diag_count(const diag_ctx *d) { return d->errors; }
int diag_full(const diag_ctx *d) { return d->errors >= d->max_errors; }

int diag_edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 64 || lb > 64)
        return 99;
    int row[65];
    for (size_t j = 0; j <= lb; j++)
        row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

const char *diag_closest(const char *name, const char *const *cands, int n)
{
    int limit = (int)strlen(name) / 3;
    if (limit < 1)
        limit = 1;
    if (limit > 3)
        limit = 3;
    const char *best = NULL;
    int bestd = limit + 1;
    for (int i = 0; i < n; i++) {
        if (!cands[i] || strcmp(cands[i], name) == 0)
            continue;
        int dd = diag_edit_distance(name, cands[i]);
        if (dd < bestd) {
            bestd = dd;
            best = cands[i];
        }
    }
    return best;
}
