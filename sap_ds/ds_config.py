"""The DeepSpeed JSON, completed from the run config.

The run config decides batch sizes, precision and clipping; the DeepSpeed file decides
the engine's internals. Values the run config owns may be "auto" (filled here) or
spelled out, in which case they must agree: a silent disagreement would train with a
batch size nobody asked for.
"""
from __future__ import annotations

import json
from pathlib import Path

from sap_ds.config import ConfigError, RunConfig


def load_ds_config(cfg: RunConfig, world_size: int, on_gpu: bool) -> dict:
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"deepspeed_config: file not found: {path}; the shipped ones are in ds_configs/")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 text (byte {exc.start})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object of DeepSpeed keys, got {type(ds).__name__}")
    for section in ("zero_optimization", "fp16", "bf16"):
        if section in ds and not isinstance(ds[section], dict):
            raise ConfigError(f"{path}: '{section}' must be a JSON object, got {ds[section]!r}")
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(
                f"{path}: key '{owned}' is set by sap-ds from the run config (train.lr, train.lr_schedule, ...); remove it"
            )
    if ds.get("fp16", {}).get("enabled") not in (None, False):
        raise ConfigError(f"{path}: 'fp16.enabled' is not supported; use model.dtype bf16 or fp32")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ConfigError(f"{path}: 'zero_optimization.stage' must be 3 (got {zero.get('stage')!r}); sap-ds works on ZeRO-3 shards")
    if not on_gpu:
        for key in ("offload_optimizer", "offload_param"):
            if zero.get(key, {}).get("device") == "nvme":
                raise ConfigError(f"{path}: 'zero_optimization.{key}.device' nvme needs a GPU machine")

    train = cfg.train
    wanted = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
    }
    run_keys = {
        "train_micro_batch_size_per_gpu": "train.micro_batch_size",
        "gradient_accumulation_steps": "train.grad_accum",
        "train_batch_size": "train.micro_batch_size x train.grad_accum x world size",
        "gradient_clipping": "train.grad_clip",
    }
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto":
            try:
                float(given)
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: '{key}' must be a number or \"auto\", got {given!r}") from None
        if given != "auto" and float(given) != float(value):
            raise ConfigError(
                f"{path}: '{key}' is {given} but the run config gives {value} ({run_keys[key]}); "
                f"set it to \"auto\" or make them agree"
            )
        ds[key] = value
    bf16 = cfg.model.dtype == "bf16"
    given = ds.get("bf16", {}).get("enabled", "auto")
    if given != "auto" and bool(given) != bf16:
        raise ConfigError(f"{path}: 'bf16.enabled' is {given} but model.dtype is {cfg.model.dtype}; set it to \"auto\"")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": train.lr,
            "betas": list(train.adam_betas),
            "eps": train.adam_eps,
            "weight_decay": train.weight_decay,
            "torch_adam": True,  # no JIT-compiled FusedAdam/CPUAdam build
            "adam_w_mode": True,
        },
    }
    ds.setdefault("steps_per_print", 10**9)
    return ds
