# marklb task runner. `make` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: help setup setup-base demo test lint fmt clippy lint-scripts unit bench crdgen clean image cluster-up cluster-down

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: setup-base ## Install what a fresh Debian machine lacks (idempotent, quick when done)
	@if [ -f scripts/setup-k8s.sh ]; then bash scripts/setup-k8s.sh; fi
	@if [ -f scripts/setup-cluster.sh ]; then bash scripts/setup-cluster.sh; fi

setup-base: ## What the demo needs: toolchains, bpf-linker, iproute2 (no Kubernetes builds)
	bash scripts/setup.sh

demo: setup-base ## Run the network-namespace demo (root)
	$(CARGO) build --release -p marklb-agent -p marklb-tests
	./target/release/marklb-demo

test: setup lint ## Everything CI runs: formatting, clippy, all tests (root)
	$(CARGO) build -p marklb-agent -p marklb-operator --bins  # the end-to-end tests run the agent and operator binaries
	$(CARGO) test --no-fail-fast
	$(CARGO) test -p marklb-agent --features bench --lib bench::  # the benchmark's own logic (built only with the feature)

lint: fmt clippy lint-scripts ## Formatting, clippy with warnings denied, shellcheck over scripts/

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets --all-features -- -D warnings
	cd ebpf/prog && $(CARGO) +nightly clippy --target bpfel-unknown-none -Z build-std=core -- -D warnings

lint-scripts:
	bash scripts/lint.sh

bench: ## Datapath benchmark (ns/packet per path, BPF_PROG_TEST_RUN; root)
	$(CARGO) build --release -p marklb-agent --features bench
	./target/release/marklb-agent bench

crdgen: ## Regenerate crds/yaml from the Rust types
	$(CARGO) run -p marklb-crds --bin crdgen

clean:
	$(CARGO) clean

image: ## Container images as OCI archives in target/images (static musl binaries; no engine)
	bash scripts/image/build.sh

NODES ?= 2
NODE_LABELS ?=
cluster-up: ## Start the tests' Kubernetes cluster (NODES=2, NODE_LABELS="[I:]K=V,...") and leave it running (root)
	bash scripts/setup-cluster.sh
	$(CARGO) build -p marklb-tests --bin marklb-cluster
	./target/debug/marklb-cluster up --nodes $(NODES) $(if $(NODE_LABELS),--node-labels $(NODE_LABELS))

cluster-down: ## Stop that cluster and undo everything it changed on the host (root)
	$(CARGO) build -p marklb-tests --bin marklb-cluster
	./target/debug/marklb-cluster down
