"""Shared test helpers: launching real multi-rank runs on CPU, and the tiny model."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``deepspeed --num_gpus nproc <args>`` from the repo root (the real launcher)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n")
    return proc


def with_repo_paths(tree):
    """``tree`` with every ``data/...`` string made absolute under the repository.

    A config *file* names its paths relative to its own folder; tests that write an eval
    config into a tmp folder and point it at the shipped data use this.
    """
    if isinstance(tree, dict):
        return {k: with_repo_paths(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [with_repo_paths(v) for v in tree]
    if isinstance(tree, str) and tree.startswith("data/"):
        return str(REPO / tree)
    return tree


def run_single(args: list[str], timeout: int = 300, env: dict | None = None,
               stop_after: int | None = None) -> subprocess.CompletedProcess:
    """``python sap_ds/train.py <args>`` as one process; with ``stop_after=N``, stopped by its
    stop file right after step N (tests/stop_runner.py, what a person's ``touch STOP`` does)."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **(env or {})}
    script = "sap_ds/train.py"
    if stop_after is not None:
        script, full_env["SAP_DS_TEST_STOP_AFTER"] = STOP_RUNNER, str(stop_after)
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


STOP_RUNNER = "tests/stop_runner.py"  # sap-ds train, stopped at step $SAP_DS_TEST_STOP_AFTER by its stop file


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
                 "test_guards.py", "test_bench.py", "test_resolution.py", "test_bad_input.py", "test_plan.py")


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
