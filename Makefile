# Developer loop. `make help` lists the targets; every target installs what it needs.
#
# Nothing heavy lives in the clone: uv, the virtual environment and the Go-built tools sit in a
# cache folder outside it, so a fresh clone (CI) reuses them and a second run is fast.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/distillation-operator
UV_DIR := $(CACHE_DIR)/tools/uv-$(UV_VERSION)
UV := $(UV_DIR)/bin/uv
# One environment for every clone: `uv sync` makes it match uv.lock (a no-op when it already does)
# and points its editable install at the clone that ran it.
VENV ?= $(CACHE_DIR)/venv
EXTRAS ?= --extra operator --extra dev
export UV_PROJECT_ENVIRONMENT := $(VENV)
BIN := $(VENV)/bin

.PHONY: help
help: ## List the targets.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(UV):
	@echo "installing uv $(UV_VERSION) into $(UV_DIR)" >&2
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(UV_DIR) uv==$(UV_VERSION)

.PHONY: venv
venv: $(UV) ## Create or update the virtual environment (outside the clone) from uv.lock.
	$(UV) sync --frozen --python $(PYTHON) $(EXTRAS)

.PHONY: lock
lock: $(UV) ## Re-resolve uv.lock after changing dependencies in pyproject.toml.
	$(UV) lock

.PHONY: manifests
manifests: venv ## Regenerate crds/ and the chart's CRD template from the API model.
	$(BIN)/python -m distillation_operator.crdgen

.PHONY: lint
lint: venv ## ruff, mypy (strict) and the layer rules of DESIGN.md.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

.PHONY: format
format: venv ## Apply ruff's fixes and formatting.
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

.PHONY: unit
unit: venv ## Unit tests only (pure, fast).
	$(BIN)/pytest tests/unit

.PHONY: test
test: lint ## The full check CI runs: lint, then every test.
	$(BIN)/pytest

.PHONY: clean
clean: ## Remove caches inside the clone (the shared environment stays).
	rm -rf .mypy_cache .ruff_cache .pytest_cache .import_linter_cache dist build
