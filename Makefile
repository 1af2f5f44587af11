# Two commands set everything up on a fresh machine:
#   make demo   runs the main job on the embedded default model and real data
#   make test   lint + format check + type check (mypy) + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrap-$(shell cat pyproject.toml tools/bootstrap.sh | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: venv test lint format demo bench reproduce clean-venv

$(STAMP): pyproject.toml tools/bootstrap.sh
	./tools/bootstrap.sh $(VENV)
	rm -f $(VENV)/.bootstrap-*
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/repinf-lens demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# every published number: `make reproduce` lists them with their times, `make reproduce RUN=<name>` runs one
reproduce: $(STAMP)
	$(PY) benchmarks/reproduce.py $(if $(RUN),$(RUN),--list)

clean-venv:
	rm -rf $(VENV)
