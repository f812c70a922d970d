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
EXTRAS ?= --extra operator --extra runtime --extra dev
export UV_PROJECT_ENVIRONMENT := $(VENV)
BIN := $(VENV)/bin
# The Go-built test control plane, kubectl and helm (hack/build-tools.sh).
export DISTILL_TOOLS_DIR ?= $(CACHE_DIR)/tools
export DISTILL_TOOLS_BIN := $(DISTILL_TOOLS_DIR)/bin
# Upstream KubeRay and KServe CRDs, vendored unmodified (see third_party/crds/README.md).
export DISTILL_UPSTREAM_CRDS ?= $(abspath $(CURDIR)/third_party/crds)

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
lint: venv ## ruff, mypy (strict) and the layer rules of docs/design.md.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

.PHONY: format
format: venv ## Apply ruff's fixes and formatting.
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

.PHONY: tools
tools: ## Build the test control plane (kube-apiserver, etcd, GC), kubectl and helm from Go modules.
	bash hack/build-tools.sh

.PHONY: testcluster
testcluster: tools ## Same as tools.

.PHONY: upstream-crds
upstream-crds: ## Check that the upstream KubeRay/KServe CRDs the cluster tests install are there.
	@for d in kuberay-v1.6.2 kuberay-v1.5.0 kserve-v0.20.0; do \
	  if [ ! -d "$(DISTILL_UPSTREAM_CRDS)/$$d" ]; then \
	    echo "missing $(DISTILL_UPSTREAM_CRDS)/$$d: set DISTILL_UPSTREAM_CRDS to a folder with" >&2; \
	    echo "kuberay-v1.6.2/ and kuberay-v1.5.0/ (KubeRay ray-operator/config/crd/bases) and" >&2; \
	    echo "kserve-v0.20.0/ (KServe v0.20.0, config/crd/full), laid out as third_party/crds/" >&2; \
	    exit 1; \
	  fi; \
	done; echo "upstream CRDs: $(DISTILL_UPSTREAM_CRDS)"

.PHONY: cluster-up
cluster-up: tools ## Start a control plane in /tmp/distill-cluster for manual use (Ctrl-C stops it).
	$(DISTILL_TOOLS_BIN)/testcluster up --dir /tmp/distill-cluster --exit-with-parent=false

# DEMO_ARGS=--keep-serving keeps the student's server and the control plane up until Ctrl-C.
.PHONY: demo
demo: venv tools upstream-crds ## kubectl apply a tiny Distillation here and watch it served (KubeRay and KServe stand-ins).
	$(BIN)/python hack/demo/run.py --cache $(CACHE_DIR)/demo $(DEMO_ARGS)

# llm-compressor pins transformers, torch and compressed-tensors below what vLLM takes: the
# quantize stage has its own environment (and image), beside the main one.
VENV_QUANTIZE ?= $(CACHE_DIR)/venv-quantize
QUANTIZE_EXTRAS ?= --extra runtime --extra quantize --extra dev

.PHONY: venv-quantize
venv-quantize: $(UV) ## Create or update the quantize environment (llm-compressor) from uv.lock.
	UV_PROJECT_ENVIRONMENT=$(VENV_QUANTIZE) $(UV) sync --frozen --python $(PYTHON) $(QUANTIZE_EXTRAS)

.PHONY: test-quantize
test-quantize: venv-quantize ## Quantize tests in the quantize environment; a skip there is a failure.
	DISTILL_REQUIRE_QUANTIZE=1 $(VENV_QUANTIZE)/bin/pytest -m quantize tests/stages

.PHONY: unit
unit: venv ## Unit tests only (pure, fast).
	$(BIN)/pytest tests/unit

.PHONY: cluster
cluster: venv tools upstream-crds ## Cluster tests only (a real API server, Helm, RBAC).
	$(BIN)/pytest tests/cluster

.PHONY: test check
check: lint tools upstream-crds ## The developer loop: lint, then unit, stage and cluster tests.
	$(BIN)/pytest

# What CI runs (.ci/run): everything, each part in the environment it needs.
test: check test-quantize test-images test-e2e ## Everything: check, quantize (own env), images, the node tier.

.PHONY: images
images: ## Build the operator, runtime and quantize images into dist/images/ (OCI archives).
	UV_VERSION=$(UV_VERSION) DISTILL_CACHE_DIR=$(CACHE_DIR) bash hack/build-images.sh

.PHONY: test-images
test-images: venv tools upstream-crds images ## Build the images, then run them (podman): tests/images.
	DISTILL_UV=$(UV) DISTILL_CACHE_DIR=$(CACHE_DIR) $(BIN)/pytest -m images tests/images

# The node tier (tests/e2e): Debian's containerd, runc, CNI plugins and iptables run the pods.
NODE_PACKAGES := containerd runc containernetworking-plugins iptables iproute2 kmod

.PHONY: node-deps
node-deps: ## Install the node tier's Debian packages (root; apt-get), unless they are there.
	@missing=$$(for p in $(NODE_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing (apt-get)" >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

.PHONY: test-e2e
test-e2e: venv tools upstream-crds images node-deps ## A real node beside the control plane: the chart, KubeRay and the stages in pods.
	$(BIN)/pytest -m e2e_node -rA tests/e2e

.PHONY: clean
clean: ## Remove caches inside the clone (the shared environment stays).
	rm -rf .mypy_cache .ruff_cache .pytest_cache .import_linter_cache dist build
