"""Load a causal LM and its tokenizer from a local folder, optionally with LoRA.

Under ZeRO-3 the model is built inside DeepSpeed's ``zero.Init`` (through transformers'
``HfDeepSpeedConfig``), so a 70B model is partitioned as it loads and never exists whole
on one GPU. Nothing is fetched from a hub: paths must be local folders.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import torch

from sap_ds.config.run import EMBEDDED_MODEL, LoraConfig, ModelConfig
from sap_ds.errors import ModelError  # defined there (a user error is reported without importing torch)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_FILES = ("*.safetensors", "*.bin")


def resolve_model_path(cfg: ModelConfig, key: str = "model.path") -> Path:
    """The local model folder ``cfg.path`` names; ModelError, naming ``key`` (the config key
    or the command-line flag that gave the path) and what to give instead, if it is not one:
    for a run folder, its export; for a shipped config's export not made yet, the command
    that makes it."""
    from sap_ds.model.embedded import TINY_MODEL, embedded_model_dir, tiny_model_dir

    if cfg.path == EMBEDDED_MODEL:
        return embedded_model_dir()
    if cfg.path == TINY_MODEL:
        return tiny_model_dir()
    path = Path(cfg.path)
    if not path.is_dir():
        made_by = export_not_made_yet(path)
        if made_by is not None:
            raise ModelError(f"{key}: '{cfg.path}' does not exist yet: {made_by}")
        raise ModelError(
            f"{key}: '{cfg.path}' is not a local folder; give a Hugging Face model folder "
            f"(with config.json and weights) or '{EMBEDDED_MODEL}' for the embedded SmolLM2-135M-Instruct (or '{TINY_MODEL}' for the test model)"
        )
    if is_run_folder(path) or is_export_folder(path):
        raise ModelError(f"{key}: '{path}' {run_folder_advice(path)}")
    if not (path / "config.json").is_file():
        raise ModelError(f"{key}: '{path}' has no config.json; it is not a Hugging Face model folder")
    if not cfg.from_config and not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ModelError(
            f"{key}: '{path}' has config.json but no weights ({' or '.join(WEIGHT_FILES)}); give a complete "
            "model folder, or set model.from_config=true for random weights"
        )
    return path


# What a training run writes into its output_dir besides config.json (sap_ds/training/resume.py, RUN_OUTPUTS).
RUN_FOLDER_MARKERS = ("summary.json", "checkpoints", "metrics.jsonl")
EXPORTS = {"model": "the trained model, a LoRA adapter merged in", "adapter": "the LoRA adapter, on its base model"}


def is_run_folder(path: Path) -> bool:
    """A sap-ds training output folder (``output_dir``), not a model: its config.json, if
    any, is the run's config (with ``output_dir``), not a Hugging Face model config."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and "model_type" in config:  # a model folder, whatever else it holds
        return False
    has_run_config = isinstance(config, dict) and "output_dir" in config
    return has_run_config or any((path / name).exists() for name in RUN_FOLDER_MARKERS)


def is_export_folder(path: Path) -> bool:
    """A run's ``export`` folder (holding ``model/`` and/or ``adapter/``), not a model itself."""
    return path.name == "export" and not (path / "config.json").exists() and any((path / n).is_dir() for n in EXPORTS)


def run_folder_advice(path: Path) -> str:
    """Why a run folder (or its export folder) is not a model, and the folder to give instead."""
    export = path if is_export_folder(path) else path / "export"
    what = "is a sap-ds run's export folder" if export == path else "is a sap-ds training run folder (output_dir)"
    made = [(export / name, text) for name, text in EXPORTS.items() if (export / name).is_dir()]
    if made:
        return f"{what}, not a model: use " + " or ".join(f"{folder} ({text})" for folder, text in made)
    if (path / "summary.json").is_file():
        if _run_setting(path, "export", "enabled") is False:
            return (f"{what}, not a model, and it has no export: the run finished with export.enabled false, so it "
                    "holds DeepSpeed checkpoints only; to get export/model, train it again with export.enabled=true "
                    "train.resume=never")
        return f"{what}, not a model, and its export folder {export} is missing (deleted or moved?)"
    return (f"{what}, not a model, and it has no export yet: the run is unfinished (no summary.json); the model is "
            f"written to {export / 'model'} (and {export / 'adapter'} for LoRA) when it ends: resume it with the "
            "sap-ds train command that started it")


