#!/usr/bin/env bash
# `make install PREFIX=...` gives a working installation: the installed moec
# finds its stdlib, the installed run finds its kernel library and the
# default corpus, from a directory that is not the source tree.
source "$(dirname "$0")/../lib.sh"
BUILD_DIR=${MOEC_BUILD:-build}
if [ "$BUILD_DIR" != build ]; then
    # a sanitizer build's objects need its own flags to link; `make test` covers install
    skip install "installation is tested with the default build (make test), not $BUILD_DIR"
    exit 0
fi
if ! make -s -C "$ROOT" BUILD="$BUILD_DIR" install PREFIX="$TMP/inst" >"$TMP/log" 2>&1; then
    fail install.make "$(tail -3 "$TMP/log")"; exit 0
fi
pass install.make
mkdir -p "$TMP/work" && cd "$TMP/work" || exit 1
cp "$ROOT/examples/tiny_dense.moe" model.moe
sed -i 's/steps = 300/steps = 3/' model.moe
expect_ok install.moec_finds_stdlib "$TMP/inst/bin/moec" model.moe
out=$(OMP_NUM_THREADS=2 "$TMP/inst/bin/run" plan.bin --device cpu 2>&1)
if echo "$out" | grep -q "loaded $TMP/inst/lib/moec/libmoek_cpu.so" && echo "$out" | grep -q '^step 3/3'; then
    pass install.run_trains_on_default_corpus
else
    fail install.run_trains_on_default_corpus "$(echo "$out" | tail -3)"
fi
