# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test bench-quick
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/fastunlearn demo --out fastunlearn-demo

test: $(VENV)/.installed
	$(BIN)/pytest tests benchmarks --benchmark-disable -m "not compile and not gpu"
