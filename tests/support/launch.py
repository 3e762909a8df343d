"""Launching real runs from the tests: ``deepspeed --num_gpus N`` on CPU ranks, or one
``python sap_ds/train.py`` process, from the repository's root."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from sap_ds.parallel.distributed import cpu_process_env
from tests.support.repo import REPO

STOP_RUNNER = "tests/support/stop_runner.py"  # sap-ds train, stopped at step $SAP_DS_TEST_STOP_AFTER by its stop file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``deepspeed --num_gpus nproc <args>`` from the repo root (the real launcher)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]
    full_env = {**cpu_process_env({**os.environ, "PYTHONUNBUFFERED": "1"}), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n")
    return proc


def run_single(args: list[str], timeout: int = 300, env: dict | None = None,
               stop_after: int | None = None) -> subprocess.CompletedProcess:
    """``python sap_ds/train.py <args>`` as one process; with ``stop_after=N``, stopped by its
    stop file right after step N (tests/support/stop_runner.py, what a person's ``touch STOP`` does)."""
    full_env = {**cpu_process_env({**os.environ, "MASTER_PORT": str(free_port())}), **(env or {})}
    script = "sap_ds/train.py"
    if stop_after is not None:
        script, full_env["SAP_DS_TEST_STOP_AFTER"] = STOP_RUNNER, str(stop_after)
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
