# Chassis — every entry point a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

E2E_DIR      ?= $(CURDIR)/target/e2e
KUBECONFIG_E2E := $(E2E_DIR)/kubeconfig
CARGO        ?= cargo
# The e2e tests share one cluster; a few run in parallel.
E2E_THREADS  ?= 4

.PHONY: help deps crds crds-check fmt fmt-check lint unit build e2e test run demo down \
        cluster-up cluster-down bench

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

deps: ## Install the Debian packages the scripts use (openssl, procps, curl)
	@missing=""; for c in openssl pgrep curl; do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; apt-get update -qq && apt-get install -y -qq openssl procps curl >/dev/null; \
	fi
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy

crds: ## Regenerate crds/ from the Rust types
	$(CARGO) run -q -p chassis-api --bin crdgen -- crds/

crds-check: ## Fail when crds/ is stale
	$(CARGO) run -q -p chassis-api --bin crdgen -- --check crds/

fmt: ## Format the code
	$(CARGO) fmt --all

fmt-check: ## Fail on unformatted code
	$(CARGO) fmt --all -- --check

lint: ## clippy with warnings as errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: ## Unit tests (no cluster)
	$(CARGO) test --workspace --exclude chassis-e2e

build: ## Build the binaries
	$(CARGO) build -p chassis-operator -p chassis-api

cluster-up: deps ## Build (cached) and start the local control plane
	bash e2e/cluster/up.sh

cluster-down: ## Stop the local control plane
	bash e2e/cluster/down.sh

e2e: deps build cluster-up ## End-to-end tests against the local control plane
	$(CARGO) test -p chassis-e2e -- --test-threads=$(E2E_THREADS)

test: deps fmt-check lint unit crds-check e2e ## Everything CI runs

run: build ## Run the operator in the foreground against $$KUBECONFIG
	./target/debug/chassis-operator --log-format text

demo: deps build cluster-up ## Start everything and create the example project
	bash hack/demo.sh

down: ## Stop the demo operator and the local control plane
	bash hack/demo.sh stop
	bash e2e/cluster/down.sh

bench: deps build cluster-up ## Measure the foundation (see docs/BENCHMARKS.md)
	bash e2e/bench/foundation.sh
