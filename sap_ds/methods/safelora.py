"""SafeLoRA (Hsu et al., NeurIPS 2024): project a LoRA update onto the alignment subspace.

Source: the authors' code, IBM/SafeLoRA ``model.py`` (class ``SafeLoRA``), followed
literally. For every LoRA-targeted weight, ``V = W_aligned - W_base`` (the aligned chat
model minus its unaligned base) and ``C = V V^T / ||V||_F``. For a LoRA layer with
``A`` (r x in) and ``B`` (out x r) the update ``B A`` is compared with ``C B A``; a layer
whose cosine similarity (rounded to 5 decimals, as the code does) is at most the
threshold gets ``B <- C B``. ``select: number`` takes the cutoff as the ``num_layers``-th
lowest cosine, so ties at the cutoff select more layers, as in the code. The code's
figure "Pdst" is the mean over layers of ``1 / (1 + ||B_new - C B||_F)`` (1 for a
projected layer).

A layer the alignment did not change (``V = 0``) is never projected and takes no place in
``select: number``, as in the code (where its ``C`` and cosine are NaN): its update is kept.

Two things differ from the code on purpose, neither changes a result: layers are matched
by NAME (the code zips ``named_parameters`` of three models and tells ``lora_A`` from
``lora_B`` by ``shape[0] == r``, which stops with a shape error when a layer's output size
equals r, and pairs the wrong matrices when a target module has a bias), and ``C B`` is computed as ``V (V^T B) / ||V||_F`` without ever
forming the out x out matrix ``C`` (the same product in another order; a 70B q_proj
would need 256 MB per layer and ~1e12 flops, this needs a few GFLOPs). Weights are read
one tensor at a time through ``safetensors.safe_open``, so neither model is ever loaded.

``C`` is not an orthogonal projector: its eigenvalues are ``sigma_i^2 / ||V||_F``, so
``C B`` is scaled by the size of the alignment change (a small ``V`` shrinks the update
toward zero) and ``C C != C``. ``projection: orthogonal`` uses ``U U^T`` instead (``U``:
the left singular vectors of ``V`` above numerical rank), which keeps the update's
component in the subspace at full size; it is the identity where ``V`` has full rank.

The LoRA update is ``W = W0 + s B A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` for
rsLoRA). Projection replaces ``B``, so the merged update becomes ``s C B A``; ``s``
multiplies both updates and cancels in the cosine and in the reported norm ratio.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy
import torch
import torch.nn.functional as F

from sap_ds.errors import ModelError
from sap_ds.files import atomic_folder, atomic_write_text

log = logging.getLogger("sap_ds")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT_FILE = "safelora.json"
SELECT_MODES = ("threshold", "number")
PROJECTIONS = ("published", "orthogonal")
# peft's saved key (``...q_proj.lora_A.weight``) or a live model's (``...lora_A.default.weight``)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."


class SafeLoraError(ModelError):
    """Input SafeLoRA cannot use; the message names the file or key and what would be valid."""


# --------------------------------------------------------------------------- model weights


def resolve_model_folder(value: str, key: str) -> Path:
    """A model folder given as a path or a sap-ds model name ('embedded', 'tiny-random'),
    with errors naming ``key`` (the config key or CLI flag that gave it)."""
    from sap_ds.config.run import EMBEDDED_MODEL, ModelConfig
    from sap_ds.model.embedded import TINY_MODEL
    from sap_ds.model.loading import resolve_model_path

    if value in (EMBEDDED_MODEL, TINY_MODEL):
        return resolve_model_path(ModelConfig(path=value))
    path = Path(value)
    if not path.is_dir():
        raise SafeLoraError(f"{key}: '{value}' is not a local folder; give a Hugging Face model folder (config.json and "
                            f"*.safetensors), or '{EMBEDDED_MODEL}' / '{TINY_MODEL}'")
    if not (path / "config.json").is_file():
        raise SafeLoraError(f"{key}: '{path}' has no config.json; it is not a Hugging Face model folder")
    return path


class WeightFiles:
    """The tensors of a model folder's safetensors files, read one at a time on request."""

    def __init__(self, folder: Path, key: str):
        from safetensors import safe_open

        self.folder, self.key = Path(folder), key
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    self.files.update({name: file for name in handle.keys()})
        if not self.files:
            other = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = f" (it has {', '.join(other)}: re-save it with save_pretrained(safe_serialization=True))" if other else ""
            raise SafeLoraError(f"{key}: '{self.folder}' has no *.safetensors weights{hint}; SafeLoRA reads safetensors only")

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str, device: str = "cpu") -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt", device="cpu") as handle:
            return handle.get_tensor(name).to(device=device, dtype=torch.float32)


