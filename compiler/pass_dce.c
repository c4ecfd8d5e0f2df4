/* pass_dce.c - dead-code elimination.
 *
 * A node is dead when nothing reads what it writes: every value it writes
 * is a plain activation (no role, not the loss or logits, not a param,
 * grad or optimizer state) that no live node reads, and it has no other
 * effect (pass_util.h: pu_side_effect).  One sweep from the last node to
 * the first finds them all, because a reader always comes after what it
 * reads: by the time a node is visited, every node that could read its
 * outputs has been decided.  This removes forward ops whose results
 * nothing uses, backward ops whose gradients go nowhere, and with them the
 * gradient work of frozen parameters that autodiff has not already left
 * out.  A backward kernel that writes a wanted and an unwanted gradient
 * (d.<x>.unused) stays: the kernel writes both or neither.
 *
 * Runs at -O1 and -O2 after the optimizer pass (compiler/main.c), so the
 * optimizer's reads of every gradient are known.
 */
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "pass_util.h"
#include "passes.h"

int pass_dce(ir_graph *g, moec_error *err)
{
    (void)err;
    bool *read = calloc((size_t)g->nvalues + 1, sizeof *read);
    bool *live = calloc((size_t)g->nnodes + 1, sizeof *live);
    int *order = malloc(sizeof(int) * ((size_t)g->nnodes + 1));
    if (!read || !live || !order)
        abort();   /* out of memory, as ir_alloc */
    for (int ni = g->nnodes - 1; ni >= 0; ni--) {
        const ir_node *n = &g->nodes[ni];
        int count;
        const ir_ref *t = iop_template(n, &count);
        bool keep = pu_side_effect(g, ni);
        for (int a = 0; a < count && !keep; a++) {
            int v = iop_ref_value(n, &t[a]);
            keep = v >= 0 && v < g->nvalues && pu_writes(n, &t[a]) && read[v];
        }
        if (!keep)
            continue;
        live[ni] = true;
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v >= 0 && v < g->nvalues && pu_reads(n, &t[a]))
                read[v] = true;
        }
    }
    int n = 0;
    for (int ni = 0; ni < g->nnodes; ni++)
        if (live[ni])
            order[n++] = ni;
    if (n != g->nnodes)
        pu_reorder(g, order, n);
    free(read), free(live), free(order);
    return 0;
}
