# vdist build. `make` builds build/vdist; `make run` trains configs/small.ini on the
# embedded synthetic dataset; `make test` runs every CUnit suite (MPI ones under mpirun).
# Targets that compile first run `deps`, which installs missing Debian packages.

PREFIX    ?= /usr/local
BUILD     ?= build
CC        ?= gcc
MPIRUN    ?= mpirun --allow-run-as-root --oversubscribe --bind-to none

# The OpenMP build of OpenBLAS shares the OpenMP runtime with our own kernels, so BLAS
# called inside our parallel regions runs single-threaded instead of oversubscribing.
BLAS_DIR  := /usr/lib/x86_64-linux-gnu/openblas-openmp
PKGS      := mpi-c hwloc libzstd cunit inih jansson
DEB_PKGS  := gcc make pkg-config libopenmpi-dev openmpi-bin libopenblas-openmp-dev \
             libhwloc-dev libzstd-dev libcunit1-dev libinih-dev libjansson-dev

WARN      := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wvla
# `make WERROR=1 ...` (CI) turns every warning into an error; make passes the setting on
# to the builds that `asan` and `fuzz` start.
ifeq ($(WERROR),1)
WARN      += -Werror
endif
OPT       ?= -O2
CFLAGS    ?= $(OPT) -g
ALL_CFLAGS = -std=c17 -D_GNU_SOURCE $(CFLAGS) $(WARN) -fopenmp -march=x86-64-v2 \
             $(shell pkg-config --cflags $(PKGS) 2>/dev/null) \
             $(shell PKG_CONFIG_PATH=$(BLAS_DIR)/pkgconfig pkg-config --cflags openblas 2>/dev/null) \
             -I. -MMD -MP
LDLIBS     = $(shell pkg-config --libs $(PKGS) 2>/dev/null) \
             -L$(BLAS_DIR) -Wl,-rpath,$(BLAS_DIR) -lopenblas -fopenmp -lm
LDFLAGS   ?=

