# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both install exactly the versions in requirements/lock.txt (the environment the suite last passed with);
# pyproject.toml keeps the ranges library users get. `make test-latest` tries the newest releases those
# ranges allow, `make test-min` the lowest, and `make lock` refreshes the lock after a green test-latest.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
# The CPU build on this project's machines; on a GPU machine install the CUDA build of your choice first.
TORCH := torch==2.13.0
PYTEST_ARGS := tests benchmarks --benchmark-disable -m "not compile and not gpu" --durations=30
FAST_ARGS := tests -m "not slow and not compile and not gpu"

$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) $(TORCH)
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

.PHONY: install demo test test-latest test-min lock
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/fastunlearn demo --out fastunlearn-demo

test: $(VENV)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

# The newest releases pyproject.toml allows (torch stays the machine's CPU build), the whole suite.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q $(TORCH)
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/versions.txt
	cat .venv-latest/versions.txt
	.venv-latest/bin/pytest $(PYTEST_ARGS)

# The lowest version of each direct dependency that pyproject.toml allows (uv's lowest-direct resolution;
# transitive ones newest), the fast tests. torch stays the CPU build: older torch wheels on the registry are
# multi-GB CUDA builds, so torch's lower bound is not exercised here.
test-min:
	rm -rf .venv-min
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/pip install -q uv
	.venv-min/bin/uv pip install -q --python .venv-min/bin/python --resolution lowest-direct --only-binary :all: \
		$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) $(TORCH) -e ".[dev]"
	.venv-min/bin/uv pip freeze --python .venv-min/bin/python --exclude-editable
	.venv-min/bin/pytest $(FAST_ARGS)

# Refresh the lock: only a green test-latest rewrites it.
lock: test-latest
	{ head -3 $(LOCK); cat .venv-latest/versions.txt; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
