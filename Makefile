# Two commands do all the set-up (see README):
#   make report   [PROFILE=quick|default|full]   build the environment if needed, render the report
#   make test                                     same environment, run the whole test suite
PROFILE ?= default
PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
TORCH   ?= torch==2.13.0
# Extra arguments for `python -m disentangle.report`, e.g. ARGS="--only 02_orthogonality".
ARGS    ?=

.PHONY: report test test-kernels env benchmarks clean-env

report: $(STAMP)
	$(PY) -m disentangle.report --profile $(PROFILE) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

# The numerics-sensitive tests (cross-path comparisons, known values, bit-identical resume) under each
# of PyTorch's CPU kernel sets this CPU can run: a second machine's vector kernels, without a second
# machine. Not part of `make test`.
KERNEL_TESTS := tests/test_model.py tests/test_constraints.py tests/test_objective.py tests/test_analysis.py tests/test_train.py
test-kernels: $(STAMP)
	@set -e; for cap in default avx2 $$(grep -qw avx512f /proc/cpuinfo && echo avx512); do \
		echo "== ATEN_CPU_CAPABILITY=$$cap: $$(ATEN_CPU_CAPABILITY=$$cap $(PY) -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"; \
		ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest -q -p no:cacheprovider $(KERNEL_TESTS); \
	done

benchmarks: $(STAMP)
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_constraints.py
	$(PY) benchmarks/bench_stack.py
	$(PY) benchmarks/bench_grid.py --step-level

env: $(STAMP)

# Re-run only when pyproject.toml changes, so a second `make test` installs nothing.
# Torch first, so that pip never resolves an unpinned CUDA build through another package:
# a local CPU wheel when pip can see one (this machine), the CPU index on a machine without
# a GPU, the default (CUDA) build where nvidia-smi finds a GPU.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -m pip install -q --dry-run --no-index --no-deps "$(TORCH)" >/dev/null 2>&1 || command -v nvidia-smi >/dev/null 2>&1; then \
		echo "installing $(TORCH)"; $(PY) -m pip install -q "$(TORCH)"; \
	else \
		echo "installing $(TORCH) (CPU build)"; \
		$(PY) -m pip install -q "$(TORCH)" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple; \
	fi
	$(PY) -m pip install -q -e '.[test,cluster]'
	touch $(STAMP)

clean-env:
	rm -rf $(VENV)
