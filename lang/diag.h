/* diag.h - the one place moec prints diagnostics.
 *
 *   file:line:col: error: message
 *      12 |   x = foo(y)
 *         |       ^~~~~~
 *     hint: did you mean `bar`?
 *
 * Sources are registered once (diag_add_source) so any later error can show
 * its line; positions are 1-based.  After `max_errors` errors the context
 * stops printing and says so once. */
#ifndef MOEC_DIAG_H
#define MOEC_DIAG_H

#include <stdarg.h>
#include <stdio.h>

typedef struct diag_span {
    const char *file;   /* display path; NULL = no location */
    int line, col;      /* 1-based start */
    int end_line, end_col; /* inclusive end; end_col < col means width 1 */
} diag_span;

typedef struct diag_ctx diag_ctx;

diag_ctx *diag_new(FILE *out, int max_errors);
void diag_free(diag_ctx *d);
/* The context keeps its own copy of text. */
void diag_add_source(diag_ctx *d, const char *file, const char *text, size_t len);

/* An error; `hint` may be NULL. Further lines may follow via diag_note. */
void diag_error(diag_ctx *d, diag_span at, const char *hint, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void diag_verror(diag_ctx *d, diag_span at, const char *hint, const char *fmt, va_list ap);
/* A note attached to the last error (another place involved). */
void diag_note(diag_ctx *d, diag_span at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* A usage error without a location: "moec: error: ..." */
void diag_plain(diag_ctx *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

int diag_count(const diag_ctx *d);
/* True once max_errors errors were reported (callers may stop early). */
int diag_full(const diag_ctx *d);

/* Levenshtein distance, capped work; used for "did you mean". */
int diag_edit_distance(const char *a, const char *b);
/* Picks the closest candidate (distance <= max(1, len/3)); NULL if none. */
const char *diag_closest(const char *name, const char *const *cands, int n);

#endif
