"""What ``--model`` names: a full model folder, or a LoRA adapter folder and its base.

A LoRA run exports ``export/adapter`` (PEFT's ``adapter_config.json`` and
``adapter_model.safetensors``, no ``config.json``) beside or instead of the merged
``export/model``. An adapter folder is evaluated on its base model: the one
``--base`` names, else the adapter config's ``base_model_name_or_path``. The
transformers backends merge it into the base in memory
(``PeftModel.from_pretrained(...).merge_and_unload()``: the same weights as an exported
merged model, and no second copy on disk); vLLM applies it as a LoRA request. Nothing is
downloaded: a base that is not a local folder (a hub name) needs ``--base``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer_config.json",)


@dataclass(frozen=True)
class ModelSource:
    """The folders one evaluation reads: the full model (an adapter's base), the adapter
    if any, and where the tokenizer comes from (the adapter's own if it ships one)."""

    path: Path
    tokenizer_path: Path
    adapter: Optional[Path] = None
    adapter_config: Optional[dict] = None

    @property
    def lora_rank(self) -> Optional[int]:
        return None if self.adapter_config is None else int(self.adapter_config.get("r") or 0) or None


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: Path) -> dict:
    from sap_ds.errors import ModelError

    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc}); a PEFT adapter folder holds the adapter_config.json "
                         "that save_pretrained wrote") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object (PEFT's adapter config), got {type(config).__name__}")
    return config


def resolve_source(model: str, base: Optional[str] = None) -> ModelSource:
    """The folders behind ``--model`` (and ``--base``); ModelError, naming the file and
    the flag to pass, when an adapter's base model is not a local folder."""
    from sap_ds.config.run import ModelConfig
    from sap_ds.errors import ModelError
    from sap_ds.model.loading import resolve_model_path

    folder = Path(model)
    if not (folder.is_dir() and is_adapter_folder(folder)):
        if base is not None:
            raise ModelError(f"--base: '{model}' is not an adapter folder (it has no {ADAPTER_CONFIG}); --base names "
                             "the base model of a LoRA adapter folder, drop it for a full model")
        path = resolve_model_path(ModelConfig(path=model), key="--model")  # a run folder: names its export
        return ModelSource(path=path, tokenizer_path=path)
    config = read_adapter_config(folder)
    config_file = folder / ADAPTER_CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{config_file}: peft_type '{config.get('peft_type')}': sap-ds evaluates LoRA adapters "
                         "(peft_type LORA); merge other adapters into a full model folder first")
    named = base or config.get("base_model_name_or_path")
    if not named:
        raise ModelError(f"{config_file} names no base model (base_model_name_or_path is empty); pass --base FOLDER, "
                         "the local model folder the adapter was trained from")
    try:
        path = resolve_model_path(ModelConfig(path=str(named)))
    except ModelError as exc:
        where = "--base" if base else f"{config_file}: base_model_name_or_path"
        raise ModelError(f"{where} '{named}' is not a usable local model folder ({str(exc).removeprefix('model.path: ')}); pass --base FOLDER, the "
                         "local model folder the adapter was trained from (nothing is downloaded)") from None
    has_tokenizer = all((folder / name).is_file() for name in TOKENIZER_FILES)
    return ModelSource(path=path, tokenizer_path=folder if has_tokenizer else path, adapter=folder, adapter_config=config)


def merge_adapter(model, source: ModelSource):
    """The base model with the adapter merged in (no PEFT wrapper left)."""
    if source.adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(source.adapter)).merge_and_unload()
