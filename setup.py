"""sap-ds: Safety-Aware Probing fine-tuning on DeepSpeed ZeRO-3.

torch is a range, never a pin: on a CPU machine the Makefile installs the CPU
build first, and pip then leaves it alone instead of pulling a CUDA wheel.

An installed package is usable without a checkout: the build copies configs/,
ds_configs/, data/ and slurm/ (the sbatch templates) into sap_ds/shipped/ (same layout, so the configs' relative
paths hold; sap_ds/resources.py finds them) and records the git commit in
sap_ds/_build_info.json for ``sap-ds --version``.

Dependency bounds: the floors are the first releases with what sap-ds uses
(sap_ds/dependencies.py checks them at start); the ``<=`` upper bounds are the newest versions
tests/test_user_install.py has installed and trained with (a fresh venv, ``pip install
torch==2.13.0``, then this project resolved against the registry with no constraints: pip
picks every bound, and the test fails unless it did). To raise a bound: change it here, run
``make test-install``, keep it if that passes. requirements-cpu.txt (what ``make test``
installs) pins its own set within these bounds.
"""
import json
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("configs", "ds_configs", "data", "slurm")
VERSION = "0.1.0"  # also sap_ds/__init__.py


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class BuildWithShippedFiles(build_py):
    """build_py, plus the shipped folders and the build record inside the package."""

    def run(self):
        # A build folder from before the kernels were renamed still holds them as a top-level `kernels`
        # package, which a wheel would ship next to sap_ds_kernels and over Hugging Face's `kernels`.
        shutil.rmtree(Path(self.build_lib) / "kernels", ignore_errors=True)
        super().run()
        package = Path(self.build_lib) / "sap_ds"
        for name in SHIPPED:
            if (ROOT / name).is_dir():
                target = package / "shipped" / name
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        commit = _git("rev-parse", "HEAD")  # dirty by sap_ds/version.py's rule: tracked changes or untracked files
        info = {"version": VERSION, "commit": commit,
                "dirty": bool(_git("--no-optional-locks", "status", "--porcelain")) if commit else None}
        (package / "_build_info.json").write_text(json.dumps(info) + "\n", encoding="utf-8")


setup(
    name="sap-ds",
    version=VERSION,
    description="Safety-Aware Probing (SAP) fine-tuning for LLMs on DeepSpeed ZeRO-3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernels install as ``sap_ds_kernels``, never as ``kernels`` (Hugging Face's PyPI package of that
    # name is a dependency of transformers: both would write site-packages/kernels/). Their source stays
    # in the repository's kernels/ folder.
    # sap_ds.model.smollm2_tokenizer: data only (SmolLM2's tokenizer, MANIFEST.in includes its files)
    packages=[*find_packages(include=["sap_ds", "sap_ds.*"]), "sap_ds.model.smollm2_tokenizer", "sap_ds_kernels"],
    package_dir={"sap_ds_kernels": "kernels/sap_ds_kernels"},
    include_package_data=True,
    cmdclass={"build_py": BuildWithShippedFiles},
    install_requires=[
        # Floors: the first release with what sap-ds uses (sap_ds/dependencies.py says what, and checks them at start).
        # Upper bounds (<=): the versions tests/test_user_install.py installed and trained with (see the docstring).
        # torch: a range; the user installs it first (CPU or CUDA build) and pip keeps it.
        "torch>=2.6,<2.15",
        "deepspeed>=0.19.6,<=0.19.8",
        "transformers>=4.56,<=5.25.0",
        "peft>=0.13,<=0.21.2",
        "datasets>=3.0,<=5.2.0",
        "pydantic>=2.5,<=2.14.4",
        "PyYAML>=6,<=6.0.4",
        "safetensors>=0.4,<=0.8.0",
        "sentencepiece>=0.2,<=0.2.3",
        "tensorboard>=2.14,<=2.21.0",
        "tqdm>=4.66,<=4.70.1",
        "matplotlib>=3.8,<=3.11.2",
        "numpy>=1.26,<=2.4.6",
        "gguf>=0.10,<=0.19.0",
        "triton>=3.2,<=3.9.0; platform_system == 'Linux'",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "vllm": ["vllm>=0.6"],  # sap-ds eval backend: vllm (CUDA only); docs/evaluation.md
        "wandb": ["wandb>=0.19"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "wandb>=0.19", "import-linter>=2.17"],
    },
    entry_points={"console_scripts": ["sap-ds=sap_ds.cli:main"]},
)
