# Everything set up from a fresh clone with only Python 3.11+:
#   make demo   - create .venv, install, run the docs/rules.md examples on embedded servers
#   make test   - create .venv, install, run the whole suite on real servers
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo dev test unit integration lint schemas bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,tracing,test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/creditnotes demo

dev: $(STAMP)
	$(BIN)/creditnotes dev

test: $(STAMP)
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The benchmark (bench/README.md): make bench (3 runs, then a 1,000,000 backlog), or
# make bench BENCH_ARGS=--quick (a smoke run); every size is a flag (BENCH_ARGS=--help)
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

schemas: $(STAMP)
	$(BIN)/python -m schemas.generate

clean:
	rm -rf $(VENV) .creditnotes .pytest_cache .mypy_cache .ruff_cache .hypothesis
