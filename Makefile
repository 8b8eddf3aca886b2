# The README's two commands are `make demo` and `make test`; each does its own set-up
# (a torch environment for tch, cached outside the repository) on a fresh machine.
SHELL := /bin/bash
ENV := source scripts/env.sh

.PHONY: setup build demo test lint generate bench-load bench-operator clean images

setup:
	@scripts/setup-torch.sh >/dev/null

build: setup
	$(ENV) && cargo build --release --workspace --bins

demo: build
	scripts/demo.sh

lint: setup
	$(ENV) && cargo fmt --all -- --check
	$(ENV) && cargo clippy --release --workspace --all-targets -- -D warnings

test: build lint
	scripts/test.sh

bench-load: build
	scripts/bench-load.sh

clean:
	cargo clean
	rm -rf out

generate: setup
	scripts/generate.sh

bench-operator: build
	scripts/bench-operator.sh

# The operator, runtime and pause images as OCI archives, built without a daemon (buildah).
images: build
	scripts/images.sh
