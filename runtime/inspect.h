/* inspect.h - `run --inspect plan.bin`: print a validated plan readably. */
#ifndef MOEC_INSPECT_H
#define MOEC_INSPECT_H

#include <stdio.h>

#include "plan_load.h"

void inspect_plan(const plan_file *pf, FILE *out);

#endif
