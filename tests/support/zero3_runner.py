"""Run a few trainer steps under the real launcher and dump what the tests compare.

    deepspeed --num_gpus 2 tests/support/zero3_runner.py --config C --steps N --out DIR [--inspect] [key=value ...]

Writes to DIR: ``params.safetensors`` (every trainable parameter, gathered, rank 0),
``probe_rank{r}.safetensors`` (each rank's probe), ``result.json`` (all ranks' losses and,
with ``--inspect``, the perturb/restore checks of the first SAP step).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout


def inspect_first_step(trainer) -> dict:
    """The checks of ``sap_ds.sap.diagnostics.inspect_sap_step`` on step 0."""
    from sap_ds.sap.diagnostics import inspect_sap_step

    return inspect_sap_step(trainer, 0)


def export_with_logits(trainer, out: str) -> None:
    """Logits of the trained engine (probe off: the export has no probe) on one batch,
    then the HF export; the test reloads the export and compares."""
    import torch
    from safetensors.torch import save_file

    from sap_ds.model.losses import forward_logits
    from sap_ds.training.export import export_model

    sap_state = getattr(trainer.method, "state", None)  # SapMethod's
    if sap_state is not None:
        sap_state.probe.enabled = False
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


def run_one(cfg, rank: int, world: int, steps: int, out: str, inspect: bool = False, memory: bool = False,
            export: bool = False, check_collectives: bool = False, resume_at: int | None = None,
            method_stats: bool = False) -> None:
    """Build a Trainer for ``cfg``, do what the flags say and write the outputs to ``out``.
    ``resume_at=k``: save a checkpoint after step k, drop the Trainer and continue in a new one
    from that checkpoint (``maybe_resume``), as a requeued job would. ``method_stats``: the
    method's ``log_stats`` after every step, in ``result["method_stats"]``."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from sap_ds.training.trainer import Trainer

    os.makedirs(out, exist_ok=True)
    checker = None
    if check_collectives:  # every collective of the whole run: engine set-up, SAP steps, checks
        from tests.support.collective_checker import CollectiveChecker

        checker = CollectiveChecker().install()
    trainer = Trainer(cfg, rank, world)
    result = {}
    if check_collectives:
        result["inspect"] = inspect_first_step(trainer)
        trainer.shards.drop_grads()
        for step in range(steps):
            trainer.train_step(step)
        trainer.check_rank_consistency()
        result["eval_loss"] = trainer.evaluate()
        result["optimizer"] = type(trainer.engine.basic_optimizer).__name__
        checker.uninstall()
        every = [None] * world
        dist.all_gather_object(every, {"violations": checker.violations, "sap_ds_calls": checker.sap_ds_calls,
                                       "other_calls": checker.other_calls})
        result["collectives"] = every
    elif memory:
        trainer.train_step(0)  # Adam states exist after the first step
        measured = torch.tensor(model_state_bytes(trainer), dtype=torch.float64)
        every = [torch.zeros_like(measured) for _ in range(world)]
        dist.all_gather(every, measured)
        result["memory"] = [dict(zip(("params", "grads", "optimizer"), t.tolist())) for t in every]
    elif inspect:
        result["inspect"] = inspect_first_step(trainer)
        trainer.shards.drop_grads()
    else:
        losses, result["sap_stats"], tokens = [], [], []
        result["method_stats"] = []
        for step in range(steps):
            if resume_at is not None and step == resume_at:
                trainer.step = step
                trainer.save_checkpoint()
                del trainer
                from sap_ds.parallel.zero3 import release_deepspeed_globals

                release_deepspeed_globals()
                trainer = Trainer(cfg, rank, world)
                trainer.maybe_resume()
                result["resumed_at"] = trainer.step
            # response tokens per micro-batch (the GAS tests want micro-batches of unequal sizes)
            tokens.append([int((b["labels"][:, 1:] != -100).sum()) for b in trainer.task_micro_batches(step)])
            losses.append(trainer.train_step(step))
            if method_stats:
                trainer.step = step + 1
                result["method_stats"].append(trainer.method.log_stats(trainer))
            if getattr(trainer.method, "state", None) is not None:
                result["sap_stats"].append(_stats(trainer.method.state))
        gathered = [None] * world
        dist.all_gather_object(gathered, [losses, tokens])
        result["losses"] = [[x for r in range(world) for x in gathered[r][0][s]] for s in range(steps)]
        result["micro_batch_tokens"] = [[gathered[r][1][s] for r in range(world)] for s in range(steps)]
        result["grads_per_group"] = trainer.shards.grads_copied_per_group
        named = [(n, p) for n, p in trainer.engine.module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            full = {n: p.detach().float().clone() for n, p in named}
        if rank == 0:
            save_file(full, os.path.join(out, "params.safetensors"))
        if export:
            export_with_logits(trainer, out)
    if getattr(trainer.method, "state", None) is not None:
        save_file({"probe": trainer.method.state.probe.vectors.detach().clone()},
                  os.path.join(out, f"probe_rank{rank}.safetensors"))
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    del trainer


def _stats(state) -> dict:
    """The SAP step's statistics as plain floats (newer code keeps them as device tensors)."""
    from sap_ds.sap import step as sap_step

    if hasattr(sap_step, "stats_as_floats"):
        return sap_step.stats_as_floats(state)
    return {k: (float(v) if not isinstance(v, bool) else v) for k, v in state.stats.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--inspect", action="store_true")
    parser.add_argument("--memory", action="store_true", help="report this rank's model-state bytes and exit")
    parser.add_argument("--export", action="store_true", help="after training: logits of the engine, then export")
    parser.add_argument("--check-collectives", action="store_true",
                        help="inspect step 0, train, check ranks and evaluate under tests/support/collective_checker.py")
    parser.add_argument("--variants", help="JSON list of {name, overrides[, steps, inspect, memory, export, check_collectives, "
                                           "resume_at, method_stats]}: "
                                           "one Trainer after another in this process, each writing to OUT/name (saves "
                                           "a launch per variant)")
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from sap_ds.config.run import load_config
    from sap_ds.parallel.distributed import init_distributed, shutdown_distributed

    rank, _, world = init_distributed()
    if args.variants is None:
        cfg = load_config(args.config, args.overrides + [f"train.max_steps={args.steps}"])
        run_one(cfg, rank, world, args.steps, args.out, args.inspect, args.memory, args.export, args.check_collectives)
        shutdown_distributed()
        return 0
    from sap_ds.parallel.zero3 import release_deepspeed_globals

    for variant in json.loads(args.variants):  # each: name, overrides, optional steps and flags
        steps = variant.get("steps", args.steps)
        overrides = [*args.overrides, *variant["overrides"], f"train.max_steps={steps}",
                     f"output_dir={os.path.join(args.out, variant['name'], 'run')}"]
        run_one(load_config(args.config, overrides), rank, world, steps, os.path.join(args.out, variant["name"]),
                inspect=variant.get("inspect", False), memory=variant.get("memory", False), export=variant.get("export", False),
                check_collectives=variant.get("check_collectives", False), resume_at=variant.get("resume_at"),
                method_stats=variant.get("method_stats", False))
        release_deepspeed_globals()  # no gc.collect here: the next engine's set-up collects (zero.utils.defragment)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
