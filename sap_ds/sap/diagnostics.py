"""Phase-by-phase checks of one SAP step on a live engine (the ZeRO-3 pitfalls).

``inspect_sap_step(trainer)`` runs the first SAP step's phases one by one and reports
what a silent error would break: the loss at W' differs from the loss at W (no stale
gathered weights), restore is bit-exact (shards and loss), the probe gradient is finite,
the probe pass gives no parameter a gradient and leaves the engine's gradient shards
untouched, the per-group gradient copy equals DeepSpeed's per-parameter accessor, and
the perturbed shards equal what the PyTorch twin writes. The test runner
(``tests/support/zero3_runner.py --inspect``) and the GPU check (``scripts/gpu_check.sh``) call
it; every rank must call it (the forwards are collective). It leaves the trainer's
gradients dropped; run it on a trainer that is not trained further.
"""
from __future__ import annotations

import math

import sap_ds_kernels
import torch

from sap_ds.model.losses import forward_logits, task_loss
from sap_ds.sap import step as sap_step


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern: bitwise comparison that also treats identical NaNs as equal."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def grad_shards(shards, per_param: bool = False) -> list[torch.Tensor]:
    """Copies of this rank's reduced gradient shards, per group (flat path, or DeepSpeed's
    per-parameter accessor with ``per_param``)."""
    out = shards.new_flat_buffers()
    if per_param:
        shards._copy_local_grads_per_param(out)
        for index, buf in zip(shards._padding_index, out):
            if index.numel():
                buf.index_fill_(0, index, 0.0)
    else:
        shards.copy_local_grads(out)
    return out


def inspect_sap_step(trainer, step: int = 0) -> dict:
    """Run the phases of SAP step ``step`` one at a time and return the checks (plain
    values, JSON-ready; ``all_ok`` summarises the boolean ones)."""
    st, shards, cfg = trainer.method.state, trainer.shards, trainer.cfg.sap
    engine = trainer.engine
    batches = trainer.task_micro_batches(step)

    @torch.no_grad()
    def loss_now() -> float:
        return task_loss(forward_logits(engine, batches[0]), batches[0]["labels"]).item()

    original_lp = [g.lp.clone() for g in shards.groups]
    loss_w = loss_now()
    sap_step.safety_direction(engine, shards, st, trainer.method.safety_batch(trainer, step), cfg, step)
    # The safety gradients are dropped by now; run one more backward to compare the two copies.
    engine.set_gradient_accumulation_boundary(True)
    engine.backward(task_loss(forward_logits(engine, batches[0]), batches[0]["labels"]), scale_wrt_gas=False)
    flat, per_param = grad_shards(shards), grad_shards(shards, per_param=True)
    grads_flat_equal_per_param = all(torch.equal(a, b) for a, b in zip(flat, per_param))
    grads_copied_per_group = shards.grads_copied_per_group
    shards.drop_grads()
    engine.set_gradient_accumulation_boundary(None)
    grads_before_probe = grad_shards(shards)

    sap_step.perturb(shards, st, cfg.kernels)
    twin = []
    for i, g in enumerate(shards.groups):  # what the PyTorch twin writes for the same inputs
        out = torch.empty_like(g.lp)
        source = st.backup[i] if g.master_aliases_lp else g.master
        sap_ds_kernels.perturb_from_master(source, st.direction[i], st.scale, out, backend="torch")
        twin.append(out)
    perturb_equals_twin = all(torch.equal(bits(t), bits(g.lp)) for t, g in zip(twin, shards.groups))
    loss_perturbed = loss_now()
    lp_perturbed_differs = any(not torch.equal(a, g.lp) for a, g in zip(original_lp, shards.groups))
    probe_grad = sap_step.probe_gradient(engine, st, batches)
    grads_after_probe = grad_shards(shards)
    param_grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    sap_step.restore(shards, st, cfg.kernels)
    loss_restored = loss_now()
    stats = sap_step.stats_as_floats(st)
    result = {
        "loss_w": loss_w,
        "loss_perturbed": loss_perturbed,
        "loss_restored": loss_restored,
        "lp_perturbed_differs": lp_perturbed_differs,
        "perturb_equals_twin": perturb_equals_twin,
        "restore_bit_exact": all(torch.equal(bits(a), bits(g.lp)) for a, g in zip(original_lp, shards.groups)),
        "grads_untouched_by_probe": all(torch.equal(a, b) for a, b in zip(grads_before_probe, grads_after_probe)),
        "grads_zero_after_drop": all(float(b.abs().max()) == 0.0 for b in grads_after_probe if b.numel()),
        "grads_flat_equal_per_param": grads_flat_equal_per_param,
        "grads_copied_per_group": grads_copied_per_group,
        "params_with_grad_attr": len(param_grads),
        "probe_grad_norm": float(probe_grad.norm()),
        "probe_grad_finite": bool(torch.isfinite(probe_grad).all()),
        "scale": float(st.scale),
        "stats": stats,
    }
    result["all_ok"] = bool(
        result["lp_perturbed_differs"] and result["perturb_equals_twin"] and result["restore_bit_exact"]
        and result["loss_perturbed"] != result["loss_w"] and result["loss_restored"] == result["loss_w"]
        and result["grads_untouched_by_probe"] and result["grads_zero_after_drop"]
        and result["grads_flat_equal_per_param"] and result["params_with_grad_attr"] == 0
        and result["probe_grad_finite"] and result["probe_grad_norm"] > 0 and math.isfinite(result["scale"])
    )
    return result
