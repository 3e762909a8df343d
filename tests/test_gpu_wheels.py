"""The wheel folder of scripts/build_gpu_wheels.sh installs and imports on the GPU image.

The GPU image (the device docs and ../shared/audits/gpu-path-v2.md, section 3) is Python 3.12
with torch 2.11.0, triton 3.6.0, transformers 5.17.0, huggingface-hub 1.33.0, peft, pyarrow,
pandas, xxhash, fsspec, ... and no deepspeed, datasets, pydantic, hjson, dill or multiprocess;
it has no network, so scripts/gpu_check.sh installs the folder there with ``--no-index
--no-deps``, and nothing but this test checks that the result holds together (issue 31, item 5).

Here, a clean Python 3.12 venv is made to hold the image's versions: torch and triton as
metadata-only distributions (a ``*.dist-info`` with torch 2.11.0's own requirements, less the
CUDA libraries, which constrain nothing the folder ships: no CUDA build is ever downloaded),
and the image's pure-Python and binary packages installed for real, at the versions the docs
record, the others as they stood when the image was built (``--uploaded-prior-to``, see
IMAGE_BUILT). Then the folder is built (the script, as a user runs it) and installed by
scripts/gpu_check.sh itself; ``pip check`` must pass, and datasets (its data path as sap-ds
uses it: load_dataset, a 2-process map, save_to_disk, load_from_disk), pyarrow, pydantic (the
check's run config validated), hjson, fsspec, multiprocess and dill must work. deepspeed
cannot be imported without a real torch: only its declared requirements are checked (pip check).

Needs the package registry and ~4 minutes (pip's cache makes reruns faster); run by
``make test-install`` with tests/test_user_install.py, never by ``make test``. The versions the
venv held are written to ``image_versions.json`` in the test's tmp folder and printed.
Python 3.12: $SAP_DS_PYTHON312, else python3.12 on PATH, else pyenv's newest 3.12.
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
from packaging.utils import canonicalize_name, parse_wheel_filename

pytestmark = pytest.mark.user_install

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 1200
CARRY_LIMIT_MIB = 64  # what the device tool carries: the working tree and the wheel folder together

# Metadata-only: torch 2.11.0's Requires-Dist as its cp312 manylinux wheel declares them, less
# cuda-toolkit, cuda-bindings and nvidia-* (CUDA libraries); triton 3.6.0 declares none.
STUBS = {
    "torch": ("2.11.0", ["filelock", "typing-extensions>=4.10.0", "setuptools<82", "sympy>=1.13.3",
                         "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5", 'triton==3.6.0; platform_system == "Linux"']),
    "triton": ("3.6.0", []),
}
# Versions the device docs' pip list and the audit record for the image.
IMAGE_RECORDED = {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                  "tokenizers": "0.23.2", "accelerate": "1.15.0"}
# In the image, versions not recorded: the audit's list, and torch's own requirements.
IMAGE_UNRECORDED = ["peft", "pyarrow", "pandas", "xxhash", "fsspec", "einops", "msgpack", "ninja", "psutil",
                    "py-cpuinfo", "nvidia-ml-py", "typing-extensions", "filelock", "packaging", "pyyaml", "tqdm",
                    "requests", "aiohttp", "setuptools<82", "sympy", "networkx", "jinja2"]
# When the image was built, for the versions not recorded: it holds huggingface-hub 1.33.0
# (uploaded 2026-09-24) and transformers 5.17.0 although 5.18.0 came out on 2026-09-30; and it
# has typer but no pydantic, which the newest typer requires. (Resolved so: pyarrow 25.0.1,
# fsspec 2026.9.0, pandas 3.0.6, peft 0.21.1, typer 0.27.2.)
IMAGE_BUILT = "2026-09-30T00:00:00Z"
NOT_IN_IMAGE = ["deepspeed", "datasets", "pydantic", "hjson", "dill", "multiprocess"]

WORKS_WITHOUT_TORCH = """
import json, pathlib, sys
import datasets, dill, fsspec, hjson, multiprocess, pandas, pyarrow, pydantic, xxhash
from sap_ds.gpu_check import workspace
from sap_ds.config.run import build_config

assert workspace.datasets_missing() is None, workspace.datasets_missing()
out = pathlib.Path(sys.argv[1])
files = workspace.write_data(out / "data", workspace.corpus_words())
table = datasets.load_dataset("json", data_files=str(files["task"]), split="train", cache_dir=str(out / "cache"))
mapped = table.map(lambda row: {"words": len(row["prompt"].split())}, num_proc=2)  # multiprocess + dill
mapped.save_to_disk(str(out / "saved"))
back = datasets.load_from_disk(str(out / "saved"))
config = build_config(workspace.run_tree(out, "engine_full", "llama-0.5b", files, cpu=False), source="wheel check")
print(json.dumps({"rows": len(back), "words": sorted(set(back["words"])), "method": config.method,
                  "versions": {m.__name__: m.__version__ for m in (datasets, pyarrow, pydantic, fsspec, dill)}}))
