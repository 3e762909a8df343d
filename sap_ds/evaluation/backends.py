"""Which engine generates, and where the model lives.

- ``hf``: transformers, the whole model on each rank's device; under a launcher the
  ranks share the prompts (data parallel). The fastest choice when the model fits one
  device, and the only one on CPU.
- ``device_map``: transformers with ``device_map="auto"`` (accelerate): one process,
  the layers spread over every visible GPU (and CPU RAM if they do not fit), one GPU
  computing at a time. Needs no extra package beyond accelerate; slow but always works.
- ``vllm``: one process, vLLM with tensor parallelism over ``tensor_parallel_size`` GPUs
  (``sap_ds.evaluation.vllm_backend``, the one module that imports vllm; an optional
  extra, ``pip install 'sap-ds[vllm]'``).
- ``auto``: ``hf`` on CPU and whenever the model fits one GPU (weights in the eval
  dtype, the KV cache of one batch, the logits, a reserve; ``estimate_memory``), else
  ``vllm`` when it is installed, else ``device_map``.

Every backend offers the same three calls (``generate``, ``response_nll``, ``close``),
so tasks and scorers do not know which one runs.
"""
from __future__ import annotations

import gc
import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from sap_ds.errors import ConfigError
from sap_ds.evaluation.runtime import device, gather, rank_world, shard_map
from sap_ds.evaluation.vllm_backend import VLLM_MISSING, VllmBackend
from sap_ds.model.loading import DTYPES

GIB = 1 << 30
BYTES = {"bf16": 2, "fp32": 4}
ASSUMED_PROMPT_TOKENS = 1024  # KV-cache estimate: prompts up to this long, plus max_new_tokens
RESERVE_BYTES = 1 * GIB  # CUDA context, allocator slack, activations of one layer


