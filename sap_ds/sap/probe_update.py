"""How the probe is updated from its gradient (docs/algorithm.md, "Two forms of the probe step").

``gV`` (the caller's, already summed over the probe passes and the main pass where they
apply) is averaged over ranks, then one of:

* ``probe_update: adam`` (the authors' code): one step of the probe's own AdamW, whose
  moments persist across steps and go into checkpoints (``sap.opt.*``);
* ``probe_update: gradient`` (the paper's Algorithm 1, lines 3-5, as SafeTune writes it):
  ``V <- V - probe_lr * gV``. With ``probe_reset`` V starts each probe step at 0, so
  ``V = probe_lr * grad_V [L(W', V) - L(W, V)]``: one ascent step on the safe-useful loss.
  No optimizer state.

``probe_timing`` decides when this runs (``sap_ds.sap.step.sap_step``): after the main pass,
for the next step (``next_step``), or before it, for this one (``same_step``). Where the
reset happens follows from it: ``next_step`` zeroes V here, after its gradient was taken
at the previous V (the authors' order); ``same_step`` zeroes it before the probe passes,
so the gradient is taken at V = 0 (Algorithm 1, line 3).
"""
from __future__ import annotations

import torch

from sap_ds.config.methods import SapConfig
from sap_ds.parallel.collectives import all_reduce_mean
from sap_ds.sap.probe import Probe


def make_optimizer(probe: Probe, cfg: SapConfig) -> torch.optim.Optimizer | None:
    """The probe's AdamW (``adam``), or None: the plain gradient step keeps no state."""
    if cfg.probe_update != "adam":
        return None
    return torch.optim.AdamW([probe.vectors], lr=cfg.probe_lr, eps=cfg.probe_adam_eps, weight_decay=0.0)


def update_probe(state, probe_grad: torch.Tensor, cfg: SapConfig, lr_factor: float = 1.0) -> None:
    """Average gV over ranks (plus whatever the main pass left in ``vectors.grad``), reset V
    (``next_step`` with ``probe_reset``), one update at ``probe_lr`` (times ``lr_factor``
    with ``probe_lr_schedule: follow``), then ``probe_scale``. A non-finite gV (the same
    verdict on every rank: it is all-reduced) leaves V as it is."""
    vectors = state.probe.vectors
    grad = probe_grad + (vectors.grad if vectors.grad is not None else 0)
    grad = all_reduce_mean(grad.detach().clone())
    vectors.grad = None
    # The one host read of the step: whether to update the probe at all.
    state.stats["probe_update_skipped"] = not bool(torch.isfinite(grad).all())
    if state.stats["probe_update_skipped"]:
        return
    if cfg.probe_reset and cfg.probe_timing == "next_step":
        state.probe.reset()
    lr = cfg.probe_lr * (lr_factor if cfg.probe_lr_schedule == "follow" else 1.0)
    if state.probe_optimizer is not None:
        for group in state.probe_optimizer.param_groups:
            group["lr"] = lr
        vectors.grad = grad
        state.probe_optimizer.step()
        state.probe_optimizer.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            vectors.add_(grad, alpha=-lr)
    rescale_probe(state, cfg)


def rescale_probe(state, cfg: SapConfig) -> None:
    """``probe_scale``: each layer's vector to that fraction of the mean hidden-state norm
    the last pass with ``probe.measure`` on saw there (the main pass; under ``same_step``
    the probe pass at W, which runs before this step's update), averaged over ranks so V
    stays identical."""
    norms = all_reduce_mean(state.probe.hidden_norms.clone())
    state.stats["hidden_norm"] = norms.mean()
    if cfg.probe_scale is not None:
        state.probe.rescale(cfg.probe_scale * norms)
