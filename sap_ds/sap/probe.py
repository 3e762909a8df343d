"""The SAP probe: one vector per probe layer, added to that decoder block's output.

The probe is a plain fp32 tensor owned by this object, not a model parameter, so ZeRO-3
never partitions it: every rank holds the same full copy (kept identical by averaging its
gradient across ranks). Hooks add it to the residual stream, in fp32 whatever the model's
dtype (the sum cast once: gV is then an fp32 reduction); the authors add it as a bias
on ``mlp.down_proj`` of the same layers, which is the same thing (``with_probe_as_bias``
writes it so into an exported model: ``export.keep_probe``).
"""
from __future__ import annotations

import torch
from torch import nn

from sap_ds.errors import ProbeError  # defined there (a user error is reported without importing torch)
from sap_ds.model.loading import unwrap_model

# Where the decoder blocks live, per architecture family (first match wins).
DECODER_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM
    "model.model.layers",  # same, under a peft wrapper's base_model
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.layers",
)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = unwrap_model(model)
    for path in DECODER_LAYER_PATHS:
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    raise ProbeError(
        f"cannot find the decoder layers of {type(base).__name__}: looked for {', '.join(DECODER_LAYER_PATHS)}; "
        "sap-ds supports Llama, Mistral, Qwen2, Gemma, GPT-NeoX and GPT-2 style models"
    )


def check_layers(layers: list[int], depth: int) -> None:
    """ProbeError unless every probe layer indexes one of ``depth`` decoder blocks (negative
    indices count from the top). Run before the model loads (``sap_ds.train.fail_fast``,
    from config.json) and again on the model itself."""
    bad = [i for i in layers if not -depth <= i < depth]
    if bad:
        raise ProbeError(
            f"sap.probe_layers: {bad} out of range; the model has {depth} decoder layers "
            f"(valid indices 0..{depth - 1}, or -{depth}..-1 from the top; a band 'first-last' must lie within 0..{depth - 1})"
        )


DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # Llama-style, GPT-2, others


def check_layers_from_config(layers: list[int], config_json) -> None:
    """``check_layers`` against the depth a model folder's config.json declares; nothing
    when it declares none of ``DEPTH_KEYS`` (the check on the loaded model still runs)."""
    import json
    from pathlib import Path

    try:
        tree = json.loads(Path(config_json).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    tree = tree.get("text_config", tree) if isinstance(tree, dict) else {}
    depth = next((tree[k] for k in DEPTH_KEYS if isinstance(tree.get(k), int)), None)
    if depth:
        check_layers(layers, depth)


class Probe:
    """Per-layer additive vectors ``V``, shape ``[len(layers), hidden]``, fp32, replicated."""

    def __init__(self, model: nn.Module, layers: list[int], hidden_size: int, device: torch.device):
        blocks = find_decoder_layers(model)
        check_layers(layers, len(blocks))
        self.layers = sorted(i % len(blocks) for i in layers)
        self.vectors = torch.zeros(len(self.layers), hidden_size, dtype=torch.float32, device=device, requires_grad=True)
        self.enabled = True
        self.cut_below = False  # probe pass: detach the residual stream under the lowest probe layer
        # sap.probe_in_safety: V is added as a constant (the authors' bias with requires_grad off),
        # so the safety backward neither reads nor writes its gradient.
        self.frozen = False
        # Mean per-token hidden-state norm at each probe layer (before the probe is added),
        # from the last forward with measure on: what sap.probe_scale is relative to.
        self.measure = False
        self.hidden_norms = torch.zeros(len(self.layers), dtype=torch.float32, device=device)
        self._handles = [blocks[layer].register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def add_probe(module, inputs, output):
            if not self.enabled:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            if self.measure:
                self.hidden_norms[index] = hidden.detach().float().norm(dim=-1).mean()
            if self.cut_below and index == 0:
                # Nothing below the lowest probe layer can influence grad_V: cut the graph
                # so the probe pass keeps no activations and runs no backward there.
                hidden = hidden.detach()
            # In fp32, cast once: autograd then reduces grad_V over batch x sequence into
            # an fp32 sum (a bf16 add would round it to bf16, 2**-9 relative, as large as
            # gV itself at small rho: docs/algorithm.md, "Precision of the probe gradient").
            # Type promotion makes the sum fp32 without a separate fp32 copy of ``hidden``.
            vector = self.vectors[index].detach() if self.frozen else self.vectors[index]
            hidden = (hidden + vector).to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return add_probe

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def reset(self) -> None:
        self.vectors.zero_()

    @torch.no_grad()
    def init_random(self, norm: float, seed: int) -> None:
        """Gaussian vectors of L2 norm ``norm`` per layer, the same on every rank (same seed)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        values = torch.randn(self.vectors.shape, generator=gen, dtype=torch.float32)
        self.vectors.copy_(values / values.norm(dim=-1, keepdim=True) * norm)

    @torch.no_grad()
    def rescale(self, targets: torch.Tensor) -> None:
        """Each layer's vector to L2 norm ``targets[i]``, direction kept (zero stays zero)."""
        norms = self.vectors.norm(dim=-1, keepdim=True)
        self.vectors.mul_(torch.where(norms > 0, targets.to(norms).unsqueeze(-1) / norms.clamp_min(1e-30), torch.zeros_like(norms)))


def with_probe_as_bias(model, probe):
    """The same model with ``config.mlp_bias`` on: zero MLP biases except ``down_proj`` of
    the probe layers, which holds the probe vector. A block's output is ``h + mlp(...)``,
    so a bias on its last projection adds the vector to the block's output, as the hook
    does in training. Only architectures whose config has ``mlp_bias`` (Llama family)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if not hasattr(config, "mlp_bias"):
        raise ValueError(f"export.keep_probe: {type(model).__name__} has no mlp_bias option to hold the probe; "
                         "set export.keep_probe false (the probe is saved as probe.safetensors either way)")
    config = config.__class__.from_dict(config.to_dict())
    config.mlp_bias = True
    biased = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = biased.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".bias") and not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"export.keep_probe: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    biased.tie_weights()
    blocks = find_decoder_layers(biased)
    with torch.no_grad():
        for name, param in biased.named_parameters():
            if name.endswith(".bias") and ".mlp." in name:
                param.zero_()
        for index, layer in enumerate(probe.layers):
            blocks[layer].mlp.down_proj.bias.copy_(probe.vectors[index].detach().to(blocks[layer].mlp.down_proj.bias))
    return biased