"""


def run(cmd: list, timeout: int = TIMEOUT, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def python312() -> Path:
    """The image's Python minor version, found here (see the module docstring). A pyenv shim on
    PATH may name a version it does not run, so each candidate is asked."""
    candidates = [os.environ.get("SAP_DS_PYTHON312"), shutil.which("python3.12")]
    if shutil.which("pyenv"):
        root = Path(run(["pyenv", "root"], 60).stdout.strip())
        candidates += sorted(root.glob("versions/3.12.*/bin/python3.12"),
                             key=lambda p: int(p.parts[-3].split(".")[2]) if p.parts[-3].split(".")[2].isdigit() else -1,
                             reverse=True)
    for candidate in filter(None, candidates):
        probe = subprocess.run([str(candidate), "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return Path(candidate)
    pytest.fail("no Python 3.12 here (the GPU image's): set SAP_DS_PYTHON312 to one")


def write_stub(site_packages: Path, name: str, version: str, requires: list[str]) -> None:
    """An installed distribution as pip and importlib.metadata see it, with no files."""
    info = site_packages / f"{name}-{version}.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"] + [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("sap-ds test stub\n")
    (info / "RECORD").write_text("")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A venv with the image's versions, the wheel folder built and installed by gpu_check.sh."""
    root = tmp_path_factory.mktemp("gpu_wheels")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_CONSTRAINT", "PIP_REQUIREMENT")}
    timings = {}

    start = time.perf_counter()
    wheels = root / "whl"
    built = run(["bash", REPO / "scripts/build_gpu_wheels.sh", "--out", wheels], env={**env, "PYTHON": sys.executable})
    timings["build_gpu_wheels.sh"] = time.perf_counter() - start

    start = time.perf_counter()
    venv = root / "venv"
    run([python312(), "-m", "venv", venv], 300, env=env)
    python = venv / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).stdout.strip())
    for name, (version, requires) in STUBS.items():
        write_stub(site_packages, name, version, requires)
    run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], env=env)  # --uploaded-prior-to needs pip >= 26
    held = root / "image-torch.txt"  # a resolution that wanted another torch fails here instead of fetching one
    held.write_text("".join(f"{name}=={version}\n" for name, (version, _) in STUBS.items()))
    run([python, "-m", "pip", "install", "-q", "--uploaded-prior-to", IMAGE_BUILT, "-c", held,
         *[f"{name}=={version}" for name, version in IMAGE_RECORDED.items()], *IMAGE_UNRECORDED], env=env)
    timings["image venv"] = time.perf_counter() - start

    def installed() -> dict:
        freeze = run([python, "-m", "pip", "freeze", "--all"], 120, env=env).stdout
        return {canonicalize_name(n): v.strip() for n, v in (line.split("==", 1) for line in freeze.splitlines() if "==" in line)}

    before = installed()
    start = time.perf_counter()
    # gpu_check.sh installs, then starts the check, which stops at `import torch` here (no real torch)
    check = run(["bash", REPO / "scripts/gpu_check.sh", "--python", python, "--wheels", wheels, "--out", root / "gc",
                 "--steps", "1"], check=False, env=env, cwd=root)
    timings["gpu_check.sh install"] = time.perf_counter() - start
    after = installed()
    record = root / "image_versions.json"
    record.write_text(json.dumps({"image": before, "after gpu_check.sh": after,
                                  "timings_s": {k: round(v, 1) for k, v in timings.items()}}, indent=2) + "\n")
    print(f"\nGPU wheel folder on the image's versions ({record}):")
    print("  " + ", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items()))
    print("  image: " + ", ".join(f"{n} {v}" for n, v in sorted(before.items())))
    print(built.stdout[-3000:])
    return {"root": root, "python": python, "env": env, "wheels": wheels, "check": check, "before": before,
            "after": after, "install_log": (root / "gc" / "install.log").read_text()}


def test_the_venv_holds_the_images_versions(image):
    before = image["before"]
    for name, (version, _) in STUBS.items():
        assert before[name] == version
    for name, version in IMAGE_RECORDED.items():
        assert before[name] == version, (name, before[name])
    assert not set(NOT_IN_IMAGE) & set(before), "the venv holds what the image lacks: the test would prove nothing"


def test_gpu_check_sh_installs_the_folder_and_pip_check_passes(image):
    check, after = image["check"], image["after"]
    assert "gpu_check.sh: installing from" in check.stdout, check.stdout
    assert "pip install failed" not in check.stderr, image["install_log"]
    assert "pip check found unmet requirements" not in check.stderr, image["install_log"]  # gpu_check.sh's own check
    for wheel in image["wheels"].glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        assert after.get(name) in (str(version), image["before"].get(name)), f"{wheel.name}: {after.get(name)} installed"
    for name in NOT_IN_IMAGE:
        assert name in after, f"{name} is not installed from the folder"
    for name, (version, _) in STUBS.items():
        assert after[name] == version, f"the install replaced the image's {name}"
    # every declared requirement of every installed distribution holds, deepspeed's included
    checked = run([image["python"], "-m", "pip", "check"], 300, check=False, env=image["env"])
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_datasets_pydantic_and_the_rest_work_without_torch(image):
    """What can run without a real torch: the data path as sap-ds uses it, the check's run
    config through pydantic, and the GPU check's own datasets gate."""
    out = image["root"] / "works"
    env = {**image["env"], "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    proc = run([image["python"], "-c", WORKS_WITHOUT_TORCH, out], 600, env=env, cwd=image["root"])
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["rows"] == 64 and found["words"] == [12] and found["method"] == "sap"
    assert found["versions"]["datasets"] == image["after"]["datasets"]


def test_the_folder_fits_what_the_device_tool_carries(image):
    """The working tree (tracked and new files) and the folder travel together, in 64 MiB."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], 60, cwd=REPO).stdout
    tree = sum((REPO / name).stat().st_size for name in filter(None, listed.split("\0")) if (REPO / name).is_file())
    folder = sum(wheel.stat().st_size for wheel in image["wheels"].glob("*.whl"))
    print(f"\nworking tree {tree / 2**20:.1f} MiB + wheel folder {folder / 2**20:.1f} MiB")
    assert tree + folder <= CARRY_LIMIT_MIB * 2**20
