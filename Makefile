# Chassis — every entry point a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

E2E_DIR      ?= $(CURDIR)/target/e2e
KUBECONFIG_E2E := $(E2E_DIR)/kubeconfig
CARGO        ?= cargo
# The e2e tests share one cluster; a few run in parallel.
E2E_THREADS  ?= 4

.PHONY: help deps crds crds-check fmt fmt-check lint unit build e2e test run demo down proxy-symbol-order \
        proxy-symbol-order-check \
        cluster-up cluster-down bench bench-projects bench-netpol bench-proxy fuzz image

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

deps: ## Check the toolchains and install the Debian packages the scripts use
	@command -v go >/dev/null || { echo "Go is missing: the local control plane is built from Go modules (Go 1.26 or newer)."; exit 1; }
	@go version | awk '{split($$3, v, "."); if (v[1] == "go1" && v[2] + 0 < 26) {print "Go " $$3 " is too old: the control plane needs Go 1.26 or newer."; exit 1}}'
	@command -v node >/dev/null && command -v npm >/dev/null || { echo "Node.js and npm are missing: the e2e OpenID provider (e2e/oidc) runs on Node 20 or newer."; exit 1; }
	@cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
	@missing=""; for c in openssl pgrep curl python3 chromium; do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing:$$missing"; $$sudo apt-get update -qq && $$sudo apt-get install -y -qq openssl procps curl python3 chromium >/dev/null; \
	fi

crds: ## Regenerate crds/ and the chart's copy from the Rust types
	$(CARGO) run -q -p chassis-api --bin crdgen -- crds/
	$(CARGO) run -q -p chassis-api --bin crdgen -- charts/chassis/crds/

crds-check: ## Fail when crds/ or the chart's copy is stale
	$(CARGO) run -q -p chassis-api --bin crdgen -- --check crds/
	$(CARGO) run -q -p chassis-api --bin crdgen -- --check charts/chassis/crds/

fmt: ## Format the code
	$(CARGO) fmt --all

fmt-check: ## Fail on unformatted code
	$(CARGO) fmt --all -- --check

lint: ## clippy with warnings as errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: ## Unit tests (no cluster)
	$(CARGO) test --workspace --exclude chassis-e2e

build: ## Build the binaries
	$(CARGO) build -p chassis-operator -p chassis-api -p chassis-oauth-proxy

cluster-up: deps ## Build (cached) and start the local control plane
	bash e2e/cluster/up.sh

cluster-down: ## Stop the local control plane
	bash e2e/cluster/down.sh

e2e: deps build cluster-up ## End-to-end tests against the local control plane
	$(CARGO) test -p chassis-e2e -- --test-threads=$(E2E_THREADS)

test: deps fmt-check lint unit crds-check proxy-symbol-order-check e2e ## Everything CI runs

# The API server must reach the webhooks on this machine's loopback (the local control
# plane of `make cluster-up`); against a remote cluster run with RUN_WEBHOOKS= .
RUN_WEBHOOKS ?= --webhook-addr 127.0.0.1:9443 --webhook-register
run: build ## Run the operator in the foreground against $$KUBECONFIG, its admission webhooks served and registered on loopback
	./target/debug/chassis-operator --log-format text $(RUN_WEBHOOKS)

demo: deps build cluster-up ## Start everything and create the example project
	bash hack/demo.sh

down: ## Stop the demo operator and the local control plane
	bash hack/demo.sh stop
	bash e2e/cluster/down.sh

bench: deps build cluster-up ## Measure the foundation (see docs/BENCHMARKS.md)
	bash e2e/bench/foundation.sh

bench-projects: deps ## The 1000-project benchmark against its own control plane (about 10 minutes)
	bash e2e/bench/projects.sh

bench-netpol: deps ## chassis-netpol probe against cyclonus, three sizes (about 5 minutes)
	$(CARGO) build -q --release -p chassis-netpol
	python3 e2e/bench/netpol.py --netpol target/release/chassis-netpol \
	  --cyclonus "$$(bash e2e/cluster/build.sh | tail -n 1)/cyclonus-$$(sed -n 's/^CYCLONUS_VERSION=//p' e2e/cluster/versions.env)"

bench-proxy: deps ## chassis-oauth-proxy against oauth2-proxy and the bare upstream (about 15 minutes)
	bash e2e/bench/proxy.sh

# The list is made with the image's compiler on x86-64 (std's names carry the compiler's
# hash): with another, most names differ anyway, so the check is skipped.
PROXY_RUST := $(shell sed -n 's/^FROM rust:\([0-9.]*\)-.*/\1/p' Dockerfile.oauth-proxy)
proxy-symbol-order-check: ## Fail when oauth-proxy/symbol-order.txt names functions the build no longer has (a release build of the proxy; about 4 minutes cold)
	@if [ "$$(uname -m)" != x86_64 ] || ! rustc --version | grep -q '^rustc $(PROXY_RUST) '; then \
	  echo "skipped: oauth-proxy/symbol-order.txt is made for rustc $(PROXY_RUST) on x86_64"; exit 0; fi; \
	$(CARGO) build -q --profile release-proxy -p chassis-oauth-proxy && \
	python3 e2e/bench/symbol_order.py --check --strict target/release-proxy/chassis-oauth-proxy oauth-proxy/symbol-order.txt

proxy-symbol-order: deps ## Regenerate oauth-proxy/symbol-order.txt: the proxy's serving code, profiled with valgrind (under a minute once built)
	bash e2e/bench/proxy-symbol-order.sh

FUZZ_SECONDS ?= 100
fuzz: ## Fuzz the proxy's redirect check, cookie opening and path normalization (cargo-fuzz)
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd oauth-proxy && for t in redirect session_cookie path; do \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; done

IMAGE_REPO ?= ghcr.io/chassis-dev
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/chassis/Chart.yaml)
CONTAINER_ENGINE ?= $(shell command -v podman || command -v docker)

image: ## Build the chassis-operator and chassis-oauth-proxy images (needs podman or docker; not run in CI)
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image needs podman or docker"; exit 1; }
	$(CONTAINER_ENGINE) build -f Dockerfile.operator -t $(IMAGE_REPO)/chassis-operator:$(IMAGE_TAG) .
	$(CONTAINER_ENGINE) build -f Dockerfile.oauth-proxy -t $(IMAGE_REPO)/chassis-oauth-proxy:$(IMAGE_TAG) .
