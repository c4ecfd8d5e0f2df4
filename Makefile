# moec: `make` builds ./moec, ./run and the kernel libraries; `make test` runs
# every test and ends with "N passed, N failed"; `make deps` installs the
# Debian packages the build and the tests need.
CC      ?= gcc
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
BUILD   ?= build
PREFIX  ?= /usr/local
OPT     ?= -O2
SAN     ?=
CFLAGS  += -std=c11 -D_GNU_SOURCE $(OPT) -g -Wall -Wextra -Werror -fPIC $(SAN)
LDFLAGS += $(SAN)
OPENBLAS_CFLAGS := $(shell pkg-config --cflags openblas 2>/dev/null)
OPENBLAS_LIBS   := $(shell pkg-config --libs openblas 2>/dev/null || echo -lopenblas)

LANG_SRC     := $(filter-out lang/lexer.c lang/parser.c,$(wildcard lang/*.c))
COMPILER_SRC := $(filter-out compiler/main.c,$(wildcard compiler/*.c))
RUNTIME_SRC  := $(filter-out runtime/main.c,$(wildcard runtime/*.c))
KCPU_SRC     := $(wildcard kernels/cpu/*.c)
KCUDA_SRC    := $(wildcard kernels/cuda/*.cu)
TEST_SRC     := $(wildcard tests/unit/*.c)

LANG_OBJ     := $(LANG_SRC:%.c=$(BUILD)/%.o) $(BUILD)/lang/parser.o $(BUILD)/lang/lexer.o
COMPILER_OBJ := $(COMPILER_SRC:%.c=$(BUILD)/%.o)
RUNTIME_OBJ  := $(RUNTIME_SRC:%.c=$(BUILD)/%.o)
KCPU_OBJ     := $(KCPU_SRC:%.c=$(BUILD)/%.o)
TEST_BIN     := $(TEST_SRC:tests/unit/%.c=$(BUILD)/tests/%)

HOST_LIBS := -lffi -ldl -lm -lpthread

.PHONY: all deps test test-asan install clean cuda
all: moec run $(BUILD)/libmoek_cpu.so cuda $(TEST_BIN) $(BUILD)/data/default.txt

# The embedded default corpus: real English text every Debian system ships
# (base-files' licence texts), so `./run plan.bin` works with no download.
LICENSE_TEXTS := $(wildcard $(addprefix /usr/share/common-licenses/,Apache-2.0 Artistic BSD CC0-1.0 GFDL-1.3 GPL-1 GPL-2 GPL-3 LGPL-2.1 LGPL-3 MPL-2.0))
$(BUILD)/data/default.txt: $(LICENSE_TEXTS)
	@mkdir -p $(dir $@)
	@test -n "$(LICENSE_TEXTS)" || { echo "no /usr/share/common-licenses: install Debian's base-files" >&2; exit 1; }
	cat $^ > $@

deps:
	bash scripts/setup

# --- front end (generated sources live in the build folder) -------------
$(BUILD)/lang/parser.c $(BUILD)/lang/parser.h: lang/parser.y
	@mkdir -p $(dir $@)
	bison -Wall -Werror --defines=$(BUILD)/lang/parser.h -o $(BUILD)/lang/parser.c $<
$(BUILD)/lang/lexer.c $(BUILD)/lang/lexer.h: lang/lexer.l $(BUILD)/lang/parser.h
	@mkdir -p $(dir $@)
	flex --header-file=$(BUILD)/lang/lexer.h -o $(BUILD)/lang/lexer.c $<
# flex/bison output is not ours to lint: relax only what they trip
$(BUILD)/lang/parser.o $(BUILD)/lang/lexer.o: %.o: %.c
	$(CC) $(CFLAGS) -Wno-unused-function -Wno-sign-compare -Wno-unused-parameter -Ilang -I$(BUILD)/lang -c $< -o $@
$(BUILD)/lang/%.o: lang/%.c $(BUILD)/lang/parser.h $(BUILD)/lang/lexer.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ilang -I$(BUILD)/lang -MMD -MP -c $< -o $@

$(BUILD)/compiler/%.o: compiler/%.c $(BUILD)/lang/parser.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ilang -I$(BUILD)/lang -MMD -MP -c $< -o $@
$(BUILD)/runtime/%.o: runtime/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@
$(BUILD)/kernels/cpu/%.o: kernels/cpu/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fopenmp $(OPENBLAS_CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libmoec_front.a: $(LANG_OBJ) $(COMPILER_OBJ)
	ar rcs $@ $^
$(BUILD)/libmoec_runtime.a: $(RUNTIME_OBJ)
	ar rcs $@ $^
$(BUILD)/libmoek_cpu.a: $(KCPU_OBJ)
	ar rcs $@ $^

# The two programs live at the top level (moec model.moe && ./run plan.bin);
# a sanitizer build puts its own pair in its build folder instead.
MOEC_BIN ?= moec
RUN_BIN  ?= run
ifneq ($(MOEC_BIN),moec)
.PHONY: moec run
moec: $(MOEC_BIN)
run: $(RUN_BIN)
$(MOEC_BIN): $(BUILD)/compiler/main.o $(BUILD)/libmoec_front.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ -lm
$(RUN_BIN): $(BUILD)/runtime/main.o $(BUILD)/libmoec_runtime.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -rdynamic -o $@ $^ $(HOST_LIBS)
else
moec: $(BUILD)/compiler/main.o $(BUILD)/libmoec_front.a
	$(CC) $(LDFLAGS) -o $@ $^ -lm
run: $(BUILD)/runtime/main.o $(BUILD)/libmoec_runtime.a
	$(CC) $(LDFLAGS) -rdynamic -o $@ $^ $(HOST_LIBS)
endif

$(BUILD)/libmoek_cpu.so: $(KCPU_OBJ)
	$(CC) $(LDFLAGS) -shared -fopenmp -o $@ $^ $(OPENBLAS_LIBS) -lm

# --- CUDA: built whenever nvcc exists; loaded by ./run only on a GPU ----
NVFLAGS := -O3 -std=c++17 -Xcompiler -fPIC -gencode arch=compute_80,code=sm_80 \
           -gencode arch=compute_90,code=sm_90 -lineinfo
ifneq ($(NVCC),)
ifneq ($(KCUDA_SRC),)
cuda: $(BUILD)/libmoek_cuda.so
KCUDA_OBJ := $(KCUDA_SRC:%.cu=$(BUILD)/%.o)
$(BUILD)/kernels/cuda/%.o: kernels/cuda/%.cu kernels/moek.h $(wildcard kernels/cuda/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@
$(BUILD)/libmoek_cuda.so: $(KCUDA_OBJ)
	$(NVCC) -shared -o $@ $^ -lcublasLt -lcublas -lcudart
endif
endif
cuda:

# --- the CUDA kernels run on the CPU, for the tests (tests/standin/cuemu.h):
# every kernels/cuda/*.cu, rewritten by cuemu.sed, compiled by the host C++
# compiler against stand-ins for the CUDA runtime and cuBLAS into
# $(BUILD)/cuemu/libmoek_cuda.so.  Needs the CUDA headers (not nvcc, not a
# GPU) and x86-64; tests/cli/test_cuda_emulated.sh runs it.
CXX ?= g++
CUDA_RUNTIME_H := $(wildcard $(CUDA_HOME)/include/cuda_runtime.h)
EMU := $(BUILD)/cuemu
ifneq ($(CUDA_RUNTIME_H),)
ifeq ($(shell uname -m),x86_64)
all: $(EMU)/libmoek_cuda.so
EMU_OBJ := $(KCUDA_SRC:kernels/cuda/%.cu=$(EMU)/%.o) $(EMU)/standin_cuemu.o \
           $(EMU)/standin_cudart.o $(EMU)/standin_cublas.o
EMU_HDR := kernels/moek.h $(wildcard kernels/cuda/*.cuh) tests/standin/cuemu.h \
           tests/standin/cuemu_rt.h tests/standin/include/mma.h
.PRECIOUS: $(EMU)/%.cpp
$(EMU)/%.cpp: kernels/cuda/%.cu tests/standin/cuemu.sed
	@mkdir -p $(dir $@)
	sed -f tests/standin/cuemu.sed $< > $@
# -Wno-unknown-pragmas: nvcc's `#pragma unroll`
$(EMU)/%.o: $(EMU)/%.cpp $(EMU_HDR)
	$(CXX) -std=c++17 $(OPT) -g -fPIC -Wall -Wextra -Werror -Wno-unknown-pragmas $(SAN) \
	    -include tests/standin/cuemu.h -Itests/standin/include -Itests/standin -Ikernels/cuda \
	    -I$(CUDA_HOME)/include -c $< -o $@
$(EMU)/standin_%.o: tests/standin/%.c tests/standin/standin.h tests/standin/cuemu_rt.h kernels/moek.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -I$(CUDA_HOME)/include -Itests/standin -c $< -o $@
$(EMU)/libmoek_cuda.so: $(EMU_OBJ)
	$(CXX) $(LDFLAGS) -shared -Wl,-z,defs -o $@ $^ -lpthread
endif
endif

# --- tests: every tests/unit/x.c is a program printing PASS/FAIL/SKIP lines
$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libmoec_front.a $(BUILD)/libmoec_runtime.a $(BUILD)/libmoek_cpu.a $(wildcard tests/unit/*.h) kernels/moek.h runtime/plan.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fopenmp -Ilang -I$(BUILD)/lang -o $@ $< $(BUILD)/libmoec_front.a \
	    $(BUILD)/libmoec_runtime.a $(BUILD)/libmoek_cpu.a $(OPENBLAS_LIBS) $(HOST_LIBS)

test: all
	bash tests/run.sh $(BUILD)

# AddressSanitizer + UBSan build of everything, tests included, in its own folder
test-asan:
	$(MAKE) BUILD=build-asan OPT=-O1 SAN="-fsanitize=address,undefined -fno-omit-frame-pointer" \
	    MOEC_BIN=build-asan/moec RUN_BIN=build-asan/run build-asan/moec build-asan/run \
	    build-asan/libmoek_cpu.so build-asan/data/default.txt $(TEST_SRC:tests/unit/%.c=build-asan/tests/%) \
	    $(COMM_LIBS:$(BUILD)/%=build-asan/%) $(if $(EMU_OBJ),build-asan/cuemu/libmoek_cuda.so)
	MOEC_BUILD=build-asan MOEC=$(CURDIR)/build-asan/moec RUN=$(CURDIR)/build-asan/run \
	    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=fast_unwind_on_malloc=0 \
	    LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 bash tests/run.sh build-asan

install: all
	install -d $(PREFIX)/bin $(PREFIX)/lib/moec $(PREFIX)/share/moec/stdlib
	install -m 755 moec run $(PREFIX)/bin/
	install -m 644 $(BUILD)/libmoek_*.so $(wildcard $(BUILD)/libmoec_comm_*.so) $(PREFIX)/lib/moec/
	install -m 644 stdlib/*.moe $(PREFIX)/share/moec/stdlib/
	install -m 644 $(BUILD)/data/default.txt $(PREFIX)/share/moec/default.txt

clean:
	rm -rf build build-asan moec run plan.bin

# --- kernel micro-benchmark (not a test): make BUILD=... bench-kernels ---
.PHONY: bench-kernels
bench-kernels: $(BUILD)/bench/kernels_cpu
$(BUILD)/bench/kernels_cpu: bench/kernels_cpu.c $(BUILD)/libmoek_cpu.a kernels/moek.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fopenmp -o $@ $< $(BUILD)/libmoek_cpu.a $(OPENBLAS_LIBS) -lm

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

# --- the custom-op example (examples/custom_op): a user kernel library that
# ./run loads for `extern op ... from "libmyops.so"`; built as part of `all`.
all: $(BUILD)/examples/libmyops.so
$(BUILD)/examples/libmyops.so: examples/custom_op/myops.c kernels/moek.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ikernels -shared $(LDFLAGS) -o $@ $<

# --- communication backends (docs/parallel.md): shared libraries that ./run
# dlopens for --comm mpi / nccl, so run itself never links MPI or NCCL.
# Built as part of `all` when mpicc (Open MPI) is found; NCCL when nccl.h is.
MPICC ?= $(shell command -v mpicc 2>/dev/null)
CUDA_HOME ?= /usr/local/cuda
.PHONY: comm-mpi comm-nccl
ifneq ($(MPICC),)
COMM_LIBS += $(BUILD)/libmoec_comm_mpi.so
all: $(BUILD)/libmoec_comm_mpi.so
comm-mpi: $(BUILD)/libmoec_comm_mpi.so
$(BUILD)/libmoec_comm_mpi.so: runtime/comm_backends/mpi.c runtime/comm.h kernels/moek.h
	@mkdir -p $(dir $@)
	OMPI_CC=$(CC) $(MPICC) $(CFLAGS) -shared $(LDFLAGS) -o $@ $<
endif
# NCCL: built with the host compiler against cuda_runtime.h and nccl.h; links
# libnccl and libcudart only (MPI, when used for the bootstrap, is dlopened).
NCCL_H := $(firstword $(wildcard $(CUDA_HOME)/include/nccl.h /usr/include/nccl.h))
ifneq ($(NVCC),)
ifneq ($(NCCL_H),)
COMM_LIBS += $(BUILD)/libmoec_comm_nccl.so
all: $(BUILD)/libmoec_comm_nccl.so
comm-nccl: $(BUILD)/libmoec_comm_nccl.so
$(BUILD)/libmoec_comm_nccl.so: runtime/comm_backends/nccl.c runtime/comm_backends/rendezvous.c \
                               runtime/comm_backends/rendezvous.h runtime/comm.h kernels/moek.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -I$(CUDA_HOME)/include -I$(dir $(NCCL_H)) -shared $(LDFLAGS) -o $@ \
	    runtime/comm_backends/nccl.c runtime/comm_backends/rendezvous.c \
	    -L$(CUDA_HOME)/lib64 -L$(CUDA_HOME)/lib -lnccl -lcudart -lpthread -ldl
endif
endif
comm-nccl:
	@test -f $(BUILD)/libmoec_comm_nccl.so || { echo "comm-nccl: needs nvcc and nccl.h (CUDA_HOME=$(CUDA_HOME))" >&2; exit 1; }
