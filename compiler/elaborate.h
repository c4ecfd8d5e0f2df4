/* elaborate.h - AST -> forward ir_graph: resolve imports, fold constants,
 * instantiate blocks (hierarchical parameter names), unroll loops, infer
 * every shape and dtype, read train { } and parallel { }. */
#ifndef MOEC_ELABORATE_H
#define MOEC_ELABORATE_H

#include "diag.h"
#include "ir.h"

typedef struct elab_options {
    const char *stdlib_dir;              /* searched last; NULL = none */
    const char *const *include_dirs;     /* -I dirs, searched in order */
    int ninclude;
    const char *moec_path;               /* $MOEC_PATH (colon-separated) or NULL */
    const char *text;                    /* non-NULL: the main file's text (tests) */
    size_t text_len;
} elab_options;

/* Returns the forward graph, or NULL after reporting every error through d. */
ir_graph *elaborate(const char *path, const elab_options *opt, diag_ctx *d);

#endif
