# procsup — `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help:  ## List the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,demo]'
	touch $(STAMP)

setup: $(STAMP)  ## Create .venv and install procsup with its dev, bench and demo extras.

lint: $(STAMP)  ## ruff lint and format check, mypy --strict, the import layering contracts.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint  ## Set up, lint, type-check, then run the whole suite.
	$(BIN)/python -m pytest

test-load: $(STAMP)  ## make test with two CPU hogs beside it (the suite must pass on a busy box).
	@$(BIN)/python scripts/cpu_hogs.py --hogs 2 & hogs=$$!; \
	trap 'kill $$hogs 2>/dev/null; wait $$hogs 2>/dev/null' EXIT; \
	trap 'exit 130' INT TERM HUP; \
	$(MAKE) --no-print-directory test

# `python -m procsup` exits 1 by design: its default story ends with a crash that cancels the
# root. make would call that an error, on a line after the story's last one, so status 1 passes
# here; any other status (a real failure, 130 after Ctrl-C) still fails.
DEMO := $(BIN)/python -m procsup

demo: $(STAMP)  ## Set up, then run the demo (python -m procsup; its story ends in exit 1).
	@echo '$(DEMO)'; $(DEMO); status=$$?; if [ $$status -eq 1 ]; then exit 0; fi; exit $$status

bench: $(STAMP)  ## Run scripts/bench.py (ratios against floors measured in the same run).
	$(BIN)/python scripts/bench.py

format: $(STAMP)  ## Reformat the code with ruff.
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## Remove the virtualenv and caches.
	rm -rf $(VENV) .mypy_cache .ruff_cache *.egg-info

.PHONY: help setup lint test test-load demo bench format clean
