# One-command entry points. `make setup` is idempotent: it reuses a .venv whose stamp says it is complete.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.complete
WORKDIR ?= work
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: setup test lint demo ui bench clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; install Python 3.11 or run make PY=/path/to/python3.11"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first (pip picks the local CPU-runnable wheels), then basicsr without build isolation
	# (its setup.py imports torch), then everything else. Do not upgrade pip here: newer pip ignores
	# the torch cap inside build environments.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q setuptools wheel numpy
	$(BIN)/pip install -q --no-build-isolation basicsr==1.4.2
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check flows tasks model storage tests bench
	$(BIN)/ruff format --check flows tasks model storage tests bench
	$(BIN)/lint-imports

demo: setup
	$(BIN)/colorize run --dataset sample --preset demo --workdir $(WORKDIR)

ui: setup
	$(BIN)/colorize ui --workdir $(WORKDIR)

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(WORKDIR) .pytest_cache
