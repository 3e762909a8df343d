"""Task and safety losses.

Response log-probabilities are computed the standard way: one forward pass over
``prompt + response``, logits at position t predict token t+1, prompt and padding
positions masked. (The authors' reference script feeds prompt-only ``input_ids`` with
full-text labels, so its "log-probabilities" are not those of the responses.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sap_ds.data import IGNORE_INDEX
from sap_ds.data.packing import is_packed
from sap_ds.model.packed_forward import packed_forward, packing_attention


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits of a padded batch, or of a packed one (``position_ids``, no padding mask:
    ``data.packing`` keeps attention within each example, ``sap_ds/model/packed_forward.py``)."""
    if is_packed(batch):
        return packed_forward(model, batch, packing_attention(model))
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) for the shifted labels, and the mask of response tokens."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of the micro-batch (packed or
    not: a pack's loss is the token mean over all its examples' response tokens, the same
    number as those examples collated unpacked into one micro-batch)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def response_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of each sequence's response tokens, shape [batch]."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(-1)


def safety_loss(logits: torch.Tensor, labels: torch.Tensor, form: str, temperature: float = 1.0) -> torch.Tensor:
    """Safety loss on a batch whose first half holds safe and second half harmful responses
    to the same prompts (``data.collate_pairs``). Low when the model prefers safe answers.

    contrastive: -mean log sigmoid((logp(safe) - logp(harmful)) / T)   (the authors' code)
    difference:  CE(safe responses) - CE(harmful responses)             (the paper's text)
    """
    half = logits.shape[0] // 2
    if form == "contrastive":
        logp = response_logprob(logits, labels)
        return -F.logsigmoid((logp[:half] - logp[half:]) / temperature).mean()
    if form == "difference":
        return task_loss(logits[:half], labels[:half]) - task_loss(logits[half:], labels[half:])
    raise ValueError(f"sap.safety_loss: '{form}' is not one of 'contrastive', 'difference'")
