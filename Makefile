# registry-gateway — the commands a newcomer needs:
#   make run    install into .venv and serve routes.yaml on 127.0.0.1:5000 (cache in ./data)
#   make test   install what the tests need (Debian packages, Go tools) and run them all
#   make lint   ruff and mypy --strict
#   make bench  the benchmark (writes BENCHMARKS.md); BASELINE=REV also runs the gateway at
#               git revision REV beside this tree and reports both

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ROUTES ?= routes.yaml
DATA   ?= data
LISTEN ?= 127.0.0.1:5000
PYTEST_ARGS ?=
BASELINE ?=

.PHONY: run test lint bench test-deps check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m gateway serve --routes $(ROUTES) --data-dir $(DATA) --listen $(LISTEN)

check: $(VENV)/.installed
	$(PY) -m gateway check $(ROUTES)

test-deps: $(VENV)/.installed-dev
	./scripts/install-test-deps

test: test-deps
	$(VENV)/bin/ruff check gateway tests
	$(VENV)/bin/mypy
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check gateway tests
	$(VENV)/bin/mypy

# The benchmark needs the gateway, Debian's docker-registry, nginx and wrk, and its Go
# tool (built from bench/benchtool); not the test suite's dependencies.
bench: $(VENV)/.installed
	./scripts/install-bench-deps
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(PY) -m bench $(if $(BASELINE),--baseline $(BASELINE))

clean:
	rm -rf $(VENV) .tools data .mypy_cache .ruff_cache .pytest_cache
