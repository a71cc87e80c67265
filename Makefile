# igrad: `make demo` (set up + run the short demonstration), `make test` (set up + lint + type check + tests).
# Each target creates its own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The real CIFAR-100 image-folder copy, when it sits beside the project; else the demo downloads
# CIFAR-100 with torchvision and real-data tests are skipped (with the reason printed).
IGRAD_DATA ?= $(abspath $(wildcard ../shared/data/cifar100))
export IGRAD_DATA

.PHONY: demo test lint bench clean

# The demo needs the package alone (torch, torchvision, ...); the tests add pytest, grad-cam, ruff and mypy.
$(BIN)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed: $(BIN)/.runtime
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.runtime
	$(BIN)/igrad reproduce --preset demo $(if $(IGRAD_DATA),--data $(IGRAD_DATA),--data cifar100 --download) \
		--out runs/reproduce-demo

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments
	$(BIN)/mypy src

# The suite runs twice, with 1 and with 2 torch threads: float32 reductions split differently across
# threads, and every tolerance must follow from the arithmetic, not from one thread count (tests/conftest.py).
test: lint
	IGRAD_TEST_THREADS=2 $(BIN)/python -m pytest -q -rs
	IGRAD_TEST_THREADS=1 $(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/train_step.py --width 0.5
	$(BIN)/python benchmarks/saliency.py
	$(BIN)/python benchmarks/metrics.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
