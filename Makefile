# One-command entry points. `make setup` is idempotent: it reuses a .venv whose stamp says it is complete.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.complete
WORKDIR ?= work
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

# The index `make lock` resolves against (PyPI; point it at a mirror with make lock UV_INDEX=...).
UV_INDEX ?= https://pypi.org/simple

.PHONY: setup lock test test-fast lint demo ui bench clean

# Every dependency at the version and hashes of requirements.lock (torch included), then the project
# itself, editable, adding nothing.
$(STAMP): pyproject.toml requirements.lock
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; install Python 3.11 or run make PY=/path/to/python3.11"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# requirements.lock from pyproject.toml (runtime and dev), with hashes, for Python 3.11 on x86_64 Linux.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q "$$(grep -o 'uv==[0-9.]*' pyproject.toml)"
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --no-config --index-url $(UV_INDEX) \
	  --custom-compile-command "make lock" --quiet -o requirements.lock

# The whole suite on both cores (pytest-xdist, one test module per worker so module fixtures run once),
# with the 15 slowest tests listed; test-fast: the unit tests only (no servers, no pipeline runs), for
# the inner loop.
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

lint: setup
	$(BIN)/ruff check flows tasks model storage tests bench
	$(BIN)/ruff format --check flows tasks model storage tests bench
	$(BIN)/lint-imports

demo: setup
	$(BIN)/colorize run --dataset sample --preset demo --workdir $(WORKDIR)

ui: setup
	$(BIN)/colorize ui --workdir $(WORKDIR)

# The bench extra (RealESRGANer, the upscale benchmark's baseline) beside the locked versions, which it
# must not move: basicsr's setup.py imports torch, hence no build isolation.
bench: setup
	sed -n 's/^\([A-Za-z0-9][^ ]*==[^ ]*\).*/\1/p' requirements.lock >$(VENV)/constraints.txt
	$(BIN)/pip install -q --no-build-isolation -c $(VENV)/constraints.txt -e '.[bench]'
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(WORKDIR) .pytest_cache