LIB_DIRS  := base dist model parallel ckpt launch
LIB_SRC   := $(filter-out launch/main.c,$(foreach d,$(LIB_DIRS),$(wildcard $(d)/*.c)))
LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/%.o)
TEST_SRC  := $(wildcard tests/test_*.c)
TEST_BIN  := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TEST_COMMON := $(filter-out $(TEST_SRC),$(wildcard tests/*.c))
TEST_COMMON_OBJ := $(TEST_COMMON:%.c=$(BUILD)/%.o)

.PHONY: all deps test run bench asan install clean
# Keep the test objects: make would otherwise delete them as intermediates after linking.
.PRECIOUS: $(BUILD)/%.o
all: deps $(BUILD)/vdist $(TEST_BIN)

# Installs only what is missing; a no-op on a machine that has everything.
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(BUILD)/libvdist.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/vdist: $(BUILD)/launch/main.o $(BUILD)/libvdist.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: $(BUILD)/tests/%.o $(TEST_COMMON_OBJ) $(BUILD)/libvdist.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

test: all
	bash tests/run.sh $(BUILD)

# The default job: configs/small.ini on the embedded synthetic dataset (vocab 256).
run: all
	@mkdir -p runs/small
	$(BUILD)/vdist data synth runs/synth.bin
	$(BUILD)/vdist train --config configs/small.ini

# configs/bench.ini on 1 rank with 2 threads (a 1-step warm-up is excluded from averages).
bench: all
	@mkdir -p runs
	@[ -f runs/synth.bin ] || $(BUILD)/vdist data synth runs/synth.bin
	OMP_NUM_THREADS=2 $(BUILD)/vdist bench --config configs/bench.ini

# Every suite under AddressSanitizer and UBSan, with LeakSanitizer on in the suites and in
# every program they start (vdist, the MPI ranks). Stacks are unwound the slow way so that
# a leak made inside a library built without frame pointers still shows who called it:
# tests/lsan.supp matches leaks by the function they were made under, and says what it
# lets pass and why.
asan:
	$(MAKE) BUILD=build-asan OPT=-O1 \
	  CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer" \
	  LDFLAGS="-fsanitize=address,undefined" all
	ASAN_OPTIONS=fast_unwind_on_malloc=0 \
	  LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 \
	  bash tests/run.sh build-asan

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/vdist/configs
	install -m 755 $(BUILD)/vdist $(DESTDIR)$(PREFIX)/bin/vdist
	install -m 644 configs/*.ini $(DESTDIR)$(PREFIX)/share/vdist/configs/

clean:
	rm -rf build build-asan

-include $(LIB_OBJ:.o=.d) $(BUILD)/launch/main.d $(TEST_BIN:=.d) $(TEST_COMMON_OBJ:.o=.d)

# ---------------------------------------------------------------- fuzz (begin)
# `make fuzz`: libFuzzer harnesses for the two parsers of untrusted files (tests/fuzz/):
# the safetensors reader and the checkpoint manifest. Built with clang under ASan and UBSan
# into $(BUILD)/fuzz/, from the library sources compiled again with coverage
# instrumentation; each runs FUZZ_TIME seconds on its seed corpus (new inputs go to
# $(BUILD)/fuzz/corpus_*), and the make fails if one finds a crash, a leak, a run over 10 s,
# one allocation over FUZZ_MALLOC_MB (caught with its stack) or a total over FUZZ_RSS_MB;
# the input that did it is left in $(BUILD)/fuzz/artifacts_*/.
FUZZ_CC       ?= clang
FUZZ_DEB_PKGS := clang libclang-rt-dev libomp-dev
FUZZ_BUILD    := $(BUILD)/fuzz
FUZZ_TIME     ?= 20
FUZZ_RSS_MB   ?= 2048
FUZZ_MALLOC_MB ?= 1024
FUZZ_NAMES    := safetensors manifest
FUZZ_BIN      := $(FUZZ_NAMES:%=$(FUZZ_BUILD)/fuzz_%)
FUZZ_LIB_SRC  := $(filter-out launch/%,$(LIB_SRC))
FUZZ_LIB_OBJ  := $(FUZZ_LIB_SRC:%.c=$(FUZZ_BUILD)/obj/%.o)
FUZZ_SAN      := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
FUZZ_CFLAGS    = -std=c17 -D_GNU_SOURCE -O1 -g $(FUZZ_SAN) -fsanitize=fuzzer-no-link -fopenmp \
                 $(WARN) $(shell pkg-config --cflags mpi-c libzstd jansson 2>/dev/null) \
                 $(shell PKG_CONFIG_PATH=$(BLAS_DIR)/pkgconfig pkg-config --cflags openblas 2>/dev/null) \
                 -DFUZZ_SHARD_DIR='"$(CURDIR)/tests/fuzz/shards"' -I. -MMD -MP
FUZZ_LDLIBS    = $(shell pkg-config --libs mpi-c libzstd jansson 2>/dev/null) -fopenmp -lm

.PHONY: fuzz fuzz-build
fuzz:
	@$(MAKE) --no-print-directory deps DEB_PKGS="$(DEB_PKGS) $(FUZZ_DEB_PKGS)"
	@$(MAKE) --no-print-directory fuzz-build
	@for n in $(FUZZ_NAMES); do \
	  mkdir -p $(FUZZ_BUILD)/corpus_$$n $(FUZZ_BUILD)/artifacts_$$n; \
	  echo "== fuzz_$$n for $(FUZZ_TIME) s"; \
	  $(FUZZ_BUILD)/fuzz_$$n -max_total_time=$(FUZZ_TIME) -rss_limit_mb=$(FUZZ_RSS_MB) \
	    -malloc_limit_mb=$(FUZZ_MALLOC_MB) -timeout=10 -print_final_stats=1 -dict=tests/fuzz/$$n.dict \
	    -artifact_prefix=$(FUZZ_BUILD)/artifacts_$$n/ \
	    $(FUZZ_BUILD)/corpus_$$n tests/fuzz/corpus_$$n >$(FUZZ_BUILD)/fuzz_$$n.log 2>&1; \
	  rc=$$?; \
	  if [ $$rc = 0 ]; then grep -E 'INITED|DONE|stat::' $(FUZZ_BUILD)/fuzz_$$n.log; \
	  else tail -n 60 $(FUZZ_BUILD)/fuzz_$$n.log; \
	    echo "fuzz_$$n failed (exit $$rc): log $(FUZZ_BUILD)/fuzz_$$n.log," \
	      "input in $(FUZZ_BUILD)/artifacts_$$n/"; exit 1; fi; \
	done

fuzz-build: $(FUZZ_BIN)
.SECONDARY: $(FUZZ_NAMES:%=$(FUZZ_BUILD)/obj/tests/fuzz/fuzz_%.o)

$(FUZZ_BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

$(FUZZ_BUILD)/libvdist_fuzz.a: $(FUZZ_LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/obj/tests/fuzz/fuzz_%.o $(FUZZ_BUILD)/libvdist_fuzz.a
	$(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer -o $@ $^ $(FUZZ_LDLIBS)

-include $(FUZZ_LIB_OBJ:.o=.d) $(FUZZ_NAMES:%=$(FUZZ_BUILD)/obj/tests/fuzz/fuzz_%.d)
# ---------------------------------------------------------------- fuzz (end)
