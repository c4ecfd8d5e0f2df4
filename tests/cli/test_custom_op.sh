#!/usr/bin/env bash
# The custom-op example (examples/custom_op): a user kernel library loaded
# through `extern op ... from "libmyops.so"`.  Checks its backward against
# central finite differences, that the model using it trains (the loss in the
# metrics JSONL falls), and the errors for a library that is not allowed and
# for a symbol the library lacks.
source "$(dirname "$0")/../lib.sh"
EX=$ROOT/examples/custom_op
DATA=$SHARED_DATA/tinyshakespeare.txt
if [ ! -x "$MOEC" ] || [ ! -x "$RUN" ]; then
    skip custom_op "build ./moec and ./run first (make)"; exit 0
fi
CC=${CC:-cc}
if ! command -v "$CC" >/dev/null; then skip custom_op "no C compiler"; exit 0; fi
[ -f "$DATA" ] || DATA=$TMP/data.txt
[ -f "$DATA" ] || cat "$ROOT"/README.md "$ROOT"/docs/*.md > "$DATA"

# The library `make` built; else build it here from the same source.
LIB=""
for b in ${MOEC_BUILD:-} build build-ex; do
    if [ -f "$ROOT/$b/examples/libmyops.so" ] && [ "$ROOT/$b/examples/libmyops.so" -nt "$EX/myops.c" ]; then
        LIB=$ROOT/$b/examples/libmyops.so; break
    fi
done
if [ -z "$LIB" ]; then
    LIB=$TMP/lib/libmyops.so; mkdir -p "$TMP/lib"
    "$CC" -std=c11 -O2 -Wall -Wextra -Werror -fPIC -shared -I"$ROOT/kernels" -o "$LIB" "$EX/myops.c" ||
        { fail custom_op.build "cannot compile $EX/myops.c"; exit 0; }
fi
LIBDIR=$(dirname "$LIB")

# --- 1. the kernel: forward values and backward vs central differences ----
cat > "$TMP/gradcheck.c" <<'EOF'
/* Loads libmyops.so, checks my_sqrelu_fwd on known values and
 * my_sqrelu_bwd against central differences of L = sum(w * fwd(x)). */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "moek.h"
typedef void (*fwd_fn)(const moek_ctx *, const float *, float *, int64_t);
typedef void (*bwd_fn)(const moek_ctx *, const float *, const float *, float *, int64_t);
#define N 257
static double loss(fwd_fn f, const moek_ctx *c, const float *x, const float *w)
{
    float y[N];
    f(c, x, y, N);
    double s = 0;
    for (int i = 0; i < N; i++) s += (double)w[i] * y[i];
    return s;
}
int main(int argc, char **argv)
{
    void *h = dlopen(argv[argc - 1], RTLD_NOW);
    if (!h) { printf("FAIL custom_op.dlopen: %s\n", dlerror()); return 0; }
    fwd_fn f = (fwd_fn)dlsym(h, "my_sqrelu_fwd");
    bwd_fn b = (bwd_fn)dlsym(h, "my_sqrelu_bwd");
    if (!f || !b) { printf("FAIL custom_op.symbols: my_sqrelu_fwd/bwd missing\n"); return 0; }
    int status = 0;
    moek_ctx c = {0};
    c.status = &status;
    float kx[4] = {-1.5f, 0.0f, 0.5f, 2.0f}, ky[4], want[4] = {0, 0, 0.25f, 4.0f};
    f(&c, kx, ky, 4);
    int ok = 1;
    for (int i = 0; i < 4; i++) ok &= ky[i] == want[i];
    if (ok) printf("PASS custom_op.forward_values\n");
    else printf("FAIL custom_op.forward_values: got %g %g %g %g, want 0 0 0.25 4\n", ky[0], ky[1], ky[2], ky[3]);
    /* random inputs kept 0.05 away from the kink, so x +- h stays on one side */
    float x[N], w[N], dx[N];
    srand(7);
    for (int i = 0; i < N; i++) {
        float u = 4.0f * rand() / (float)RAND_MAX - 2.0f;
        x[i] = u >= 0 ? u + 0.05f : u - 0.05f;
        w[i] = 2.0f * rand() / (float)RAND_MAX - 1.0f;
    }
    b(&c, w, x, dx, N);
    const float h_ = 1e-2f;
    double worst = 0;
    int at = 0;
    for (int i = 0; i < N; i++) {
        float keep = x[i];
        x[i] = keep + h_; double lp = loss(f, &c, x, w);
        x[i] = keep - h_; double lm = loss(f, &c, x, w);
        x[i] = keep;
        double num = (lp - lm) / (2.0 * h_);
        double err = fabs(num - dx[i]) / fmax(1e-3, fabs(num));
        if (err > worst) { worst = err; at = i; }
    }
    if (worst < 1e-3 && status == 0) printf("PASS custom_op.backward_fd\n");
    else printf("FAIL custom_op.backward_fd: relative error %g at %d (x %g, analytic %g), status %d\n",
                worst, at, x[at], dx[at], status);
    return 0;
}
EOF
if "$CC" -std=c11 -O1 -Wall -Wextra -Werror -I"$ROOT/kernels" -o "$TMP/gradcheck" "$TMP/gradcheck.c" -ldl -lm; then
    "$TMP/gradcheck" "$LIB"
else
    fail custom_op.gradcheck_build "cannot compile the gradient-check harness"
fi

