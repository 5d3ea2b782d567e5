# kdcache: set-up, demo and tests. `make demo` and `make test` work from nothing on Debian/Ubuntu.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Torch wheels: pinned to the pair known to import together; override e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup fmnist demo smoke lint format test test-slow test-gpu test-all clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || { echo "$(PYTHON) has no venv/ensurepip: installing Debian's python3-venv"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Real data: Debian's Fashion-MNIST package (the demo and some tests use it).
fmnist:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	else $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; fi

demo: setup fmnist
	$(BIN)/kdcache demo --out runs/demo

# The smoke path of the README: synthetic shards -> precompute -> validate -> verify.
smoke: setup
	$(BIN)/kdcache shards synthetic --out runs/smoke/shards --num 2000 --test-num 400 --classes 10 --size 32 --channels 3 --shard-size 500 --seed 0 --overwrite
	$(BIN)/kdcache precompute configs/smoke/precompute.yaml --overwrite
	$(BIN)/kdcache validate runs/smoke/cache
	$(BIN)/kdcache verify runs/smoke/cache
	$(BIN)/kdcache inspect runs/smoke/cache --plots runs/smoke/plots --json runs/smoke/inspect.json
	$(BIN)/kdcache train configs/smoke/train.yaml

# The readability gate: ruff's formatter and linter, then the type checker over src/ (basedpyright,
# basic rules, zero errors; configured in pyproject.toml), run by CI first.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/basedpyright --pythonpath $(BIN)/python

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup fmnist
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup fmnist
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The tests marked gpu (tests/integration/test_gpu.py): run on a CUDA device, skipped with the
# reason "needs CUDA" where torch finds none.
test-gpu: setup fmnist
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

test-all: setup fmnist
	$(BIN)/python -m pytest -q -m 'slow or not slow' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
