# igrad: `make demo` (set up + run the short demonstration), `make test` (set up + lint + type check + docs +
# tests), `make test-fast` (the everyday tier). Each target creates its own virtual environment on a fresh
# machine, with the pinned versions of constraints.txt (the package itself asks for ranges: pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The real CIFAR-100 image-folder copy, when it sits beside the project; else the demo downloads
# CIFAR-100 with torchvision and real-data tests are skipped (with the reason printed).
IGRAD_DATA ?= $(abspath $(wildcard ../shared/data/cifar100))
export IGRAD_DATA

.PHONY: demo test test-fast lint docs bench clean

# The demo needs the package alone (torch, torchvision, ...); the tests add pytest, grad-cam, ruff and mypy.
$(BIN)/.runtime: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

$(BIN)/.installed: $(BIN)/.runtime
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,docs]'
	touch $@

demo: $(BIN)/.runtime
	$(BIN)/igrad reproduce --preset demo $(if $(IGRAD_DATA),--data $(IGRAD_DATA),--data cifar100 --download) \
		--out runs/reproduce-demo

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments
	$(BIN)/mypy src

docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Every test once, in two processes of one torch thread each; then the numerical tests (marker numerics)
# again with two threads: float32 reductions split differently across threads, and every tolerance must follow
# from the arithmetic, not from one thread count (tests/conftest.py).
test: lint docs
	IGRAD_TEST_THREADS=1 $(BIN)/python -m pytest -q -rs -n 2
	IGRAD_TEST_THREADS=2 $(BIN)/python -m pytest -q -m numerics

# The everyday tier: no real data, no subprocesses, no end-to-end runs (a few minutes on two cores).
test-fast: $(BIN)/.installed
	IGRAD_TEST_THREADS=1 $(BIN)/python -m pytest -q -rs -n 2 -m "not slow"

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/train_step.py --width 0.5
	$(BIN)/python benchmarks/saliency.py
	$(BIN)/python benchmarks/metrics.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache .mypy_cache
