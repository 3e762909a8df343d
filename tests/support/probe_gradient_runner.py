"""The probe gradient of a real SAP step against an fp32 replica (tests/test_probe_precision.py).

    python tests/support/probe_gradient_runner.py --out FILE --config C [key=value ...]

One process (world 1). Builds the Trainer for the config and runs step 0's first phases
through ``sap_ds.sap.step``: the safety direction, ``perturb``, ``probe_gradient`` at W',
``restore``, ``probe_gradient`` at W (the W side the main pass would add). The weights at W'
and at W are read from the engine (gathered) and loaded into a plain fp32 PyTorch copy of the
model, with its own probe hooks and loss (tests/support/reference.py's): the replica's gV is
``-grad_V L(W') + grad_V L(W)`` on the same micro-batches, every activation in fp32. Writes
FILE (JSON): the cosine of the two gVs, their norms, the weights' fidelity and the engine's
``probe_signal_ratio``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout


def gathered_weights(engine) -> dict:
    """Every parameter of the engine's model, gathered, as fp32 copies."""
    import deepspeed

    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().float().clone() for n, p in named}


def plain_model(cfg):
    """The config's model (and LoRA adapters) in fp32, outside any engine: built before the
    Trainer, whose ZeRO-3 set-up would otherwise make transformers partition it."""
    from sap_ds.model.loading import apply_lora, load_model, resolve_model_path

    model = load_model(cfg.model.model_copy(update={"dtype": "fp32"}), resolve_model_path(cfg.model))
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model.float().train()


def replica_gv(model, weights_perturbed: dict, weights: dict, micro_batches: list[dict], layers: list[int], v):
    """gV from the plain fp32 ``model`` at the given weights: the mean over the micro-batches
    of ``-grad_V L(W') + grad_V L(W)``, V added to each probe layer's output in fp32."""
    import torch

    from tests.support.reference import _ce

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vectors = v.detach().clone().float().requires_grad_(True)

    def add(i):
        def hook(module, inputs, output):
            if isinstance(output, tuple):
                return (output[0] + vectors[i], *output[1:])
            return output + vectors[i]
        return hook

    for i, layer in enumerate(layers):
        base.model.layers[layer].register_forward_hook(add(i))
    params = dict(model.named_parameters())
    assert set(params) == set(weights), sorted(set(params) ^ set(weights))[:5]

    def grad_at(values: dict, sign: float):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(values[name])
        total = torch.zeros_like(vectors)
        for batch in micro_batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            (grad,) = torch.autograd.grad(sign * _ce(logits, batch["labels"]) / len(micro_batches), [vectors])
            total += grad
        return total

    return grad_at(weights_perturbed, -1.0) + grad_at(weights, 1.0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args()
    from sap_ds.config.run import load_config
    from sap_ds.parallel.distributed import init_distributed, shutdown_distributed
    from sap_ds.sap import resolution
    from sap_ds.sap import step as sap_step
    from sap_ds.training.trainer import Trainer

    cfg = load_config(args.config, overrides)
    rank, _, world = init_distributed(cfg.distributed)
    assert world == 1, "one process: the gathered weights are the whole model"
    replica_model = plain_model(cfg)
    trainer = Trainer(cfg, rank, world)
    state, sap, engine, shards = trainer.method.state, cfg.sap, trainer.engine, trainer.shards
    micro = trainer.task_micro_batches(0)
    sap_step.safety_direction(engine, shards, state, trainer.method.safety_batch(trainer, 0), sap, 0)
    fidelity = resolution.shard_fidelity(shards, state, 1.0, sap.kernels)
    sap_step.perturb(shards, state, sap.kernels)
    at_perturbed_weights = gathered_weights(engine)
    at_perturbed = sap_step.probe_gradient(engine, state, micro)
    sap_step.restore(shards, state, sap.kernels)
    at_weights_weights = gathered_weights(engine)
    at_weights = sap_step.probe_gradient(engine, state, micro, negate=False)
    engine_gv = (at_perturbed + at_weights).double()
    replica = replica_gv(replica_model, at_perturbed_weights, at_weights_weights, micro, state.probe.layers,
                         state.probe.vectors).double()
    working = next(engine.module.parameters()).dtype
    result = {
        "cosine": (engine_gv.flatten() @ replica.flatten() / (engine_gv.norm() * replica.norm())).item(),
        "engine_gv_norm": engine_gv.norm().item(), "replica_gv_norm": replica.norm().item(),
        "term_norm": at_weights.double().norm().item(),
        "probe_signal_ratio": resolution.probe_signal_ratio(at_perturbed, at_weights, working),
        "weights_fidelity_ok": fidelity.ok, "weights_fidelity": fidelity.describe(),
        "tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
        "working_dtype": str(working),
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle)
    del trainer
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