def weight_name(module: str) -> str:
    """The model-file key of a LoRA layer's base weight: peft's ``base_model.model.`` prefix off."""
    return f"{module.removeprefix(_PEFT_PREFIX)}.weight"


def target_weights(weights: WeightFiles, target_modules: list[str]) -> list[str]:
    """Every 2-D weight of a module whose last name part is one of ``target_modules``."""
    wanted = set(target_modules)
    return [name for name in weights.files if name.endswith(".weight") and name.rsplit(".", 2)[-2] in wanted]


# --------------------------------------------------------------------------- alignment matrices


@dataclass
class AlignmentDelta:
    """One layer's ``V = W_aligned - W_base`` (fp32) and the projection built from it."""

    delta: torch.Tensor
    projection: str = "published"

    def __post_init__(self):
        self.norm = float(torch.linalg.matrix_norm(self.delta))
        self._basis = None

    def matrix(self) -> torch.Tensor:
        """The out x out matrix itself (tests and small models; ``apply`` never forms it)."""
        return self.apply(torch.eye(self.delta.shape[0], dtype=self.delta.dtype, device=self.delta.device))

    def apply(self, b: torch.Tensor) -> torch.Tensor:
        """``C @ b``; zero where V is zero (the limit of ``V V^T / ||V||_F`` as V -> 0; ``project_lora``
        leaves such a layer unprojected and never asks)."""
        b = b.to(self.delta)
        if self.norm == 0.0:
            return torch.zeros_like(b)
        if self.projection == "published":
            return self.delta @ (self.delta.T @ b) / self.norm
        if self._basis is None:
            u, s, _ = torch.linalg.svd(self.delta, full_matrices=False)
            keep = s > s.max() * max(self.delta.shape) * torch.finfo(s.dtype).eps
            self._basis = u[:, keep]
        return self._basis @ (self._basis.T @ b)


class AlignmentMatrices(Mapping):
    """``name -> AlignmentDelta`` for each layer, computed when it is looked up (one layer's
    two weights in memory at a time). Shapes and presence are checked up front from the
    files' headers, so a bad pair of models fails before any arithmetic."""

    def __init__(self, base: WeightFiles, aligned: WeightFiles, names: list[str], device: str, projection: str):
        self.base, self.aligned, self.names = base, aligned, list(names)
        self.device, self.projection = device, projection

    def __getitem__(self, name: str) -> AlignmentDelta:
        if name not in self.names:
            raise KeyError(name)
        delta = self.aligned.get(name, self.device) - self.base.get(name, self.device)
        return AlignmentDelta(delta, self.projection)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def alignment_matrices(base_path, aligned_path, target_modules: list[str], layer_names: Optional[list[str]] = None,
                       device: str = "cpu", projection: str = "published",
                       keys: tuple[str, str] = ("base_model", "aligned_model")) -> AlignmentMatrices:
    """The alignment matrices of ``layer_names`` (model-file weight keys such as
    ``model.layers.0.self_attn.q_proj.weight``; default: every weight of ``target_modules``).
    ``keys`` name the two paths in error messages (config keys or CLI flags)."""
    if projection not in PROJECTIONS:
        raise SafeLoraError(f"projection: '{projection}' is not one of {', '.join(PROJECTIONS)}")
    base = WeightFiles(resolve_model_folder(str(base_path), keys[0]), keys[0])
    aligned = WeightFiles(resolve_model_folder(str(aligned_path), keys[1]), keys[1])
    if base.folder.resolve() == aligned.folder.resolve():
        raise SafeLoraError(f"{keys[0]} and {keys[1]} are the same folder ({base.folder}): V = W_aligned - W_base would be "
                            "zero; give the unaligned base model and the aligned model it was made from")
    for weights, key in ((base, keys[0]), (aligned, keys[1])):
        present = {name.rsplit(".", 2)[-2] for name in target_weights(weights, target_modules)}
        absent = [m for m in target_modules if m not in present]
        if absent:
            raise SafeLoraError(f"{key}: '{weights.folder}' has no weights of the LoRA target modules {absent}; the "
                                f"adapter's target_modules are {list(target_modules)}")
    names = list(layer_names) if layer_names is not None else target_weights(aligned, target_modules)
    for name in names:
        for weights, key in ((base, keys[0]), (aligned, keys[1])):
            if name not in weights.files:
                raise SafeLoraError(f"{key}: '{weights.folder}' has no weight '{name}' (a LoRA layer of the adapter); "
                                    "base, aligned and fine-tuned models must share one architecture")
        if base.shape(name) != aligned.shape(name):
            raise SafeLoraError(f"'{name}' has shape {list(base.shape(name))} in {keys[0]} ({base.folder}) but "
                                f"{list(aligned.shape(name))} in {keys[1]} ({aligned.folder}); both must be the same architecture")
    return AlignmentMatrices(base, aligned, names, device, projection)


