"""Losses (sap_ds/model/losses.py) against direct per-token loops on random logits, with prompt
masks and right padding, and the sign convention of the safety loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sap_ds.data import IGNORE_INDEX
from sap_ds.model.losses import response_logprob, safety_loss, task_loss, token_logprobs

VOCAB = 11


def _batch(lengths, prompts, width=None, seed=0):
    """Random logits [B, T, V] and labels: -100 on the first ``prompt`` tokens and on padding."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    logits = torch.randn(len(lengths), width, VOCAB, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, (n, p) in enumerate(zip(lengths, prompts)):
        labels[b, p:n] = ids[b, p:n]
    return logits, labels


def _loop_logprob(logits, labels):
    """Per sequence: sum over response positions t of log_softmax(logits[t-1])[token t]."""
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(1, logits.shape[1]):
            token = int(labels[b, t])
            if token == IGNORE_INDEX:
                continue
            row = logits[b, t - 1].double()
            total += float(row[token] - torch.logsumexp(row, dim=0))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def _loop_ce(logits, labels):
    terms = []
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            token = int(labels[b, t])
            if token != IGNORE_INDEX:
                row = logits[b, t - 1].double()
                terms.append(float(torch.logsumexp(row, dim=0) - row[token]))
    return sum(terms) / len(terms)


LENGTHS, PROMPTS = [9, 6, 12, 4], [3, 5, 2, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_response_logprob_matches_loop(seed):
    logits, labels = _batch(LENGTHS, PROMPTS, width=14, seed=seed)
    got = response_logprob(logits, labels)
    assert got.shape == (4,)
    torch.testing.assert_close(got.double(), _loop_logprob(logits, labels), rtol=1e-5, atol=1e-5)


def test_response_logprob_ignores_padding_and_prompt_logits():
    logits, labels = _batch(LENGTHS, PROMPTS, width=14)
    before = response_logprob(logits, labels)
    poked = logits.clone()
    for b, (n, p) in enumerate(zip(LENGTHS, PROMPTS)):
        poked[b, n:] = torch.randn_like(poked[b, n:]) * 100  # logits at padding predict nothing
        poked[b, : max(p - 1, 0)] = torch.randn_like(poked[b, : max(p - 1, 0)]) * 100  # they predict prompt tokens
    torch.testing.assert_close(response_logprob(poked, labels), before)


def test_token_logprobs_mask_and_values():
    logits, labels = _batch(LENGTHS, PROMPTS, width=14)
    logp, mask = token_logprobs(logits, labels)
    assert logp.shape == mask.shape == (4, 13)
    assert mask.sum(-1).tolist() == [n - p for n, p in zip(LENGTHS, PROMPTS)]
    assert (logp[~mask] == 0).all() and (logp[mask] < 0).all()


def test_response_logprob_is_fp32_for_bf16_logits():
    logits, labels = _batch(LENGTHS, PROMPTS)
    got = response_logprob(logits.to(torch.bfloat16), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _loop_logprob(logits.to(torch.bfloat16).double(), labels), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 3])
def test_task_loss_is_mean_ce_over_response_tokens(seed):
    logits, labels = _batch(LENGTHS, PROMPTS, width=14, seed=seed)
    got = task_loss(logits, labels)
    assert got.ndim == 0
    assert got.item() == pytest.approx(_loop_ce(logits, labels), rel=1e-6)
    # token-weighted, not a mean of per-sequence means
    n_tokens = torch.tensor([n - p for n, p in zip(LENGTHS, PROMPTS)], dtype=torch.float64)
    assert got.item() == pytest.approx((-_loop_logprob(logits, labels).sum() / n_tokens.sum()).item(), rel=1e-6)


def test_task_loss_gradient_only_on_response_logits():
    logits, labels = _batch(LENGTHS, PROMPTS, width=14)
    logits = logits.float().requires_grad_(True)
    task_loss(logits, labels).backward()
    used = torch.zeros(logits.shape[:2], dtype=torch.bool)
    used[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert (logits.grad[used].abs().sum(-1) > 0).all()
    assert (logits.grad[~used] == 0).all()


def _pairs(seed=0):
    logits, labels = _batch([8, 7, 9, 6, 8, 5, 9, 7], [3, 2, 4, 1, 3, 2, 4, 1], width=10, seed=seed)
    return logits, labels


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_contrastive_safety_loss_by_hand(temperature):
    logits, labels = _pairs()
    lp = _loop_logprob(logits, labels)
    expected = -F.logsigmoid((lp[:4] - lp[4:]) / temperature).mean()
    got = safety_loss(logits, labels, "contrastive", temperature)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    manual = sum(math.log1p(math.exp(-(float(lp[i]) - float(lp[i + 4])) / temperature)) for i in range(4)) / 4
    assert got.item() == pytest.approx(manual, rel=1e-5)


def test_difference_safety_loss_by_hand():
    logits, labels = _pairs(seed=4)
    expected = _loop_ce(logits[:4], labels[:4]) - _loop_ce(logits[4:], labels[4:])
    assert safety_loss(logits, labels, "difference").item() == pytest.approx(expected, rel=1e-6)


def test_unknown_safety_loss_form():
    logits, labels = _pairs()
    with pytest.raises(ValueError, match="sap.safety_loss"):
        safety_loss(logits, labels, "kl")


def _preferring(prefer_safe: bool, strength=4.0):
    """Two pairs with the same prompt; the logits put mass on the safe or the harmful tokens."""
    safe_tokens, harmful_tokens = [4, 5, 6], [7, 8, 9]
    labels = torch.tensor([
        [IGNORE_INDEX] * 3 + safe_tokens, [IGNORE_INDEX] * 3 + safe_tokens,
        [IGNORE_INDEX] * 3 + harmful_tokens, [IGNORE_INDEX] * 3 + harmful_tokens,
    ])
    preferred = safe_tokens if prefer_safe else harmful_tokens
    logits = torch.zeros(4, 6, VOCAB)
    for b in range(4):
        for t in range(2, 5):  # position t predicts token t + 1
            logits[b, t, preferred[t - 2]] = strength
    return logits, labels


@pytest.mark.parametrize("form", ["contrastive", "difference"])
def test_preferring_safe_responses_lowers_the_safety_loss(form):
    safe_model = safety_loss(*_preferring(True), form)
    harmful_model = safety_loss(*_preferring(False), form)
    neutral = safety_loss(torch.zeros(4, 6, VOCAB), _preferring(True)[1], form)
    assert safe_model < neutral < harmful_model
    if form == "contrastive":
        assert neutral.item() == pytest.approx(math.log(2))
        assert 0 < safe_model.item() < 1e-3
    else:
        assert safe_model.item() < 0 and neutral.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_descent_on_safety_loss_raises_safe_logprob():
    logits, labels = _pairs(seed=7)
    logits = logits.float().requires_grad_(True)
    loss = safety_loss(logits, labels, "contrastive")
    loss.backward()
    stepped = (logits - 0.5 * logits.grad).detach()
    before, after = response_logprob(logits.detach(), labels), response_logprob(stepped, labels)
    assert (after[:4] - after[4:]).mean() > (before[:4] - before[4:]).mean()
    assert safety_loss(stepped, labels, "contrastive") < loss
