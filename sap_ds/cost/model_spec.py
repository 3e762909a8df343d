"""The architecture numbers of a Llama-style decoder (``ModelSpec``): read from a Hugging
Face ``config.json`` or named (``NAMED_MODELS``), for the closed-form models that need no
weights: the memory plan (``sap_ds.cost.plan``), the FLOPs model (``sap_ds.cost.flops``) and the
evaluation's size checks. Pure Python: nothing here imports torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


@dataclass(frozen=True)
class ModelSpec:
    """The architecture numbers of a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: Optional[int] = None
    attention_bias: bool = False  # q/k/v biases (Qwen2); o_proj never has one here
    mlp_bias: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.hd

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear modules: name -> (in_features, out_features)."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_tensors(self) -> list[int]:
        """Element counts of every parameter tensor in one decoder layer."""
        sizes = []
        for name, (d_in, d_out) in self.linear_shapes().items():
            sizes.append(d_in * d_out)
            if (self.attention_bias and name in ("q_proj", "k_proj", "v_proj")) or (
                self.mlp_bias and name in ("gate_proj", "up_proj", "down_proj")
            ):
                sizes.append(d_out)
        sizes += [self.hidden_size, self.hidden_size]  # input_layernorm, post_attention_layernorm (RMSNorm weights)
        return sizes

    def all_tensors(self) -> list[int]:
        """Element counts of every parameter tensor of the model (tied lm_head counted once)."""
        emb = self.vocab_size * self.hidden_size
        tensors = [emb]
        for _ in range(self.num_hidden_layers):
            tensors += self.layer_tensors()
        tensors.append(self.hidden_size)  # final norm
        if not self.tie_word_embeddings:
            tensors.append(emb)  # lm_head
        return tensors

    def param_count(self) -> int:
        return sum(self.all_tensors())

    def largest_layer_params(self) -> int:
        """The biggest single module gathered at once by ZeRO-3 (embedding/lm_head or an MLP matrix)."""
        return max(self.all_tensors())

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: all linears + lm_head (tied or not)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        return self.num_hidden_layers * per_layer + self.vocab_size * self.hidden_size

    def lora_params(self, r: int, targets: Sequence[str]) -> int:
        """Exact LoRA adapter size: r*(d_in + d_out) per targeted linear per layer."""
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise PlanError(f"unknown LoRA target module(s) {unknown}; valid: {', '.join(shapes)}")
        return self.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)

    def lora_tensors(self, r: int, targets: Sequence[str]) -> list[int]:
        shapes = self.linear_shapes()
        out = []
        for _ in range(self.num_hidden_layers):
            for t in targets:
                out += [r * shapes[t][0], r * shapes[t][1]]  # lora_A, lora_B
        return out


# Numbers from the public Hugging Face config.json of each model.
NAMED_MODELS: dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec("llama2-7b", 4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": ModelSpec("llama2-13b", 5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": ModelSpec("llama2-70b", 8192, 28672, 80, 64, 8, 32000),
    "llama3-8b": ModelSpec("llama3-8b", 4096, 14336, 32, 32, 8, 128256),
    "llama3-70b": ModelSpec("llama3-70b", 8192, 28672, 80, 64, 8, 128256),
    "qwen2.5-0.5b": ModelSpec("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, tie_word_embeddings=True, attention_bias=True),
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, attention_bias=True),
    "qwen2.5-72b": ModelSpec("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, attention_bias=True),
    "mistral-7b": ModelSpec("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
    "smollm2-135m": ModelSpec("smollm2-135m", 576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True),
}

_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class PlanError(ValueError):
    """A usage error: the message says what was wrong and what would be valid."""


def model_from_config(path: str | Path) -> ModelSpec:
    """Read the architecture of a Llama-style model from a HF config.json (or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"model config not found: {path} (give a config.json path or one of: {', '.join(NAMED_MODELS)})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    missing = [k for k in _REQUIRED_KEYS if k not in cfg]
    if missing:
        raise PlanError(f"{path}: missing key(s) {missing}; a Llama-style config.json needs {list(_REQUIRED_KEYS)}")
    model_type = str(cfg.get("model_type", ""))
    return ModelSpec(
        name=str(path),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        vocab_size=int(cfg["vocab_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
        attention_bias=bool(cfg.get("attention_bias", model_type.startswith("qwen2"))),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def resolve_model(spec: str) -> ModelSpec:
    if spec in NAMED_MODELS:
        return NAMED_MODELS[spec]
    if spec.endswith(".json") or "/" in spec or Path(spec).exists():
        return model_from_config(spec)
    raise PlanError(f"unknown model '{spec}': give a config.json path or one of: {', '.join(NAMED_MODELS)}")