# --------------------------------------------------------------------------- projection


def lora_layers(adapter_state: Mapping[str, torch.Tensor], source: str = "adapter") -> dict[str, tuple[str, str]]:
    """``module -> (lora_A key, lora_B key)``, matched by name, in layer order (layer 2 before
    10; safetensors files keep keys sorted as text). Anything else LoRA-like
    (DoRA magnitudes, embedding LoRA) is an error: the projection is defined for B A only."""
    parts: dict[str, dict[str, str]] = {}
    for key in adapter_state:
        if "lora_magnitude_vector" in key or "lora_embedding_" in key:
            raise SafeLoraError(f"{source}: key '{key}': SafeLoRA projects plain LoRA updates B A of linear layers; "
                                "DoRA and embedding LoRA are not supported")
        match = _LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = key
    if not parts:
        sample = next(iter(adapter_state), None)
        raise SafeLoraError(f"{source}: no LoRA weights (keys '...lora_A.weight' / '...lora_B.weight'; the first key is "
                            f"{sample!r}); SafeLoRA needs a LoRA run (lora.enabled: true), not full fine-tuning")
    for module, found in parts.items():
        if set(found) != {"A", "B"}:
            raise SafeLoraError(f"{source}: '{module}' has lora_{''.join(found)} but not lora_{'B' if 'A' in found else 'A'}")
    in_model_order = sorted(parts, key=lambda m: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", m)])
    return {module: (parts[module]["A"], parts[module]["B"]) for module in in_model_order}


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return F.cosine_similarity(x.reshape(1, -1), y.reshape(1, -1)).item()


def project_lora(adapter_state: Mapping[str, torch.Tensor], matrices: Mapping[str, AlignmentDelta],
                 select: str = "number", threshold: float = 0.5, num_layers: int = 10,
                 source: str = "adapter") -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter with the selected layers' ``B`` replaced by ``C B``, and the report:
    per layer the cosine of ``C B A`` with ``B A``, whether it was projected, the ratio
    ``||C B A|| / ||B A||``, ``||V||_F`` and the code's Pdst term. ``matrices`` is keyed
    by the model-file weight name (``weight_name(module)``).

    A layer the alignment did not change (``V = 0``) is left as it is, in both modes, and
    takes no place among ``num_layers``: the authors' ``C`` is ``0 / 0 = NaN`` there, so its
    cosine is NaN, ``NaN <= cutoff`` is false and the code never projects it (IBM/SafeLoRA
    ``model.py:80, 100, 103``; ``numpy.sort`` puts NaN last, ``model.py:49``). Its cosine,
    ratio and Pdst term are None in the report (the code's Pdst, a mean with a NaN term, is
    NaN; this one is the mean over the other layers), and the log names such layers."""
    if select not in SELECT_MODES:
        raise SafeLoraError(f"select: '{select}' is not one of {', '.join(SELECT_MODES)}")
    layers = lora_layers(adapter_state, source)
    rows = []
    for module, (key_a, key_b) in layers.items():
        a, b = adapter_state[key_a].float(), adapter_state[key_b].float()
        name = weight_name(module)
        if name not in matrices:
            raise SafeLoraError(f"{source}: no alignment matrix for '{key_b}' (model weight '{name}')")
        delta = matrices[name]
        if delta.delta.shape != (b.shape[0], a.shape[1]):
            raise SafeLoraError(f"{source}: '{module}' updates a {b.shape[0]} x {a.shape[1]} weight but '{name}' is "
                                f"{tuple(delta.delta.shape)} in the base/aligned models; they are not the adapter's model")
        row = {"name": module.removeprefix(_PEFT_PREFIX), "alignment_norm": delta.norm, "_b": b, "_key_b": key_b}
        if delta.norm == 0.0:  # unchanged by the alignment: no C, never projected
            row.update({"cosine": None, "norm_ratio": None, "aligned_unchanged": True, "_cb": None})
        else:
            cb = delta.apply(b.to(delta.delta.device)).cpu()
            update, projected_update = b @ a, cb @ a
            update_norm = float(torch.linalg.matrix_norm(update))
            row.update({"cosine": _cosine(projected_update, update), "aligned_unchanged": False, "_cb": cb,
                        "norm_ratio": float(torch.linalg.matrix_norm(projected_update)) / update_norm if update_norm else None})
        rows.append(row)
    unchanged = [row["name"] for row in rows if row["aligned_unchanged"]]
    if unchanged:
        shown = ", ".join(unchanged[:5]) + (f" and {len(unchanged) - 5} more" if len(unchanged) > 5 else "")
        log.warning("SafeLoRA: %d of %d LoRA layers are the same in the base and aligned models (V = 0), so there is no "
                    "alignment subspace to project them on: left unprojected, as the authors' code leaves them (its "
                    "cosine is NaN there), and not counted in num_layers: %s", len(unchanged), len(rows), shown)
    candidates = [row for row in rows if not row["aligned_unchanged"]]
    rounded = {id(row): float(numpy.round(row["cosine"], 5)) for row in candidates}  # the code rounds before comparing
    if select == "threshold":
        cutoff = threshold
    elif num_layers > len(candidates):
        why = f" ({len(unchanged)} of its {len(rows)} are unchanged by the alignment, V = 0, and never projected)" \
            if unchanged else ""
        raise SafeLoraError(f"num_layers: {num_layers} is more than the adapter's {len(candidates)} projectable LoRA "
                            f"layers{why}; give 0..{len(candidates)} (or select: threshold)")
    else:
        cutoff = sorted(rounded.values())[num_layers - 1] if num_layers > 0 else None
    new_state = {key: tensor.clone() for key, tensor in adapter_state.items()}
    pdst_terms = []
    for row in rows:
        b, cb, key_b = row.pop("_b"), row.pop("_cb"), row.pop("_key_b")
        row["projected"] = cb is not None and cutoff is not None and rounded[id(row)] <= cutoff
        if cb is None:
            row["pdst"] = None
            continue
        final = cb if row["projected"] else b
        row["pdst"] = 1.0 / (1.0 + float(torch.linalg.vector_norm(final - cb)))
        pdst_terms.append(row["pdst"])
        if row["projected"]:
            new_state[key_b] = cb.to(adapter_state[key_b].dtype)
    report = {"select": select, "threshold": threshold if select == "threshold" else None,
              "num_layers": num_layers if select == "number" else None, "cutoff": cutoff,
              "layers": len(rows), "projected": sum(row["projected"] for row in rows),
              "aligned_unchanged": len(unchanged),
              "pdst": float(numpy.mean(pdst_terms)) if pdst_terms else None, "per_layer": rows}
    return new_state, report


def summary_line(report: dict) -> str:
    """The code's printed line, with its figures (and the layers the alignment did not change)."""
    pdst = "undefined (no layer to project)" if report["pdst"] is None else f"{report['pdst']:.4f} (> 0.8 is better)"
    unchanged = report.get("aligned_unchanged", 0)
    left = f" ({unchanged} left unprojected: unchanged by the alignment)" if unchanged else ""
    return (f"{report['projected']} of {report['layers']} layers are projected{left}, cosine threshold is "
            f"{report['cutoff']}, and Pdst is {pdst}")


# --------------------------------------------------------------------------- adapter folders


def read_adapter(adapter_dir, key: str = "adapter") -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, state)`` of a peft LoRA folder, with errors naming the file."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise SafeLoraError(f"{key}: '{folder}' is not a folder; give a peft LoRA adapter folder "
                            f"({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, e.g. <output_dir>/export/adapter)")
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_file.is_file():
        full = " it holds a full model (config.json): SafeLoRA needs a LoRA run (lora.enabled: true)" \
            if (folder / "config.json").is_file() else ""
        raise SafeLoraError(f"{key}: '{folder}' has no {ADAPTER_CONFIG}; it is not a peft adapter folder;{full}")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise SafeLoraError(f"{config_file}: key 'peft_type' is {config.get('peft_type')!r}; SafeLoRA needs 'LORA'")
    if config.get("use_dora"):
        raise SafeLoraError(f"{config_file}: key 'use_dora' is true; SafeLoRA projects plain LoRA updates, not DoRA")
    if not weights_file.is_file():
        raise SafeLoraError(f"{key}: '{folder}' has no {ADAPTER_WEIGHTS} (safetensors adapter weights)")
    return config, load_file(str(weights_file))


