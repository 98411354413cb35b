# pact-ray: the two set-up commands are `make run` (install + the main sweep) and `make test`
# (install + the test suite). Both create .venv on first use; later calls reuse it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The CPU build of torch where there is no GPU: 2.13.0 is pinned so that pip never
# replaces it with a newer (CUDA) release; pyproject's range admits 2.13.x only.
TORCH  ?= torch==2.13.0

export PYTHONUNBUFFERED := 1

.PHONY: install browser run test test-kernels test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]" "$(TORCH)"
	$(PY) -m pact_ray.ot.preload  # compiles the OT kernel into numba's cache (once, ~4 s)
	# Bytecode for the project's own modules, as pip writes it for every installed package: an
	# editable install leaves that to the first import, which PYTHONDONTWRITEBYTECODE=1 forbids,
	# and every process of a sweep (the driver, each worker) would compile them again (0.2 s).
	$(PY) -m compileall -q pact_ray
	touch $(STAMP)

# Headless Chromium (Debian's package) for the tests that screenshot the HTML reports.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

# The main job: every router variant, quick profile, small preset, local Ray, ./mlflow.db.
run: install
	$(PY) sweeps/stage1_router.py $(ARGS)

# The numerical test files run a second time under another of torch's CPU kernel sets, which
# changes vector widths and reduction orders as another CPU does, so that a tolerance that
# holds only on this CPU fails here, not on the next machine (tests/README.md). AVX2 where this
# CPU has more, the plain kernels where AVX2 is its best. The bf16 tests are left out: forcing
# a kernel set on a host with AVX512-BF16 makes torch's bf16 CPU attention fail inside torch
# ("pack_vnni2 is only supported when avx512 is supported"), which no real CPU does.
NUMERICAL_TESTS := tests/test_stage1_model.py tests/test_stage2.py tests/test_sparse_conv.py tests/test_sinkhorn.py \
                   tests/test_router.py tests/test_edges.py tests/test_world_model.py tests/test_dinov2.py
OTHER_KERNELS = $(shell $(PY) -c "import torch; print('default' if torch.backends.cpu.get_cpu_capability() in ('AVX2', 'DEFAULT') else 'avx2')")

# The golden tests' rounding bounds (a float64 computation, the same under both kernel sets)
# are computed once and kept for the second pass (tests/numerics.py: float32_error_bound).
test: install browser
	cache=$$(mktemp -d) && trap 'rm -rf "$$cache"' EXIT && \
	PACT_RAY_BOUND_CACHE=$$cache $(PY) -m pytest -q --timeout=900 $(PYTEST_ARGS) && \
	PACT_RAY_BOUND_CACHE=$$cache ATEN_CPU_CAPABILITY=$(OTHER_KERNELS) $(PY) -m pytest -q --timeout=900 -m "not slow" -k "not bf16" $(NUMERICAL_TESTS)

# The second pass alone (about 80 s on 2 cores).
test-kernels: install
	ATEN_CPU_CAPABILITY=$(OTHER_KERNELS) $(PY) -m pytest -q --timeout=900 -m "not slow" -k "not bf16" $(NUMERICAL_TESTS)

# Skips the tests that start Ray sweeps.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_sinkhorn.py --out bench/results/sinkhorn_cpu.json
	$(PY) bench/bench_ot_convergence.py --out bench/results/ot_convergence_cpu.json
	$(PY) bench/bench_router_block.py --out bench/results/router_block_cpu.json
	$(PY) bench/bench_sweep.py --out bench/results/sweep_cpu.json
	$(PY) bench/bench_stage2.py --out bench/results/stage2_cpu.json
	$(PY) bench/bench_summary.py --out bench/results/summary_cpu.json
	$(PY) bench/bench_world_model.py --out bench/results/world_model_cpu.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
