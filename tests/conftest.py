"""The fixtures every test file shares (the tiny model, its tokenizer) and the pytest hooks
(the user_install marker, longest files first). Helpers that are not fixtures live in
tests/support/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sap_ds.parallel.distributed import CPU_MALLOC_TUNABLES

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads TRITON_INTERPRET once, when it is imported, and transformers.modeling_utils
# imports it: set here, before any test file is collected, so that the kernel tests run the
# interpreter whichever file of a worker imports triton first (tests/test_kernels.py).
os.environ["TRITON_INTERPRET"] = "1"
# The allocator settings sap-ds gives the processes it starts on a CPU (and `make test` this
# one): every process a test starts inherits them, as a `make test` run's do.
os.environ.setdefault("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from sap_ds.model.embedded import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from sap_ds.model.loading import load_tokenizer

    return load_tokenizer(tiny_model_path)


# The files with the longest runs first (minutes each, measured under `make test`): the two
# pytest workers take whole files in collection order, so the long ones must start early and
# the short ones fill in at the end; alphabetical order left a 5-minute file for last.
LONGEST_FIRST = ("test_shipped_configs.py", "test_zero3_reference.py", "test_resume.py", "test_sweep.py",
                 "test_compare.py", "test_gpu_check.py", "test_slurm.py", "test_stopping.py", "test_methods.py",
                 "test_guards.py", "test_attack.py", "test_booster_reference.py", "test_bench.py", "test_resolution.py",
                 "test_sap_authors.py", "test_bad_input.py", "test_repnoise.py", "test_vaccine.py", "test_plan.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "user_install: installs sap-ds into a fresh venv from the package registry "
                            "(minutes, network); run by `make test-install`, deselected unless -m names it")


def pytest_collection_modifyitems(session, config, items):
    # tests/test_user_install.py runs only when asked for (`make test-install`: -m user_install), never in `make test`
    if "user_install" not in (config.getoption("markexpr") or ""):
        deselected = [item for item in items if item.get_closest_marker("user_install")]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker("user_install")]
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept otherwise