def _targets(config: dict, layers: dict) -> list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets:
        return list(targets)
    return sorted({module.rsplit(".", 1)[-1] for module in layers})  # a regex or 'all-linear': the modules found


def apply_safelora(adapter_dir, base_path, aligned_path, out_dir, cfg, report_path=None, device: str = "cpu",
                   keys: tuple[str, str, str] = ("adapter", "base_model", "aligned_model"),
                   adapter_label: Optional[str] = None) -> dict:
    """Write ``out_dir``: the projected adapter (safetensors, the other files copied) and
    ``report_path`` (default ``out_dir/safelora.json``). ``cfg`` has ``select``,
    ``threshold``, ``num_layers`` and ``projection`` (``export.safelora``). Everything is
    written to a temporary folder first; an existing ``out_dir`` is an error, never replaced.
    ``keys`` name the adapter, base and aligned paths in error messages (config keys, CLI flags)."""
    from safetensors.torch import save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists():
        raise SafeLoraError(f"output '{out_dir}' already exists; give a new folder (nothing was written)")
    config, state = read_adapter(adapter_dir, keys[0])
    layers = lora_layers(state, str(adapter_dir / ADAPTER_WEIGHTS))
    matrices = alignment_matrices(base_path, aligned_path, _targets(config, layers),
                                  [weight_name(m) for m in layers], device, cfg.projection, keys[1:])
    new_state, report = project_lora(state, matrices, cfg.select, cfg.threshold, cfg.num_layers,
                                     source=str(adapter_dir / ADAPTER_WEIGHTS))
    report = {"adapter": adapter_label or str(adapter_dir), "base_model": str(base_path), "aligned_model": str(aligned_path),
              "projection": cfg.projection, **report}
    with atomic_folder(out_dir) as tmp:
        for item in adapter_dir.iterdir():
            if item.is_file() and item.name != ADAPTER_WEIGHTS:
                shutil.copy2(item, tmp / item.name)
        save_file({k: v.contiguous() for k, v in new_state.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if report_path is None:
            atomic_write_text(tmp / REPORT_FILE, json.dumps(report, indent=1))
    if report_path is not None:
        atomic_write_text(Path(report_path), json.dumps(report, indent=1))
    return report


# --------------------------------------------------------------------------- run export


def check_export_config(cfg) -> None:
    """Before step 1: the two models of ``export.safelora`` exist, hold the LoRA target
    modules and agree in shape, so that a bad path fails in seconds, not after training."""
    from sap_ds.model.loading import resolve_model_path

    sl = cfg.export.safelora
    if not (cfg.export.enabled and cfg.lora.enabled and sl.enabled):
        return
    matrices = alignment_matrices(sl.base_model, sl.aligned_model, cfg.lora.target_modules, None, "cpu", sl.projection,
                                  ("export.safelora.base_model", "export.safelora.aligned_model"))
    if cfg.model.from_config:
        return  # random weights: the run's folder may hold no weights to compare with
    run = WeightFiles(resolve_model_path(cfg.model), "model.path")
    for name in matrices:
        if name not in run.files or run.shape(name) != matrices.base.shape(name):
            got = list(run.shape(name)) if name in run.files else "absent"
            raise SafeLoraError(f"export.safelora.base_model: '{name}' is {list(matrices.base.shape(name))} there but "
                                f"{got} in the run's model.path ({run.folder}); the base and aligned models must be "
                                "the architecture the run fine-tunes")


def project_export(model, folder: Path, cfg) -> dict:
    """The export step (rank 0): ``folder/adapter`` (just saved) becomes
    ``folder/adapter_unprojected``, the projected adapter is written as ``folder/adapter``
    with ``folder/safelora.json``, and the live peft ``model`` takes the projected weights,
    so that the merge that follows merges them."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    sl = cfg.export.safelora
    os.replace(folder / "adapter", folder / "adapter_unprojected")
    report = apply_safelora(folder / "adapter_unprojected", sl.base_model, sl.aligned_model, folder / "adapter", sl,
                            report_path=folder / REPORT_FILE, adapter_label="adapter_unprojected",
                            keys=("adapter", "export.safelora.base_model", "export.safelora.aligned_model"))
    result = set_peft_model_state_dict(model, load_file(str(folder / "adapter" / ADAPTER_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"export.safelora: projected adapter keys the model lacks: {result.unexpected_keys[:3]}")
    log.info("SafeLoRA: %s", summary_line(report))
    return report
