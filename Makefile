# `make demo` and `make test` set up .venv on first use; later runs reuse it.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYS_STAMP := $(VENV)/.system-packages
PG_LIB ?= /usr/lib/postgresql
BUF := npx --yes @bufbuild/buf@1.75.0

.PHONY: demo test test-unit lock check-env lint format docs protos check-protos buf-lint bench \
	gpu-wheels gpu-check clean

# The environment is installed from the lock (requirements/, made by `make lock` with uv), never
# resolved on the day: every machine gets the packages CI tested, checked against their hashes.
# torch 2.13.0+cpu is not on PyPI: this machine kind ships it in /opt/wheels, elsewhere it comes
# from PyTorch's CPU index (same version, and the lock's hash must match).
UV := $(VENV)/bin/uv
LOCK := requirements/dev.txt
TORCH_CPU_SOURCE ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--custom-compile-command "make lock" --quiet

$(UV): requirements/uv.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "loraplex needs Python 3.11 (vLLM 0.32 / torch 2.13 wheels); set PYTHON=..." >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
	touch $@

$(STAMP): $(UV) $(LOCK) pyproject.toml
	@echo "installing the locked environment into $(VENV) (first run: about a minute)"
	$(UV) pip sync --python $(PY) --require-hashes $(TORCH_CPU_SOURCE) $(LOCK)
	$(UV) pip install --python $(PY) --no-deps --no-build-isolation --quiet -e .
	$(PY) requirements/check.py env $(LOCK) requirements/uv.txt
	touch $@

# Re-resolve deliberately (uv keeps every pin that still satisfies pyproject.toml). The CPU lock
# is for images, dev adds the test tools on top of the same pins, gpu is the `gpu` extra.
lock: $(UV)
	$(UV) pip compile pyproject.toml --extra cpu $(LOCK_FLAGS) --find-links /opt/wheels \
		--excludes requirements/excludes.txt -o requirements/cpu.txt
	$(UV) pip compile pyproject.toml --extra cpu --extra dev $(LOCK_FLAGS) --find-links /opt/wheels \
		--excludes requirements/excludes.txt --constraints requirements/cpu.txt -o requirements/dev.txt
	$(UV) pip compile pyproject.toml --extra gpu $(LOCK_FLAGS) -o requirements/gpu.txt
	$(PY) requirements/check.py lock

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
	@# The versions the tests were written against (Debian 12): PostgreSQL >= 15, Prometheus >= 2.42.
	@pg=$$(ls -d $(PG_LIB)/*/bin/initdb | sort -V | tail -1 | xargs dirname | xargs dirname | xargs basename); \
	prom=$$(prometheus --version 2>&1 | sed -n 's/^prometheus, version \([0-9.]*\).*/\1/p'); \
	echo "system packages: PostgreSQL $$pg, Prometheus $$prom"; \
	[ "$$pg" -ge 15 ] || { echo "PostgreSQL $$pg is older than 15" >&2; exit 1; }; \
	printf '2.42.0\n%s\n' "$$prom" | sort -V -C || { echo "Prometheus $$prom is older than 2.42" >&2; exit 1; }
	touch $@

demo: $(STAMP)
	$(VENV)/bin/loraplex demo

# Fails early when the installed packages are not the lock's, or pyproject.toml and the lock disagree.
check-env: $(STAMP)
	$(PY) requirements/check.py env $(LOCK) requirements/uv.txt
	$(PY) requirements/check.py lock

test: $(SYS_STAMP) check-env lint
	$(PY) -m pytest

# The fast half: unit tests only (fakes, in-process servers, a real PostgreSQL; no vLLM engine).
test-unit: $(SYS_STAMP) check-env
	$(PY) -m pytest tests/unit

# ruff, and mypy over gateway/ (pyproject's [tool.mypy]: the Engine protocol's conformance too).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Regenerate what docs/ generates from the code (a test fails when it is out of date).
docs: $(STAMP)
	$(PY) -m gateway.config docs/configuration.md

# Regenerate the committed gRPC code (tests fail if it differs from the .proto files).
protos: $(STAMP)
	$(PY) -m gateway.protogen protos

# buf STANDARD lint of the contract (buf comes from the npm registry).
buf-lint:
	cd protos && $(BUF) lint

bench: $(STAMP)
	$(PY) benchmarks/gateway_throughput.py --interleave --repeats 9

# benchmarks/gpu_check.py: QLoRA SFT on one NVIDIA GPU, offline, no vLLM (benchmarks/README.md).
# A bare GPU machine with python3 3.12, torch (CUDA), transformers and accelerate lacks
# bitsandbytes, trl and datasets: `make gpu-wheels` (here, from PyPI) downloads the lock's versions
# of what the check imports, hashes checked, into $(GPU_WHEELS) (~56 MiB) to carry there.
# `make gpu-check` runs it with .venv's Python, or where there is no .venv with $(PYTHON) and
# the carried wheels unpacked into $(GPU_SITE) (`make gpu-check PYTHON=python3` there).
GPU_WHEELS := build/gpu-wheels
GPU_SITE := /tmp/loraplex-gpu-site
GPU_CHECK_PACKAGES := accelerate bitsandbytes datasets dill multiprocess peft transformers trl
GPU_CHECK_ARGS ?=

gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	awk -v names="$(GPU_CHECK_PACKAGES)" \
		'BEGIN { split(names, n, " "); for (i in n) want[n[i]] = 1 } \
		/^[a-z0-9]/ { split($$1, pin, "=="); keep = (pin[1] in want) } keep' \
		requirements/gpu.txt > $(GPU_WHEELS)/requirements.txt
	$(PYTHON) -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		-d $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt
	@du -sh $(GPU_WHEELS)

gpu-check:
	@if [ -x $(PY) ]; then py=$(PY); else py=$(PYTHON); \
		$$py -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 1; \
		export PYTHONPATH=$(GPU_SITE); fi; \
	set -x; PYTHONUNBUFFERED=1 $$py benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build .pytest_cache
