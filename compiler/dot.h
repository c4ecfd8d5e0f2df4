/* dot.h - `moec --dot`: the final graph (forward, backward and optimizer
 * ops after every pass) as a Graphviz digraph. */
#ifndef MOEC_DOT_H
#define MOEC_DOT_H

#include <stdio.h>

#include "ir.h"

/* Ops are ellipses coloured by phase (forward blue, backward orange,
 * optimizer green); parameters are yellow boxes and other tensors nobody
 * computes (inputs, optimizer state) grey boxes; every tensor an op reads is
 * an edge from its last writer, labelled with its dtype and shape.  An
 * optimizer op that updates a parameter in place gets a dashed edge back to
 * the parameter's box.  Stable output (golden-tested). */
void dot_write(const ir_graph *g, FILE *out);

#endif
