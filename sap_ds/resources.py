"""The files sap-ds ships besides its code: run and eval configs, DeepSpeed configs, data,
and the SLURM templates.

In a checkout they are the repository's ``configs/``, ``ds_configs/``, ``data/`` and
``slurm/``; in an installed package (``pip install .``) setup.py has copied the same folders
into ``sap_ds/shipped/``, with the same layout, so a shipped config's relative paths
(``../data/gsm8k/train.jsonl``) hold in both. The data ships with the package (14 MB,
data/MANIFEST.md lists each file's source and license): ``sap-ds train --config demo``
works on an installed package from any folder, with no checkout and no download.

Where a config file is expected (``--config``, ``base:``, ``deepspeed_config``, a compare
or sweep config's ``train_config``/``eval_config``), an existing path wins; otherwise the
value is looked up among the shipped files by name: ``demo``, ``demo.yaml``,
``configs/demo.yaml``, ``70b/llama2_70b_chat_lora``, ``zero3_bf16.json``,
``ds_configs/zero3_bf16.json``. ``sap-ds configs`` lists them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
INSTALLED_ROOT = PACKAGE_DIR / "shipped"
SHIPPED_FOLDERS = ("configs", "ds_configs", "data", "slurm")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def root() -> Path:
    """The folder holding configs/, ds_configs/ and data/."""
    if (INSTALLED_ROOT / "configs").is_dir():
        return INSTALLED_ROOT
    return PACKAGE_DIR.parent


def configs_dir() -> Path:
    return root() / "configs"


def ds_configs_dir() -> Path:
    return root() / "ds_configs"


def slurm_dir() -> Path:
    """The sbatch templates and their common.sh; a template copied out on its own finds
    common.sh here (``python -c 'from sap_ds.resources import slurm_dir; ...'``)."""
    return root() / "slurm"


# Folders under configs/ that hold model definitions (a Hugging Face config.json and
# tokenizer, built with random weights by the GPU check), not sap-ds configs.
MODEL_DEFINITIONS = "models"


def shipped_configs() -> list[Path]:
    """Every shipped run, eval, compare, sweep and bench config (not configs/models/)."""
    folder = configs_dir()
    return sorted(p for p in folder.rglob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file()
                  and p.relative_to(folder).parts[0] != MODEL_DEFINITIONS)


def config_name(path: Path) -> str:
    """``configs/70b/llama2_70b_chat_lora.yaml`` -> ``70b/llama2_70b_chat_lora``."""
    return path.resolve().relative_to(configs_dir().resolve()).with_suffix("").as_posix()


def find_shipped(value: str) -> Optional[Path]:
    """The shipped config or DeepSpeed config named ``value``, or None."""
    name = Path(value)
    if name.is_absolute() or ".." in name.parts:
        return None
    parts = name.parts
    if parts and parts[0] in ("configs", "ds_configs"):
        folders, name = [root() / parts[0]], Path(*parts[1:]) if len(parts) > 1 else Path()
    else:
        folders = [configs_dir(), ds_configs_dir()]
    if not name.parts:
        return None
    for folder in folders:
        candidates = [folder / name] + ([folder / name.with_name(name.name + s) for s in CONFIG_SUFFIXES]
                                        if name.suffix not in CONFIG_SUFFIXES else [])
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    return None


def shipped_names() -> list[str]:
    return [config_name(p) for p in shipped_configs()]
