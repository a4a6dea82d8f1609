# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, so the package's torch requirement pulls nothing bigger.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	touch $(STAMP)

.PHONY: venv demo test test-fast gpu-check
venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lowrank demo

test: $(STAMP)
	TRITON_INTERPRET=1 LOWRANK_REQUIRE_CPU_KERNEL=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# On the GPU machine, from a source checkout (no network): every GPU check, test and benchmark
# into one folder. Where one command may run 10 minutes at most, run the parts one per command:
#   make gpu-check GPU_OUT=$OUT/smoke PARTS=smoke   (then tests, kernels, postprocess, suite, logcost)
GPU_OUT ?= bench/results/gpu-$(shell date +%Y%m%d-%H%M%S)
PARTS ?= smoke,tests,kernels,postprocess,suite,logcost
gpu-check:
	python3 -m bench.gpu_check --out $(GPU_OUT) --parts $(PARTS)