def has_package(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- memory


def parameter_count(path: Path) -> Optional[int]:
    """Parameters of a model folder, from its safetensors headers (no weight is read; only
    the shards its index names, when it has one: some folders ship a consolidated copy
    beside the shards); from config.json for a Llama-style model without safetensors;
    None if neither."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / name for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        total = 0
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    total += int(torch.Size(shape).numel())
        return total
    from sap_ds.cost.model_spec import PlanError, model_from_config

    try:
        return model_from_config(path).param_count()
    except PlanError:
        return None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device needs to hold the whole model and generate (the ``hf`` backend)."""

    weights: int
    kv_cache: int
    logits: int
    reserve: int = RESERVE_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits + self.reserve

    def as_gib(self) -> dict:
        return {k: round(v / GIB, 2) for k, v in {**asdict(self), "total": self.total}.items()}


def estimate_memory(path: Path, dtype: str, batch_size: int, new_tokens: int, loss_batch: int = 0,
                    loss_length: int = 0) -> Optional[MemoryEstimate]:
    """Weights (parameters x bytes of the eval dtype), the KV cache of one generation
    batch (2 x layers x KV heads x head dim x bytes per token, for ``batch_size`` x
    (ASSUMED_PROMPT_TOKENS + ``new_tokens``) tokens), the fp32 logits (and log-softmax) of
    one test-loss batch, and a reserve. None when the model's size cannot be read."""
    from sap_ds.cost.model_spec import PlanError, model_from_config

    params = parameter_count(path)
    if params is None:
        return None
    try:
        spec = model_from_config(path)
    except PlanError:
        spec = None
    kv = 0 if spec is None else 2 * spec.num_hidden_layers * spec.kv_dim * BYTES[dtype] * batch_size * (ASSUMED_PROMPT_TOKENS + new_tokens)
    vocab = 0 if spec is None else spec.vocab_size
    logits = 2 * 4 * vocab * max(loss_batch * loss_length, batch_size)
    return MemoryEstimate(weights=params * BYTES[dtype], kv_cache=kv, logits=logits)


def free_device_memory() -> Optional[int]:
    """Free bytes on this rank's GPU, the least over all ranks; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device())
    return min(gather(int(free)))


# --------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def choose_backend(asked: str, *, need: Optional[int], free: Optional[int], world: int,
                   vllm_available, accelerate_available) -> Choice:
    """The backend to use and why. ``vllm_available``/``accelerate_available`` are called
    only when their answer matters (importing vllm takes seconds). ConfigError, naming
    ``backend`` and what would work, when the asked-for one cannot run here."""
    one_process = ("backend '{b}' runs in one process and spreads the model over the node's GPUs itself; start "
                   "sap-ds eval without deepspeed/torchrun (this run has {w} ranks)")
    if asked in ("device_map", "vllm") and world > 1:
        raise ConfigError(one_process.format(b=asked, w=world))
    if asked == "vllm":
        if not vllm_available():
            raise ConfigError(VLLM_MISSING.format(asked=asked))
        return Choice("vllm", "asked for (backend: vllm)")
    if asked == "device_map":
        if not accelerate_available():
            raise ConfigError("backend 'device_map' needs the accelerate package, which is not installed: "
                              "pip install accelerate, or set backend: hf (the whole model on each device)")
        return Choice("device_map", "asked for (backend: device_map)")
    if asked == "hf":
        return Choice("hf", "asked for (backend: hf)")
    if free is None:
        return Choice("hf", "no CUDA device: the whole model in CPU memory on each rank")
    if need is None:
        return Choice("hf", "the model's size could not be read (no safetensors, not a Llama-style config.json): "
                            "assumed to fit one GPU; set backend explicitly if it does not")
    sizes = f"needs ~{need / GIB:.1f} GiB, one GPU has {free / GIB:.1f} GiB free"
    if need <= free:
        return Choice("hf", f"fits one GPU ({sizes}): a whole copy per rank, ranks share the prompts")
    if world > 1:
        raise ConfigError(f"backend 'auto': the model {sizes}, so it must be split over GPUs, and the sharded "
                          f"backends (vllm, device_map) run in one process; start sap-ds eval without "
                          f"deepspeed/torchrun (this run has {world} ranks), or set backend: hf if it does fit")
    if vllm_available():
        return Choice("vllm", f"does not fit one GPU ({sizes}): vLLM with tensor parallelism")
    if accelerate_available():
        return Choice("device_map", f"does not fit one GPU ({sizes}) and vllm is not installed: transformers "
                                    "device_map='auto' over the node's GPUs")
    raise ConfigError(f"backend 'auto': the model {sizes}, and neither vllm (pip install 'sap-ds[vllm]') nor "
                      "accelerate (pip install accelerate, for backend: device_map) is installed to split it")


# --------------------------------------------------------------------------- transformers


def load_causal_lm(path: Path, dtype: str, device_map=None):
    """A local causal LM in eval mode (no remote code, ever): on this rank's device, or
    placed by ``device_map``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False, device_map=device_map)
    return model.eval() if device_map is not None else model.eval().to(device())


