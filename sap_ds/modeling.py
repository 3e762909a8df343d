"""Load a causal LM and its tokenizer from a local folder, optionally with LoRA.

Under ZeRO-3 the model is built inside DeepSpeed's ``zero.Init`` (through transformers'
``HfDeepSpeedConfig``), so a 70B model is partitioned as it loads and never exists whole
on one GPU. Nothing is fetched from a hub: paths must be local folders.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from sap_ds.config import EMBEDDED_MODEL, LoraConfig, ModelConfig
from sap_ds.errors import ModelError  # noqa: F401 - defined there, raised and imported from here

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_FILES = ("*.safetensors", "*.bin")


def resolve_model_path(cfg: ModelConfig) -> Path:
    from sap_ds.embedded import TINY_MODEL, embedded_model_dir, tiny_model_dir

    if cfg.path == EMBEDDED_MODEL:
        return embedded_model_dir()
    if cfg.path == TINY_MODEL:
        return tiny_model_dir()
    path = Path(cfg.path)
    if not path.is_dir():
        raise ModelError(
            f"model.path: '{cfg.path}' is not a local folder; give a Hugging Face model folder "
            f"(with config.json and weights) or '{EMBEDDED_MODEL}' for the embedded SmolLM2-135M-Instruct (or '{TINY_MODEL}' for the test model)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path: '{path}' has no config.json; it is not a Hugging Face model folder")
    if not cfg.from_config and not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ModelError(
            f"model.path: '{path}' has config.json but no weights ({' or '.join(WEIGHT_FILES)}); give a complete "
            "model folder, or set model.from_config=true for random weights"
        )
    return path


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
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(f"lora.target_modules: {missing} not found in the model; its linear layers are: {', '.join(linear)}")
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, peft_cfg)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
