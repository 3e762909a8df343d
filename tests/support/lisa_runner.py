"""Lisa on 2 ZeRO-3 ranks, full fine-tuning and LoRA in one launch (tests/test_methods.py).

    deepspeed --num_gpus 2 tests/support/lisa_runner.py --config C --steps N --out DIR --variants JSON [key=value ...]

Each variant (``{name, overrides[, resume_at]}``) builds a Trainer, runs ``steps`` steps
and writes ``DIR/name/params.safetensors`` (rank 0, gathered) and ``result.json`` (the
losses of every rank). With ``resume_at: k`` it saves a checkpoint after step k, drops the
Trainer and continues in a new one from that checkpoint (``maybe_resume``), as a requeued
job would.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout


def _steps(trainer, until: int, losses: list) -> None:
    while trainer.step < until:
        losses.append(trainer.train_step(trainer.step))
        trainer.step += 1


def run_variant(cfg, rank: int, world: int, steps: int, out: str, resume_at: int | None) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from sap_ds.parallel.zero3 import release_deepspeed_globals
    from sap_ds.training.trainer import Trainer

    os.makedirs(out, exist_ok=True)
    trainer, losses = Trainer(cfg, rank, world), []
    resumed_at = None
    if resume_at is not None:
        _steps(trainer, resume_at, losses)
        trainer.save_checkpoint()
        del trainer
        release_deepspeed_globals()  # the new engine's set-up collects (deepspeed.runtime.zero.utils.defragment)
        trainer = Trainer(cfg, rank, world)
        trainer.maybe_resume()
        resumed_at = trainer.step
    _steps(trainer, steps, losses)
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    named = [(n, p) for n, p in trainer.engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        full = {n: p.detach().float().clone() for n, p in named}
    if rank == 0:
        save_file(full, os.path.join(out, "params.safetensors"))
        result = {"losses": [[x for r in range(world) for x in gathered[r][s]] for s in range(steps)],
                  "resumed_at": resumed_at, "grads_per_group": trainer.shards.grads_copied_per_group}
        with open(os.path.join(out, "result.json"), "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    del trainer
    release_deepspeed_globals()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", required=True, help="JSON list of {name, overrides[, resume_at]}")
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from sap_ds.config.run import load_config
    from sap_ds.parallel.distributed import init_distributed, shutdown_distributed

    rank, _, world = init_distributed()
    for variant in json.loads(args.variants):
        out = os.path.join(args.out, variant["name"])
        cfg = load_config(args.config, args.overrides + variant["overrides"] +
                          [f"train.max_steps={args.steps}", f"output_dir={out}/run"])
        run_variant(cfg, rank, world, args.steps, out, variant.get("resume_at"))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
