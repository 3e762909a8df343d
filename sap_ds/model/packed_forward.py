"""The model's forward on packed batches (``data.packing``): attention kept within each example.

A packed row holds several examples end to end (``sap_ds/data/packing.py`` packs them and
collates the rows: position ids restart at 0 for each example, ``sequence_ids`` number
them). How the model is kept from attending across an example boundary depends on its
attention code (``packing_attention`` picks it once, before step 1):

- ``position_ids``: no attention mask is passed; transformers' masking utilities find the
  examples from the restarting position ids and build a block-diagonal causal mask (sdpa,
  eager, flex). Checked by tests/test_packing.py against the examples run unpacked.
- ``flash_varlen``: flash-attention 2/3 attends within the example boundaries (varlen
  kernels), but only for a batch of one row, so a micro-batch's packs are laid end to end
  into one row for the forward. The boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``)
  are computed here once per batch and passed to the forward (``flash_varlen_kwargs``):
  left to transformers, every attention layer would rebuild them from the position ids,
  with host syncs, in every forward and every checkpoint recompute.
- ``block_mask``: a model whose code does not read packed position ids but takes a 4-D
  attention mask gets an explicit block-diagonal causal mask (additive, model dtype).
- anything else: an error before the first step (``packing_attention``).
"""
from __future__ import annotations

import inspect
import sys

import torch

from sap_ds.model.loading import unwrap_model

FLASH = ("flash_attention_2", "flash_attention_3")
MASK_READING = ("sdpa", "eager", "flex_attention")


def block_mask(sequence_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: causal, and only within one example (padding: among itself)."""
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    width = sequence_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = (same & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packing_attention(model) -> str:
    """How ``model`` keeps packed examples apart: 'position_ids', 'flash_varlen' or
    'block_mask' (module docstring); a ModelError when it can do none of them."""
    from transformers import masking_utils

    from sap_ds.errors import ModelError

    base = unwrap_model(model)
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None)
    params = inspect.signature(base.forward).parameters
    takes_positions = "position_ids" in params and "attention_mask" in params
    module = sys.modules.get(type(base).__module__)
    if impl in FLASH and takes_positions:
        return "flash_varlen"
    if impl in MASK_READING and takes_positions and getattr(module, "create_causal_mask", None) is masking_utils.create_causal_mask:
        return "position_ids"
    if impl in ("sdpa", "eager") and takes_positions:
        return "block_mask"
    raise ModelError(
        f"data.packing: {type(base).__name__} (attention '{impl}') can keep packed examples apart neither by position ids "
        "(transformers' masking utilities, flash-attention varlen) nor by a 4-D block mask (sdpa/eager with position_ids "
        "and attention_mask arguments); set data.packing=false, or model.attn_implementation to sdpa or flash_attention_2"
    )


def flash_varlen_kwargs(positions: torch.Tensor) -> dict:
    """The varlen arguments of transformers' flash-attention path (``FlashAttentionKwargs``)
    for packed rows laid end to end: a segment starts wherever the position ids restart
    (the padding after a row's last example is a segment of its own), as transformers'
    ``prepare_fa_kwargs_from_position_ids`` finds them. Computed on the host from one copy
    of the position ids (the batch's one host sync), with ``max_length`` a Python int:
    flash-attn takes an int, and a tensor would be read back in every layer."""
    flat = positions.reshape(-1).cpu()
    starts = (flat == flat.min()).nonzero().flatten()
    bounds = torch.cat((starts, torch.tensor([flat.numel()]))).to(torch.int32)
    longest = int(bounds.diff().max())
    bounds = bounds.to(positions.device)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def packed_forward(model, batch: dict, mode: str):
    """The model's output on a packed batch, attention kept within each example."""
    ids, positions = batch["input_ids"], batch["position_ids"]
    if mode == "flash_varlen":
        rows, width = ids.shape
        base = unwrap_model(model)
        # Only flash-attention reads the varlen arguments (a model on another attention code in
        # this layout keeps finding the examples from the position ids), and only through **kwargs.
        takes_varlen = (getattr(getattr(base, "config", None), "_attn_implementation", None) in FLASH and any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values()))
        varlen = flash_varlen_kwargs(positions) if takes_varlen else {}
        out = model(input_ids=ids.reshape(1, -1), position_ids=positions.reshape(1, -1), use_cache=False, **varlen)
        return out.logits.reshape(rows, width, -1)
    mask = block_mask(batch["sequence_ids"], unwrap_model(model).dtype) if mode == "block_mask" else None
    return model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
