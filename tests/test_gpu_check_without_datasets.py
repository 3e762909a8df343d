"""The GPU check on an image where ``datasets`` does not import (issue 31, item 5; audit N5).

Every engine step (4-7) trains, and training reads, tokenizes and caches its data through
``datasets`` (load_dataset, Dataset.map, save_to_disk): there is no datasets-free training
path. So the check must say "datasets required" (and what to install) before any engine is
built, instead of a traceback from deep inside the Trainer. Step 4 runs here as the engine
launch runs it, at one gloo rank, in a subprocess whose ``datasets`` import is blocked
(``sys.modules['datasets'] = None``, what Python does for a package that cannot be imported).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCKED_DATASETS_STEP4 = """
import sys
sys.modules["datasets"] = None  # import datasets -> ImportError, as on an image without it
from sap_ds.gpu_check import engine_check
sys.exit(engine_check.main(["--out", sys.argv[1], "--cpu", "--steps", "4"]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engine_steps_report_datasets_required_before_any_engine(tmp_path):
    out = tmp_path / "engine"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(DS_ACCELERATOR="cpu", TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", BLOCKED_DATASETS_STEP4, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    steps = {s["step"]: s for s in json.loads((out / "engine_steps.json").read_text())["steps"]}
    step4 = steps[4]
    assert step4["status"] == "fail"
    assert step4["error"] is None, f"a traceback instead of an up-front report:\n{step4['error']}"
    verdict = " ".join(str(c["detail"]) for c in step4["checks"] if not c["ok"])
    assert "datasets required" in verdict and "build_gpu_wheels.sh" in verdict, step4["checks"]
    assert not list(out.rglob("runs")), "an engine was started although datasets does not import"


def test_datasets_missing_names_the_requirement_the_image_does_not_meet(monkeypatch):
    """On an image with a pyarrow older than datasets asks for, the report names the pin and the
    version found (datasets' own metadata is the reference), not only the import error."""
    import importlib.metadata

    from packaging.requirements import Requirement

    from sap_ds.gpu_check import workspace

    pyarrow = next(Requirement(r) for r in importlib.metadata.requires("datasets") if Requirement(r).name == "pyarrow")
    floor = min(s.version for s in pyarrow.specifier if s.operator == ">=")
    too_old = f"{int(floor.split('.')[0]) - 1}.0.0"
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: too_old if name == "pyarrow" else real_version(name))
    monkeypatch.setitem(sys.modules, "datasets", None)
    message = workspace.datasets_missing()
    assert message.startswith("datasets required")
    assert f"{pyarrow} (found {too_old})" in message, message
    assert message.count("(found ") == 1, message  # the requirements this environment meets are not listed