class HFBackend:
    """A transformers model: whole on each rank (``hf``) or split by accelerate
    (``device_map``, one process: ``shard_map`` then runs everything locally)."""

    def __init__(self, name: str, model, tokenizer):
        self.name, self.model, self.tokenizer = name, model, tokenizer

    def generate(self, texts: Sequence[str], settings, *, seed: int = 0, max_new_tokens: Optional[int] = None,
                 desc: str = "generate", stats=None):
        from sap_ds.evaluation.generation import generate

        return generate(self.model, self.tokenizer, texts, settings, seed=seed, max_new_tokens=max_new_tokens,
                        desc=desc, stats=stats)

    def response_nll(self, items: Sequence, batch_size: int) -> list[tuple[float, int]]:
        """Per example: summed cross-entropy of its response tokens and their count."""
        from sap_ds.data import collate
        from sap_ds.model.losses import forward_logits, token_logprobs

        def local(mine) -> list[tuple[float, int]]:
            out = []
            for start in range(0, len(mine), batch_size):
                batch = {k: v.to(self.model.device) for k, v in
                         collate(mine[start : start + batch_size], self.tokenizer.pad_token_id).items()}
                with torch.no_grad():
                    logp, mask = token_logprobs(forward_logits(self.model, batch), batch["labels"])
                out += list(zip((-logp.sum(-1)).tolist(), mask.sum(-1).tolist()))
            return out

        return shard_map(list(items), local)

    def close(self) -> None:
        """Free the model's memory (a judge model loads next)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_backend(source, tokenizer, cfg, dtype: str):
    """The backend ``cfg.backend`` asks for (or ``auto`` picks) holding ``source``'s
    model in ``dtype``, and a record of the choice for the report."""
    from sap_ds.evaluation.adapters import merge_adapter

    generation_tokens = max([cfg.generation.max_new_tokens] + [t.max_new_tokens or 0 for t in cfg.tasks]
                            + [s.max_new_tokens or 0 for s in [*cfg.harmful, *cfg.benign]]
                            + [(cfg.xstest.max_new_tokens or 0) if cfg.xstest is not None else 0])
    batch = max([cfg.generation.batch_size] + [t.batch_size or 0 for t in cfg.tasks if t.kind != "test_loss"])
    losses = [t for t in cfg.tasks if t.kind == "test_loss"]
    estimate = estimate_memory(source.path, dtype, batch, generation_tokens,
                               max((t.batch_size or 4 for t in losses), default=0), max((t.max_length for t in losses), default=0))
    free = free_device_memory() if cfg.backend == "auto" else None
    choice = choose_backend(cfg.backend, need=None if estimate is None else estimate.total, free=free,
                            world=rank_world()[1], vllm_available=lambda: has_package("vllm"),
                            accelerate_available=lambda: has_package("accelerate"))
    info = {"backend": choice.backend, "reason": choice.reason, "dtype": dtype,
            "memory_gib": None if estimate is None else estimate.as_gib(),
            "free_gib": None if free is None else round(free / GIB, 2)}
    if choice.backend == "vllm":
        backend = VllmBackend(source, tokenizer, cfg, dtype)
        info["tensor_parallel_size"] = backend.tensor_parallel_size
        return backend, info
    if choice.backend == "device_map":
        model = merge_adapter(load_causal_lm(source.path, dtype, device_map="auto"), source)
        info["device_map"] = sorted({str(p.device) for p in model.parameters()})
        return HFBackend("device_map", model, tokenizer), info
    on_gpu = torch.cuda.is_available() and has_package("accelerate")  # load straight onto the GPU
    model = merge_adapter(load_causal_lm(source.path, dtype, device_map={"": device()} if on_gpu else None), source)
    return HFBackend("hf", model.to(device()), tokenizer), info


def memory_table(models: Sequence[str] = ("llama2-7b", "llama3-8b", "llama2-13b", "llama2-70b", "llama3-70b"),
                 dtype: str = "bf16", batch_size: int = 16, new_tokens: int = 64, free_gib: float = 78.0,
                 gpus: int = 8) -> str:
    """The memory table of docs/evaluation.md, from the same estimate ``auto`` uses
    (``python -m sap_ds.evaluation.backends``): what one GPU needs for ``hf``, what
    ``auto`` picks with ``free_gib`` free per GPU (an 80 GB H100/A100), and the weights
    per GPU when split over ``gpus``."""
    from sap_ds.cost.model_spec import NAMED_MODELS

    lines = [f"| model | weights ({dtype}) | KV cache, {batch_size} x {ASSUMED_PROMPT_TOKENS + new_tokens} tokens | "
             f"hf: one GPU needs | auto, {free_gib:.0f} GiB free per GPU | weights per GPU over {gpus} |",
             "|---|---|---|---|---|---|"]
    for name in models:
        spec = NAMED_MODELS[name]
        weights = spec.param_count() * BYTES[dtype]
        kv = 2 * spec.num_hidden_layers * spec.kv_dim * BYTES[dtype] * batch_size * (ASSUMED_PROMPT_TOKENS + new_tokens)
        total = weights + kv + 2 * 4 * spec.vocab_size * batch_size + RESERVE_BYTES
        picked = choose_backend("auto", need=total, free=int(free_gib * GIB), world=1, vllm_available=lambda: True,
                                accelerate_available=lambda: True).backend
        picked = "hf (data parallel)" if picked == "hf" else "vllm, else device_map"
        lines.append(f"| {name} | {weights / GIB:.1f} GiB | {kv / GIB:.1f} GiB | {total / GIB:.1f} GiB | {picked} | "
                     f"{weights / gpus / GIB:.1f} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(memory_table())
    print(json.dumps({"assumed_prompt_tokens": ASSUMED_PROMPT_TOKENS, "reserve_gib": RESERVE_BYTES / GIB}))