def _run_setting(run_dir: Path, section: str, key: str):
    """``section.key`` of the run config a run folder's config.json holds (None if unreadable)."""
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        return config[section][key]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_not_made_yet(path: Path) -> Optional[str]:
    """For a missing ``.../export/model`` (or ``adapter``) of a run: how to make it, or None.

    The run folder is the part before ``export``. If a shipped config writes that output_dir
    (configs/demo.yaml's model.path is the export of configs/align.yaml), the command that runs
    it; else, if the run folder exists, what state it is in (``run_folder_advice``)."""
    parts = path.parts
    if len(parts) < 2 or parts[-2] != "export" or parts[-1] not in EXPORTS:
        return None
    run_dir = Path(*parts[:-2]) if len(parts) > 2 else Path(".")
    shipped = shipped_config_writing(run_dir)
    if shipped is not None:
        return (f"it is the export of the shipped config '{shipped}' (output_dir {run_dir}): make it first with "
                f"`sap-ds train --config {shipped}`, run from this folder{_make_target_note(shipped)}"
                + _state_of(run_dir))
    if run_dir.is_dir() and is_run_folder(run_dir):
        return f"'{run_dir}' {run_folder_advice(run_dir)}"
    return None


def _state_of(run_dir: Path) -> str:
    """What a shipped config's run folder holds, when it exists but has no export."""
    if not run_dir.is_dir():
        return ""
    if not (run_dir / "summary.json").is_file():
        return f" ({run_dir} holds an unfinished run of it: that command resumes it)"
    return f"; '{run_dir}' {run_folder_advice(run_dir)}"


def shipped_config_writing(run_dir: Path) -> Optional[str]:
    """The name of the shipped run config whose output_dir is ``run_dir`` (both relative to the
    working directory, as output_dir and model.path are), or None."""
    from sap_ds.config.reading import read_config_file
    from sap_ds.errors import ConfigError
    from sap_ds.resources import config_name, shipped_configs

    target = run_dir.resolve()
    for config in shipped_configs():
        try:
            out = read_config_file(config).get("output_dir")
        except ConfigError:
            continue
        if isinstance(out, str) and out.strip() and Path(out).resolve() == target:
            return config_name(config)
    return None


def _make_target_note(shipped: str) -> str:
    """``make demo`` runs the shipped config ``shipped`` first, in a checkout whose
    scripts/demo.sh names it (an installed package has no Makefile)."""
    from sap_ds.resources import root

    script = root() / "scripts" / "demo.sh"
    try:
        names_it = f"configs/{shipped}.yaml" in script.read_text(encoding="utf-8")
    except OSError:
        return ""
    return "; in a checkout, `make demo` runs it before the demo" if names_it else ""


def check_attention(attn: str) -> None:
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError(
            "model.attn_implementation: 'flash_attention_2' needs the flash-attn package, which is not installed "
            "(pip install 'sap-ds[flash]' on a CUDA machine); use 'sdpa' (the default) or 'eager'"
        )


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"model.path: no usable tokenizer in '{path}' ({reason}); the folder needs the model's tokenizer files "
            "(tokenizer.json and tokenizer_config.json)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, path: Path):
    """The causal LM in ``cfg.dtype``; with ``from_config`` random weights from config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_attention(cfg.attn_implementation)
    dtype = DTYPES[cfg.dtype]
    common = dict(dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    if cfg.from_config:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **common)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(f"lora.target_modules: {missing} not found in the model; its linear layers are: {', '.join(linear)}")
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, peft_cfg)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DeepSpeed's engine and peft's wrappers: where its
    config, dtype, forward signature and decoder blocks are read (the probe's layers, the
    packed forward's attention path)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
