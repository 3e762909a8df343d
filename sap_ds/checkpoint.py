"""Atomic, resumable checkpoints.

Layout under ``<output_dir>/checkpoints``::

    step_00000020/          one complete checkpoint (DeepSpeed's shards + ours)
    latest                  the tag of the newest complete checkpoint, written last
    .staging/               where a checkpoint is written before it is renamed into place

A checkpoint is written into ``.staging``, renamed into place when every rank has
finished, and only then does ``latest`` (itself written to a temporary file and renamed)
point at it. A crash at any moment leaves the previous checkpoint intact and findable.
Our own state (trainer counters, RNG states, SAP probe/optimizer/direction) is saved as
safetensors plus JSON, never pickled.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sap_ds.distributed import barrier, is_main

LATEST = "latest"
STAGING = ".staging"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(root: Path) -> str | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text(encoding="utf-8").strip()
    if not (root / tag).is_dir():
        raise CheckpointError(f"{pointer} names '{tag}', which does not exist in {root}; remove the pointer or restore the folder")
    return tag


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save(engine, root: Path, step: int, meta: dict, tensors: dict[str, torch.Tensor], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tag = tag_for(step)
    staging = root / STAGING
    if is_main():
        shutil.rmtree(staging / tag, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
    folder = staging / tag
    own = {f"rng.{k}": v for k, v in rng_state().items()}
    own.update({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    save_file(own, str(folder / f"sap_ds_rank{rank:05d}.safetensors"))
    if is_main():
        meta = {**meta, "step": step, "python_random": _encode_random_state()}
        atomic_write_text(folder / "sap_ds_meta.json", json.dumps(meta, indent=1))
    barrier()
    final = root / tag
    if is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(folder, final)
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    current = (root / LATEST).read_text().strip()
    for old in tags[:-keep]:
        if old != current:
            shutil.rmtree(root / old, ignore_errors=True)


def _encode_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def load(engine, root: Path, expect: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Resume from ``latest`` if there is one: returns (meta, this rank's tensors)."""
    tag = latest_tag(root)
    if tag is None:
        return None
    folder = root / tag
    meta_path = folder / "sap_ds_meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({exc}); the checkpoint is corrupt") from None
    for key, value in expect.items():
        if meta.get(key) != value:
            raise CheckpointError(
                f"{folder}: checkpoint was written with {key}={meta.get(key)!r}, this run has {key}={value!r}; "
                f"use a new output_dir or set train.resume=never"
            )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    own_path = folder / f"sap_ds_rank{rank:05d}.safetensors"
    try:
        tensors = load_file(str(own_path))
        load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
    except Exception as exc:  # safetensors, DeepSpeed and torch raise many types for a bad file
        raise CheckpointError(f"{folder}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None
    if load_path is None:
        raise CheckpointError(f"{folder}: DeepSpeed found no loadable checkpoint there")
    set_rng_state(tensors)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return meta, tensors


def atomic_save_figure(fig, path: Path, dpi: int) -> None:
    """Save a matplotlib figure to ``path`` (PNG) atomically and close it: a reader never
    sees half a file, and an interrupted save leaves the previous plot in place."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
