# Each target sets itself up: a virtual environment in .venv, the project
# installed editable with its test extra (which compiles emu/_native.c and
# guestkernel/page_alloc/_cbuddy.c).
# `make test` also installs, as root, the Debian packages the real-kernel
# tests need (qemu-system-x86, busybox-static, cpio; libelf1 for the kernels'
# objtool, which builds the project's guest module); without root they skip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEBS   := qemu-system-x86 busybox-static cpio libelf1

.PHONY: demo test bench realkernel-deps reference-traces truth-states clean

$(STAMP): pyproject.toml setup.py emu/_native.c guestkernel/page_alloc/_cbuddy.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

realkernel-deps:
	@if [ "$$(id -u)" = 0 ] && { ! command -v qemu-system-x86_64 >/dev/null || \
	    ! ldconfig -p | grep -q 'libelf\.so\.1 '; }; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $(DEBS) >/dev/null; fi

# The policies on a real kernel's recorded stream (Linux 6.1, 2 GiB: modules,
# 256 BPF programs, 512 secret pages), model placement: ~10 s.
DEMO_TRACE := tests/data/traces/linux-6.1-2G-modules_bpf-256_secretmem-512.jsonl.gz
demo: $(STAMP)
	$(PY) -m dmfrag.cli compare --trace $(DEMO_TRACE) --policies all --csv compare.csv --plots plots

# Two workers (pytest-xdist), each taking whole test files, so a file's
# module fixtures (a boot, a recording) are made once; JOBS=1 runs in one.
JOBS ?= 2
test: $(STAMP) realkernel-deps
	$(PY) -m pytest -q -n $(JOBS) --dist loadscope --durations=25

# `make bench BENCH_FLAGS=--smoke` runs each script at its tiny size (what
# tests/test_bench.py checks in `make test`); `BENCH_FLAGS=--json` for figures.
BENCH_FLAGS ?=
bench: $(STAMP)
	$(PY) bench/emu_bench.py $(BENCH_FLAGS)
	$(PY) bench/tlb.py $(BENCH_FLAGS)
	$(PY) bench/kernel_bench.py $(BENCH_FLAGS)
	$(PY) bench/page_alloc_bench.py $(BENCH_FLAGS)
	$(PY) bench/validate_bench.py $(BENCH_FLAGS)
	$(PY) bench/realkernel_bench.py $(BENCH_FLAGS)
	$(PY) bench/truth_bench.py $(BENCH_FLAGS)
	$(PY) bench/placement_bench.py $(BENCH_FLAGS)
	$(PY) bench/policies_report.py $(BENCH_FLAGS)
	$(PY) bench/tlbcost_bench.py $(BENCH_FLAGS)
	$(PY) bench/tlbcost_report.py $(BENCH_FLAGS)

# Record the reference traces again on the real kernels (QEMU; each boot one
# task of the sweep engine, in parallel on this machine's cores).
reference-traces: $(STAMP) realkernel-deps
	$(PY) -m dmfrag.cli realkernel record --grid tests/data/traces/reference.toml -o tests/data/traces

# The recordings with the real kernels' whole state at each snapshot (memory
# dumps read with drgn; each kernel's debug vmlinux is fetched once, ~1 GB).
truth-states: $(STAMP) realkernel-deps
	$(PY) -m dmfrag.cli realkernel record --grid tests/data/truth/truth.toml -o tests/data/truth --truth
	$(PY) -m dmfrag.cli realkernel record --grid tests/data/truth/8g/truth.toml -o tests/data/truth/8g --truth

clean:
	rm -rf $(VENV) build *.egg-info emu/*.so guestkernel/page_alloc/*.so .pytest_cache .hypothesis
