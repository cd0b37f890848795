# AgentLab. `make demo` runs a job in a local microVM; `make test` runs every test.
# Both install what they need first (scripts/install-deps.sh).

SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

MUSL      := x86_64-unknown-linux-musl
AGENT     := target/$(MUSL)/release/agentlab-agent
BASELINE  := target/$(MUSL)/release/baseline-init
IMAGE_DIR := build/image
TEMPLATE_DIR := build/template

.PHONY: all deps agent image template build test demo bench lint clean

all: build image

deps:
	@scripts/install-deps.sh

agent: deps
	cargo build --release --target $(MUSL) -p agentlab-agent -p agentlab-baseline-init

image: agent
	image/build.sh --agent $(AGENT) --baseline $(BASELINE) --out $(IMAGE_DIR)

# The Debian 12 template disk (debootstrap; needs root; cached, so a no-op when current).
template: agent
	image/build-template.sh --agent $(AGENT) --out $(TEMPLATE_DIR)

build: deps
	cargo build --workspace

test: image template build
	scripts/test.sh

demo: image
	cargo build --release -p agentlab-host
	scripts/demo.sh

bench: image template
	cargo build --release -p agentlab-host -p agentlab-tests --bins
	scripts/bench.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

clean:
	cargo clean
	rm -rf build
