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
OPT       ?= -O2
CFLAGS    ?= $(OPT) -g
ALL_CFLAGS = -std=c17 -D_GNU_SOURCE $(CFLAGS) $(WARN) -fopenmp -march=x86-64-v2 \
             $(shell pkg-config --cflags $(PKGS) 2>/dev/null) \
             $(shell PKG_CONFIG_PATH=$(BLAS_DIR)/pkgconfig pkg-config --cflags openblas 2>/dev/null) \
             -I. -MMD -MP
LDLIBS     = $(shell pkg-config --libs $(PKGS) 2>/dev/null) \
             -L$(BLAS_DIR) -Wl,-rpath,$(BLAS_DIR) -lopenblas -fopenmp -lm
LDFLAGS   ?=

LIB_DIRS  := dist model parallel ckpt launch
LIB_SRC   := $(filter-out launch/main.c,$(foreach d,$(LIB_DIRS),$(wildcard $(d)/*.c)))
LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/%.o)
TEST_SRC  := $(wildcard tests/test_*.c)
TEST_BIN  := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TEST_COMMON := $(filter-out $(TEST_SRC),$(wildcard tests/*.c))
TEST_COMMON_OBJ := $(TEST_COMMON:%.c=$(BUILD)/%.o)

.PHONY: all deps test run bench asan install clean
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

asan:
	$(MAKE) BUILD=build-asan OPT=-O1 \
	  CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer" \
	  LDFLAGS="-fsanitize=address,undefined" all
	ASAN_OPTIONS=detect_leaks=0 bash tests/run.sh build-asan

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/vdist/configs
	install -m 755 $(BUILD)/vdist $(DESTDIR)$(PREFIX)/bin/vdist
	install -m 644 configs/*.ini $(DESTDIR)$(PREFIX)/share/vdist/configs/

clean:
	rm -rf build build-asan

-include $(LIB_OBJ:.o=.d) $(BUILD)/launch/main.d $(TEST_BIN:=.d) $(TEST_COMMON_OBJ:.o=.d)
