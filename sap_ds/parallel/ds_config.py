"""The DeepSpeed JSON, completed from the run config.

The run config decides batch sizes, precision and clipping; the DeepSpeed file decides
the engine's internals. Values the run config owns may be "auto" (filled here) or
spelled out, in which case they must agree: a silent disagreement would train with a
batch size nobody asked for. Engine settings the run's method cannot honour are refused
here, before any rank starts (``MethodSection.check_engine``: SAP refuses ZeRO++ hpZ and
qwZ, MiCS, and offload with ``sap.kernels: triton``); NVMe offload is refused for every
method (``NVME_SWAPPED``).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

from sap_ds.config.run import RunConfig
from sap_ds.errors import ConfigError


# NVMe offload (ZeRO-Infinity), refused: what DeepSpeed 0.19 then swaps out of memory
# (runtime/zero/stage3.py:1117-1118: a swappable group's fp32 master is torch.empty(0); with
# parameter offload a group's working shard is None, stage3.py:1322).
NVME_SWAPPED = {
    "offload_optimizer": "the fp32 master weights and their gradients (an empty tensor in their place)",
    "offload_param": "the working shards of the weights",
}


def load_ds_config(cfg: RunConfig, world_size: int) -> dict:
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
    for key, what in NVME_SWAPPED.items():
        if zero.get(key, {}).get("device") == "nvme":
            raise ConfigError(
                f"{path}: 'zero_optimization.{key}.device' is nvme, which sap-ds cannot honour for any method, on GPU or "
                f"CPU: DeepSpeed then keeps {what} on NVMe with no copy in memory, and sap-ds works on those shards in "
                f"memory for every method (its view of the shards built at start, the padding zeroed on resume, a "
                f"non-finite step's gradients dropped; SAP perturbs from the fp32 masters and Lisa anchors to them). "
                f"Set it to \"cpu\" (ZeRO-Offload to CPU memory, supported by every method) or \"none\"")
    offloaded = [key for key in ("offload_optimizer", "offload_param") if _offloaded(zero, key)]
    cfg.method_section.check_engine(zero, offloaded, path)

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
            hint = _batch_hint(float(given), train.micro_batch_size, world_size) if key == "train_batch_size" else ""
            raise ConfigError(
                f"{path}: '{key}' is {given} but the run config gives {value} ({run_keys[key]}); "
                f"set it to \"auto\" or make them agree{hint}"
            )
        ds[key] = value
    bf16 = cfg.model.dtype == "bf16"
    given = ds.get("bf16", {}).get("enabled", "auto")
    if given != "auto" and bool(given) != bf16:
        raise ConfigError(f"{path}: 'bf16.enabled' is {given} but model.dtype is {cfg.model.dtype}; set it to \"auto\"")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    adam, _ = optimizer_choice(cfg, ds)
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": train.lr,
            "betas": list(train.adam_betas),
            "eps": train.adam_eps,
            "weight_decay": train.weight_decay,
            # torch AdamW unless the optimizer is offloaded and DeepSpeed's CPU Adam can be built
            # (never the CUDA FusedAdam: it would be JIT-compiled, for no gain over torch's AdamW)
            "torch_adam": adam == "torch",
            "adam_w_mode": True,
        },
    }
    ds.setdefault("steps_per_print", 10**9)
    return ds


def _offloaded(zero: dict, key: str) -> bool:
    section = zero.get(key)
    return isinstance(section, dict) and section.get("device") not in (None, "none")


def _batch_hint(batch: float, micro_batch: int, world_size: int) -> str:
    """What ``train.grad_accum`` would give a DeepSpeed ``train_batch_size`` of ``batch``."""
    per_step = micro_batch * world_size
    if batch > 0 and batch % per_step == 0:
        return (f"; with train.micro_batch_size={micro_batch} on {world_size} ranks, {batch:g} needs "
                f"train.grad_accum={int(batch // per_step)}")
    return (f"; {batch:g} is not a multiple of train.micro_batch_size x world size ({micro_batch} x {world_size} = "
            f"{per_step}), so no train.grad_accum gives it")


def optimizer_choice(cfg: RunConfig, ds: dict) -> tuple[str, str]:
    """``("deepspeed" | "torch", why)``: which Adam steps the weights. Only an offloaded
    optimizer uses DeepSpeed's CPU Adam (a vectorised C++ step over the CPU master,
    several times faster there than torch's AdamW); every other run steps torch AdamW."""
    if not _offloaded(ds.get("zero_optimization", {}), "offload_optimizer"):
        return "torch", "torch AdamW (the optimizer is not offloaded)"
    mode = cfg.train.offload_adam
    if mode == "torch":
        return "torch", "torch AdamW on the offloaded master (train.offload_adam=torch)"
    if mode == "deepspeed":
        return "deepspeed", "DeepSpeed CPU Adam on the offloaded master (train.offload_adam=deepspeed)"
    buildable, why = cpu_adam_buildable()
    if buildable:
        return "deepspeed", f"DeepSpeed CPU Adam on the offloaded master ({why})"
    return "torch", f"torch AdamW on the offloaded master: DeepSpeed's CPU Adam cannot be built here ({why})"


@functools.cache
def cpu_adam_buildable() -> tuple[bool, str]:
    """Whether DeepSpeed's CPU Adam op is installed, or can be JIT-compiled on first use
    (a ``DS_BUILD_OPS=0`` install: needs ninja and a C++ compiler; ~1 min once, then
    cached in the torch extensions folder). Nothing is compiled here."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops

        builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    except Exception as exc:  # a broken or partial DeepSpeed install
        return False, f"no CPU Adam builder: {type(exc).__name__}: {exc}"
    return cpu_adam_build_status(builder, installed_ops)


def cpu_adam_build_status(builder, installed_ops: dict) -> tuple[bool, str]:
    """The decision of ``cpu_adam_buildable`` for a given op builder (testable without
    DeepSpeed's accelerator): prebuilt, or compatible with ninja and a compiler on PATH
    (what torch's ``verify_ninja_availability`` and the JIT build look for)."""
    if builder is None:
        return False, "this accelerator has no CPU Adam builder"
    if installed_ops.get(builder.name, False):
        return True, "prebuilt op"
    if not builder.is_compatible(verbose=False):
        return False, f"the op is not compatible with this system ({getattr(builder, 'error_log', None) or 'no reason given'})"
    if shutil.which("ninja") is None:
        return False, "JIT compilation needs ninja (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"JIT compilation needs a C++ compiler ('{compiler}' not found; set CXX)"
    return True, "JIT-compiled on first use (about a minute, once), then cached"
