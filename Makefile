# The README's two commands are `make demo` and `make test`; each does its own set-up
# (a torch environment for tch, cached outside the repository) on a fresh machine.
SHELL := /bin/bash
ENV := source scripts/env.sh

.PHONY: fuzz cluster cluster-binaries setup build demo test test-unit e2e-node lint generate bench-load bench-operator bench-replica bench-fetch bench-actor bench-python clean images images-cuda release-dry-run

setup:
	@scripts/setup-torch.sh >/dev/null

build: setup
	$(ENV) && cargo build --release --workspace --bins

demo: build
	scripts/demo.sh

lint: setup
	$(ENV) && cargo fmt --all -- --check
	$(ENV) && cargo clippy --release --workspace --all-targets --features kube-zerocopy-e2e/bench -- -D warnings

test: cluster-binaries build lint
	scripts/test.sh

# A test control plane built from source, until Ctrl-C; its kubeconfig in target/ (see xtask).
cluster:
	cargo xtask cluster

# Started first so that the Go builds of the test cluster overlap cargo's (scripts/cluster-binaries.sh).
cluster-binaries:
	@scripts/cluster-binaries.sh

# The pure crates' tests (operator, store, fetching, batch, agent): no torch, no cluster, seconds once built.
test-unit:
	cargo test --release -p kube-zerocopy -p kube-zerocopy-store -p kube-zerocopy-fetch -p kube-zerocopy-batch -p kube-zerocopy-agent

# The real-node scenarios alone (root: a kubelet, containerd and kube-proxy on this machine,
# the images from `make images`, the chart installed). `make test` runs them too.
e2e-node: build
	$(ENV) && cargo test --release -p kube-zerocopy-e2e --test real_node

bench-load: build
	scripts/bench-load.sh

clean:
	cargo clean
	rm -rf out

generate: setup
	scripts/generate.sh

bench-operator: build
	scripts/bench-operator.sh

# On the real node (root): a Node-sharing replica's time to ready when it is the first on its
# node (the node agent fetches and publishes a 512 MiB model) against a later one.
bench-replica: build
	scripts/bench-replica.sh

# Publishing a 1 GiB model from file:// (warm page cache) against cp into /dev/shm, and from a
# local http server against curl: how much publishing costs beyond copying the bytes.
bench-fetch: build
	scripts/bench-fetch.sh

# One actor replica's rows/s and p50/p99 latency against concurrency and batch size, dynamic
# batching on and off side by side; an actor pool fed by the driver against Task mode.
bench-actor: build
	scripts/bench-actor.sh

bench-python: build
	scripts/bench-python.sh

# The operator, runtime and pause images as OCI archives, built without a daemon (buildah).
images: build
	scripts/images.sh

# What a release does but the push (images as OCI archives, the packaged chart, an SBOM of each
# image, the chart's images checked against those built) into out/release/. Needs root.
# RELEASE_ARGS=--cuda adds runtime-cuda. The release workflow runs it, then pushes.
release-dry-run: build
	scripts/release-dry-run.sh $(RELEASE_ARGS)

# The same and runtime-cuda (libtorch's CUDA backend and libraries: about 4 GB more, minutes to
# compress), checked with runc: its worker loads the CUDA backend. Not part of `make test`.
images-cuda: build
	scripts/images.sh --cuda | scripts/images-check.sh

# Every fuzz target for FUZZ_SECONDS (default 600) each; corpora in fuzz/corpus. Not part of
# `make test` (its builds use the nightly toolchain and AddressSanitizer).
fuzz: setup
	scripts/fuzz.sh
