# The two commands of the README, and what they need. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Development and CI pin torch (CPU build) and friends; the package itself accepts any torch.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: serve test test-fast install clean

$(BIN)/shardgen-launcher: pyproject.toml setup.py constraints.txt proto/generate.proto
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[test]'
	touch $@

install: $(BIN)/shardgen-launcher

## Start the server on the built-in demo model (http://127.0.0.1:3000).
serve: install
	$(BIN)/shardgen-launcher --port 3000

## Lint, then run the whole test suite on CPU (Triton kernels in the interpreter).
test: install
	$(BIN)/ruff check .
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

## Unit tests only (no processes started).
test-fast: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests -m "not gpu and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info proto/generate_pb2*.py proto/generate_pb2.pyi
