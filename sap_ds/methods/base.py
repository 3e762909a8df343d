"""What a training method is to the shared loop (``sap_ds/training/trainer.py``).

The trainer owns the loop, the data, the engine, logging, evaluation, checkpoints and
export; a method owns one optimizer step and the state it keeps between steps. The hooks,
in the order the trainer calls them:

* ``setup(trainer)``: once, after the engine and ``trainer.shards`` exist.
* ``preflight(trainer)``: before step 1 of a fresh run (checks that need the engine).
* ``step(trainer, step, micro_batches)``: forward/backward/``engine.step`` of one global
  step (``micro_batches``: this rank's task micro-batches); returns the micro-batch losses.
* ``trained_micro_batches(trainer, step)``: this rank's micro-batches that step trains on
  (the task batch, unless the method swaps it, as Lisa's alignment steps do); the bench
  counts its tokens from them.
* ``trains_on(step)``: "task", or the name of the data a step trains on instead ("alignment"
  for Lisa's alignment steps); the bench reports task tokens/s from it.
* ``trained_lengths(trainer, step)``: the real lengths of what that step trained on (all
  ranks), for tokens/s and the FLOPs model.
* ``log_stats(trainer)``: extra record entries, on logged steps only (device reads).
* ``state_dict()`` / ``load_state_dict(state, resharded)``: what a checkpoint keeps,
  ``{"meta": JSON-able, "tensors": {name: tensor}}`` (tensors are saved per rank; on
  loading, "meta" is the whole checkpoint metadata, with "step").
* ``export_transform(trainer, model)``: the HF model to write, given the trained one.
"""
from __future__ import annotations

import torch


class Method:
    name = "base"
    needs_safety = False  # whether the run data must include data.safety (the pair table)
    safety_mix = 0.0  # refusal demonstrations from data.safety added to the task data, per task example

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, trainer) -> None:
        pass

    def preflight(self, trainer) -> None:
        pass

    def step(self, trainer, step: int, micro_batches: list[dict]) -> list[float]:
        raise NotImplementedError

    def trains_on(self, step: int) -> str:
        return "task"

    def trained_micro_batches(self, trainer, step: int) -> list[dict]:
        return trainer.task_micro_batches(step)

    def trained_lengths(self, trainer, step: int) -> list[int]:
        return trainer._task_lengths(step)

    def log_stats(self, trainer) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"meta": {}, "tensors": {}}

    def load_state_dict(self, state: dict, resharded: bool) -> None:
        pass

    def export_transform(self, trainer, model: torch.nn.Module) -> torch.nn.Module:
        return model