# --- 2. the model trains (plan next to the library's copy, no --allow-lib) -
mkdir -p "$TMP/ok"
cp "$LIB" "$TMP/ok/libmyops.so"
out=$("$MOEC" "$EX/model.moe" -o "$TMP/ok/plan.bin" 2>&1)
if [ $? -eq 0 ]; then pass custom_op.compile; else fail custom_op.compile "$out"; fi
out=$("$RUN" "$TMP/ok/plan.bin" --data "$DATA" --steps 20 --metrics "$TMP/ok/m.jsonl" \
      --checkpoint "$TMP/ok/ck.safetensors" 2>&1); rc=$?
if [ $rc -eq 0 ] && echo "$out" | grep -q "^run: user library: loaded $TMP/ok/libmyops.so$"; then
    pass custom_op.train_loads_lib; else fail custom_op.train_loads_lib "exit $rc: $(echo "$out" | tail -5)"; fi
# the mean loss of steps 18-20 must be at least 1.0 below step 1's (about 5.6
# at random init for 256 bytes; about 3.5 after 20 steps)
verdict=$(awk -F'"loss":' 'NF > 1 { split($2, a, ","); l[++n] = a[1] }
    END { if (n != 20) { print "bad: " n " metric lines"; exit }
          tail = (l[18] + l[19] + l[20]) / 3
          printf "%s first %.4f last3 %.4f\n", (tail < l[1] - 1.0 ? "ok" : "bad"), l[1], tail }' "$TMP/ok/m.jsonl")
case $verdict in
    ok*) pass custom_op.loss_falls ;;
    *) fail custom_op.loss_falls "$verdict" ;;
esac

# -O0 and -O2 (the default) train the same: 5 steps, losses and checkpoint bit for bit
"$MOEC" -O0 "$EX/model.moe" -o "$TMP/ok/plan_o0.bin" >/dev/null 2>&1
for o in o0 o2; do
    plan=$TMP/ok/plan_$o.bin
    [ $o = o2 ] && plan=$TMP/ok/plan.bin
    "$RUN" "$plan" --data "$DATA" --steps 5 -q --metrics "$TMP/ok/$o.jsonl" \
        --checkpoint "$TMP/ok/$o.st" >/dev/null 2>&1
done
l0=$(grep -o '"loss":[^,]*' "$TMP/ok/o0.jsonl" 2>/dev/null | tr '\n' ' ')
l2=$(grep -o '"loss":[^,]*' "$TMP/ok/o2.jsonl" 2>/dev/null | tr '\n' ' ')
if [ "$(grep -c loss "$TMP/ok/o0.jsonl" 2>/dev/null)" = 5 ] && [ "$l0" = "$l2" ] &&
   cmp -s "$TMP/ok/o0.st" "$TMP/ok/o2.st"; then
    pass custom_op.same_training_O0_O2
else
    fail custom_op.same_training_O0_O2 "-O0 $l0 / -O2 $l2"
fi

# the same plan with the library elsewhere, allowed with --allow-lib
mkdir -p "$TMP/plans"
cp "$TMP/ok/plan.bin" "$TMP/plans/plan.bin"
expect_ok custom_op.allow_lib "$RUN" "$TMP/plans/plan.bin" --allow-lib "$LIBDIR" --data "$DATA" \
    --steps 1 --metrics "" --checkpoint "$TMP/plans/ck.safetensors"

# --- 3. errors --------------------------------------------------------------
# not next to the plan and not allowed: names the library and --allow-lib
expect_fail custom_op.lib_not_found \
    '^run: .*user library libmyops\.so not found next to the plan \(.*/plans\) or in .*; put it there or pass --allow-lib DIR' \
    "$RUN" "$TMP/plans/plan.bin" --data "$DATA" --steps 1 --metrics ""
# a symlink beside the plan to a library in a directory not allowed
ln -s "$LIB" "$TMP/plans/libmyops.so"
expect_fail custom_op.lib_not_allowed \
    "^run: .*user library libmyops\.so \(found as .*libmyops\.so\) is outside the allowed directories; move it next to the plan or pass --allow-lib $LIBDIR\$" \
    "$RUN" "$TMP/plans/plan.bin" --data "$DATA" --steps 1 --metrics ""

# a symbol the library does not export: names symbol, library and .moe line
mkdir -p "$TMP/bad"
cp "$LIB" "$TMP/bad/libmyops.so"
cat > "$TMP/bad/bad.moe" <<'EOF'
import "nn"
extern op sqrelu2(x: f32[*N]) -> (y: f32[*N]) from "libmyops.so" {
  forward  = my_sqrelu_fwd_v2(x, y, N)
  backward = my_sqrelu_bwd(dy, x, dx, N)
}
config { vocab = 256  d = 32  seq = 16 }
model bad(tokens: i32[B, seq], targets: i32[B, seq]) {
  x = embedding(tokens, vocab, d, name = "embed")
  logits = linear(sqrelu2(x), vocab, name = "head")
  return cross_entropy(logits, targets), logits
}
train { batch = 2  steps = 2  precision = fp32 }
EOF
out=$("$MOEC" "$TMP/bad/bad.moe" -o "$TMP/bad/plan.bin" 2>&1)
if [ $? -eq 0 ]; then pass custom_op.bad_compiles; else fail custom_op.bad_compiles "$out"; fi
expect_fail custom_op.missing_symbol \
    '^run: .*kernel my_sqrelu_fwd_v2 not found in libmyops\.so, needed by op [0-9]+ \(.*, .*bad\.moe:9:[0-9]+\); rebuild the library or fix the extern op' \
    "$RUN" "$TMP/bad/plan.bin" --data "$DATA" --steps 1 --metrics ""
