"""Run a few trainer steps under the real launcher and dump what the tests compare.

    deepspeed --num_gpus 2 tests/zero3_runner.py --config C --steps N --out DIR [--inspect] [key=value ...]

Writes to DIR: ``params.safetensors`` (every trainable parameter, gathered, rank 0),
``probe_rank{r}.safetensors`` (each rank's probe), ``result.json`` (all ranks' losses and,
with ``--inspect``, the perturb/restore checks of the first SAP step).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def inspect_first_step(trainer) -> dict:
    """Phase by phase through the first SAP step, checking the ZeRO-3 pitfalls:
    W' changes the loss, restore is bit-exact (shards and loss), the probe pass leaves
    the engine's gradients untouched."""
    import torch

    import kernels
    from sap_ds import sap
    from sap_ds.losses import forward_logits, task_loss

    st, shards, cfg = trainer.sap_state, trainer.shards, trainer.cfg.sap
    batches = trainer.task_micro_batches(0)

    @torch.no_grad()
    def loss_now():
        return task_loss(forward_logits(trainer.engine, batches[0]), batches[0]["labels"]).item()

    original_lp = [g.lp.clone() for g in shards.groups]
    loss_w = loss_now()
    sap.safety_direction(trainer.engine, shards, st, trainer.safety_batch(0), cfg)
    grads_after_safety = [b.clone() for b in _grad_shards(shards)]
    sap.perturb(shards, st, cfg.kernels)
    twin = []
    for i, g in enumerate(shards.groups):  # what the PyTorch twin writes for the same inputs
        out = torch.empty_like(g.lp)
        source = st.backup[i] if g.master_aliases_lp else g.master
        kernels.perturb_from_master(source, st.direction[i], st.scale, out, backend="torch")
        twin.append(out)
    perturb_equals_twin = all(torch.equal(_bits(t), _bits(g.lp)) for t, g in zip(twin, shards.groups))
    loss_perturbed = loss_now()
    lp_perturbed_differs = any(not torch.equal(a, g.lp) for a, g in zip(original_lp, shards.groups))
    probe_grad = sap.probe_gradient(trainer.engine, st, batches)
    grads_after_probe = _grad_shards(shards)
    param_grads = [p.grad for p in trainer.engine.module.parameters() if p.grad is not None]
    sap.restore(shards, st, cfg.kernels)
    loss_restored = loss_now()
    return {
        "loss_w": loss_w,
        "loss_perturbed": loss_perturbed,
        "loss_restored": loss_restored,
        "lp_perturbed_differs": lp_perturbed_differs,
        "perturb_equals_twin": perturb_equals_twin,
        "restore_bit_exact": all(torch.equal(_bits(a), _bits(g.lp)) for a, g in zip(original_lp, shards.groups)),
        "grads_untouched_by_probe": all(torch.equal(a, b) for a, b in zip(grads_after_safety, grads_after_probe)),
        "grads_zero_after_drop": all(float(b.abs().max()) == 0.0 for b in grads_after_probe if b.numel()),
        "params_with_grad_attr": len(param_grads),
        "probe_grad_norm": float(probe_grad.norm()),
        "scale": float(st.scale),
        "stats": st.stats,
    }


def export_with_logits(trainer, out: str) -> None:
    """Logits of the trained engine (probe off: the export has no probe) on one batch,
    then the HF export; the test reloads the export and compares."""
    import torch
    from safetensors.torch import save_file

    from sap_ds.export import export_model
    from sap_ds.losses import forward_logits

    if trainer.sap_state is not None:
        trainer.sap_state.probe.enabled = False
    batch = trainer.task_micro_batches(0)[0]
    with torch.no_grad():
        logits = forward_logits(trainer.engine, batch)  # collective: every rank runs it
    folder = export_model(trainer)
    if trainer.rank == 0:
        save_file({"logits": logits.float().contiguous(), "input_ids": batch["input_ids"],
                   "attention_mask": batch["attention_mask"]}, os.path.join(out, "engine_logits.safetensors"))
        with open(os.path.join(out, "export_dir.txt"), "w") as handle:
            handle.write(str(folder))


def model_state_bytes(trainer):
    """Bytes this rank holds for parameters (working shards of every parameter, frozen
    included), gradients (the engine's gradient partitions) and optimizer state (fp32
    master + Adam moments), read from the live engine."""
    import torch

    opt = trainer.engine.optimizer
    params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in trainer.engine.module.parameters())
    grads = opt.grad_partitions_flat_buffer.numel() * opt.grad_partitions_flat_buffer.element_size()
    masters = opt.fp32_partitioned_groups_flat
    optimizer = sum(m.numel() * m.element_size() for m in masters)
    for state in opt.optimizer.state.values():
        optimizer += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return [params, grads, optimizer]


def _bits(t):
    """The raw bit pattern: bitwise comparison that also treats identical NaNs as equal."""
    import torch

    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _grad_shards(shards):
    out = shards.new_flat_buffers()
    shards.copy_local_grads(out)
    return [t.clone() for t in out]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--inspect", action="store_true")
    parser.add_argument("--memory", action="store_true", help="report this rank's model-state bytes and exit")
    parser.add_argument("--export", action="store_true", help="after training: logits of the engine, then export")
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from sap_ds.config import load_config
    from sap_ds.distributed import init_distributed

    cfg = load_config(args.config, args.overrides + [f"train.max_steps={args.steps}"])
    rank, _, world = init_distributed()
    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from sap_ds.trainer import Trainer

    trainer = Trainer(cfg, rank, world)
    result = {}
    if args.memory:
        trainer.train_step(0)  # Adam states exist after the first step
        measured = torch.tensor(model_state_bytes(trainer), dtype=torch.float64)
        every = [torch.zeros_like(measured) for _ in range(world)]
        dist.all_gather(every, measured)
        result["memory"] = [dict(zip(("params", "grads", "optimizer"), t.tolist())) for t in every]
    elif args.inspect:
        result["inspect"] = inspect_first_step(trainer)
        trainer.shards.drop_grads()
    else:
        losses, result["sap_stats"] = [], []
        for step in range(args.steps):
            losses.append(trainer.train_step(step))
            if trainer.sap_state is not None:
                result["sap_stats"].append(dict(trainer.sap_state.stats))
        gathered = [None] * world
        dist.all_gather_object(gathered, losses)
        result["losses"] = [[x for r in range(world) for x in gathered[r][s]] for s in range(args.steps)]
        named = [(n, p) for n, p in trainer.engine.module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            full = {n: p.detach().float().clone() for n, p in named}
        if rank == 0:
            save_file(full, os.path.join(args.out, "params.safetensors"))
        if args.export:
            export_with_logits(trainer, args.out)
    if trainer.sap_state is not None:
        save_file({"probe": trainer.sap_state.probe.vectors.detach().clone()},
                  os.path.join(args.out, f"probe_rank{rank}.safetensors"))
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
