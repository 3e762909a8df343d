"""The two measurements the GPU check takes of the SAP step, on sap.py's public phases.

The bf16 table uses the perturb kernel's own statistics (the code that measures every
training probe step, ``sap_ds/sap/resolution.py``); the engine-path inspection runs the phases
one at a time and also measures the rho = 0 noise floor (the probe and main terms, which
``sap_ds.sap.diagnostics.inspect_sap_step`` does not). Step 4 runs both.

* ``perturbation_stats``: the realised bf16 perturbation against the intended one.
* ``inspect_engine_path``: one SAP probe pass on a live engine, checked phase by phase.
"""
from __future__ import annotations

import math

import sap_ds_kernels
import torch

from sap_ds.model.losses import forward_logits, task_loss
from sap_ds.parallel.collectives import all_reduce_sum
from sap_ds.sap import step as sap_step


@torch.no_grad()
def perturbation_stats(masters: list[torch.Tensor], directions: list[torch.Tensor], rho: float,
                       dtype: torch.dtype = torch.bfloat16) -> dict:
    """W' = W + rho * ||W|| / ||g|| * g as the engine stores it (``dtype``), against the intended
    step: ``realized_ratio`` = ||cast(W') - cast(W)|| / ||intended||, ``cosine`` between the
    two, ``changed_fraction`` of elements whose stored value moved. The sums come from the
    perturb kernel's own statistics (``sap_ds_kernels.perturbation_stats``: Triton on CUDA, the twin
    on CPU), the code that measures every training probe step; norms over all ranks."""
    from sap_ds.sap.resolution import fidelity_from_sums

    device = masters[0].device
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for w, g in zip(masters, directions):
        sums += torch.stack([g.double().pow(2).sum(), w.double().pow(2).sum()])
    g2, w2 = all_reduce_sum(sums).tolist()
    scale = torch.tensor(rho * math.sqrt(w2) / math.sqrt(g2) if g2 > 0 else 0.0, dtype=torch.float32, device=device)
    parts = sum(sap_ds_kernels.perturbation_stats(w, g, scale, dtype).to(device) for w, g in zip(masters, directions))
    numel = all_reduce_sum(torch.tensor([float(sum(w.numel() for w in masters))], dtype=torch.float64,
                                        device=device)).item()
    fid = fidelity_from_sums(all_reduce_sum(parts), int(numel))
    finite = lambda x: None if math.isnan(x) else x  # noqa: E731
    return {"rho": rho, "realized_ratio": finite(fid.ratio), "cosine": finite(fid.cosine),
            "changed_fraction": fid.changed_fraction}


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
    engine, shards, state = trainer.engine, trainer.shards, trainer.method.state
    batches = trainer.task_micro_batches(step)
    out = {"loss_w": _loss(engine, batches)}
    before = [g.lp.detach().clone() for g in shards.groups]
    direction_step = state.direction_step
    sap_step.safety_direction(engine, shards, state, trainer.method.safety_batch(trainer, step), cfg, step)
    sap_step.perturb(shards, state, cfg.kernels)
    out["loss_perturbed"] = _loss(engine, batches)
    rng = sap_step.rng_state()
    probe_grad = sap_step.probe_gradient(engine, state, batches)
    out["no_weight_grads"], out["weight_grad_abs_sum"] = _no_weight_grads(engine, shards)
    sap_step.restore(shards, state, cfg.kernels)
    out["restore_bit_exact"] = all(torch.equal(b.view(torch.int16) if b.dtype == torch.bfloat16 else b,
                                               g.lp.view(torch.int16) if g.lp.dtype == torch.bfloat16 else g.lp)
                                   for b, g in zip(before, shards.groups))
    out["loss_restored"] = _loss(engine, batches)
    sap_step.restore_rng_state(rng)
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
