"""The two measurements the GPU check needs from the SAP step, in one place.

Both belong with the SAP step (issue 17 items 1-2: ``sap_ds/diagnostics.py``, another
branch). Until that lands they are written here against sap.py's public phases; at the
merge, replace the bodies with calls to the diagnostics module (same inputs, same keys
out) and delete the rest of this file.

* ``perturbation_stats``: the realised bf16 perturbation against the intended one.
* ``inspect_engine_path``: one SAP probe pass on a live engine, checked phase by phase.
"""
from __future__ import annotations

import math

import torch

from sap_ds import sap
from sap_ds.losses import forward_logits, task_loss
from sap_ds.zero3 import all_reduce_sum


@torch.no_grad()
def perturbation_stats(masters: list[torch.Tensor], directions: list[torch.Tensor], rho: float,
                       dtype: torch.dtype = torch.bfloat16) -> dict:
    """W' = W + rho * ||W|| / ||g|| * g as the engine stores it (``dtype``), against the intended
    step: ``realized_ratio`` = ||cast(W') - cast(W)|| / ||intended||, ``cosine`` between the
    two, ``changed_fraction`` of elements whose stored value moved. Norms over all ranks
    (one all-reduce of six sums); each rank reads only its own shards."""
    device = masters[0].device
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for w, g in zip(masters, directions):
        sums += torch.stack([g.double().pow(2).sum(), w.double().pow(2).sum()])
    g2, w2 = all_reduce_sum(sums).tolist()
    scale = rho * math.sqrt(w2) / math.sqrt(g2) if g2 > 0 else 0.0
    parts = torch.zeros(4, dtype=torch.float64, device=device)  # ||r||^2, ||d||^2, <r, d>, changed
    numel = sum(w.numel() for w in masters)
    for w, g in zip(masters, directions):
        intended = (g * scale).double()
        realized = ((w + (g * scale)).to(dtype).double() - w.to(dtype).double())
        parts += torch.stack([realized.pow(2).sum(), intended.pow(2).sum(), (realized * intended).sum(),
                              (realized != 0).sum().double()])
    r2, d2, rd, changed = all_reduce_sum(parts).tolist()
    total = all_reduce_sum(torch.tensor([float(numel)], dtype=torch.float64, device=device)).item()
    return {"rho": rho, "realized_ratio": math.sqrt(r2 / d2) if d2 > 0 else None,
            "cosine": rd / math.sqrt(r2 * d2) if r2 > 0 and d2 > 0 else None,
            "changed_fraction": changed / total if total else None}


def _loss(engine, micro_batches: list[dict]) -> float:
    with torch.no_grad():
        losses = [task_loss(forward_logits(engine, b), b["labels"]) for b in micro_batches]
    return float(torch.stack(losses).mean().item())


def _no_weight_grads(engine, shards) -> tuple[bool, float]:
    """No parameter holds a ``.grad`` and the local gradient shards are all zero."""
    has_grad = any(p.grad is not None for p in engine.module.parameters())
    buffers = shards.new_flat_buffers()
    shards.copy_local_grads(buffers)
    total = float(sum(b.abs().sum().item() for b in buffers))
    return (not has_grad) and total == 0.0, total


def inspect_engine_path(trainer, step: int = 0, rho: float | None = None) -> dict:
    """One probe pass of ``trainer``'s SAP state on step ``step``'s batches, checked phase
    by phase; the engine is left as it was (W restored, gradients dropped, V unchanged).

    Returns ``loss_w``, ``loss_perturbed``, ``loss_restored``, ``restore_bit_exact``,
    ``probe_grad_norm``, ``probe_grad_finite``, ``no_weight_grads`` (after the probe pass),
    ``weight_grad_abs_sum``, ``main_grad_norm`` (grad_V L(W) by autograd, no weight grads)
    and ``noise`` = ||probe grad + main grad|| / ||main grad|| (the two terms of SAP's probe
    update: 0 at rho = 0 up to run-to-run noise)."""
    cfg = trainer.cfg.sap if rho is None else trainer.cfg.sap.model_copy(update={"rho": rho})
    engine, shards, state = trainer.engine, trainer.shards, trainer.sap_state
    batches = trainer.task_micro_batches(step)
    out = {"loss_w": _loss(engine, batches)}
    before = [g.lp.detach().clone() for g in shards.groups]
    direction_step = state.direction_step
    sap.safety_direction(engine, shards, state, trainer.safety_batch(step), cfg, step)
    sap.perturb(shards, state, cfg.kernels)
    out["loss_perturbed"] = _loss(engine, batches)
    rng = sap._rng_state()
    probe_grad = sap.probe_gradient(engine, state, batches)
    out["no_weight_grads"], out["weight_grad_abs_sum"] = _no_weight_grads(engine, shards)
    sap.restore(shards, state, cfg.kernels)
    out["restore_bit_exact"] = all(torch.equal(b.view(torch.int16) if b.dtype == torch.bfloat16 else b,
                                               g.lp.view(torch.int16) if g.lp.dtype == torch.bfloat16 else g.lp)
                                   for b, g in zip(before, shards.groups))
    out["loss_restored"] = _loss(engine, batches)
    sap._set_rng_state(rng)
    main = torch.zeros_like(state.probe.vectors)
    for batch in batches:  # grad_V L(W): the main pass's probe term, by autograd like the probe pass
        loss = task_loss(forward_logits(engine, batch), batch["labels"]) / len(batches)
        main += torch.autograd.grad(loss, [state.probe.vectors])[0]
    shards.drop_grads()
    state.probe.vectors.grad = None
    state.direction_step = direction_step  # the next SAP step computes its own direction
    pg, mg = probe_grad.double(), main.double()
    out.update(probe_grad_norm=pg.norm().item(), probe_grad_finite=bool(torch.isfinite(pg).all()),
               main_grad_norm=mg.norm().item(),
               noise=((pg + mg).norm() / mg.norm()).item() if mg.norm() > 0 else None,
               safety_grad_norm=state.stats.get("safety_grad_norm"), weight_norm=state.stats.get("weight_norm"))
    return out
