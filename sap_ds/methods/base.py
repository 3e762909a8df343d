"""What a training method is to the shared loop (``sap_ds/training/trainer.py``) and to the
tools around it (bench, train.py's checks before the model loads, export).

The trainer owns the loop, the data, the engine, logging, evaluation, checkpoints and
export; a method owns one optimizer step, the state it keeps between steps, and everything
the others would otherwise have to know about it. What can be answered from the config
alone, before torch is imported, its config section answers
(``sap_ds.config.methods.MethodSection``); the rest is here. The hooks, in the order they
are called:

* ``check_model_config(model_dir)``: before the model loads (``sap_ds/train.py``).
* ``setup(trainer)``: once, after the engine and ``trainer.shards`` exist.
* ``preflight(trainer)``: before step 1 of a fresh run (checks that need the engine).
* ``step(trainer, step, micro_batches)``: forward/backward/``engine.step`` of one global
  step (``micro_batches``: this rank's task micro-batches), its phases timed with
  ``trainer.timer`` under the names of ``phases``; returns the micro-batch losses.
* ``trained_micro_batches(trainer, step)``: this rank's micro-batches that step trains on
  (the task batch, unless the method swaps it, as Lisa's alignment steps do); the bench
  counts its tokens from them.
* ``trains_on(step)``: "task", or the name of the data a step trains on instead ("alignment"
  for Lisa's alignment steps); the bench reports task tokens/s from it.
* ``trained_lengths(trainer, step)``: the real lengths of what that step trained on (all
  ranks), for tokens/s and the FLOPs model.
* ``extra_passes(trainer, step)``: what that step computed beside its task batch's forward
  and backward, for the FLOPs model (per-step TFLOP/s and MFU, the bench).
* ``log_stats(trainer)``: extra record entries, on logged steps only (device reads).
* ``replicated_values()``: state every rank must hold alike (the rank-consistency check).
* ``state_dict()`` / ``load_state_dict(state, resharded)``: what a checkpoint keeps,
  ``{"meta": JSON-able, "tensors": {name: tensor}}`` (tensors are saved per rank; on
  loading, "meta" is the whole checkpoint metadata, with "step").
* ``export_transform(trainer, model)``: the HF model to write, given the trained one;
  ``save_beside_export(folder)``: the method's own files next to it.
* ``close()``: when the trainer is torn down.

And for ``sap-ds bench``: ``min_warmup_steps``, ``nominal_passes`` and ``bench_settings``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


@dataclass(frozen=True)
class ExtraPasses:
    """What one optimizer step computes beside the forward and backward of its task batch,
    in the FLOPs model's terms (``sap_ds.cost.flops.FlopsModel.step``'s arguments;
    docs/design.md, "Cost"). SFT's step computes nothing more (the defaults). Defined here,
    below the cost wing, because the methods fill it in."""

    safety: float = 0.0  # a second batch's forward and training backward (SAP's safety pass): 1 where it ran
    safety_lengths: tuple[int, ...] = ()  # that batch's real sequence lengths, all ranks (the step's draw)
    probe: float = 0.0  # forward + activation-only backward over the task batch (SAP's probe pass): 1 where it ran
    probe_passes: float = 1.0  # such passes per probing step, in whole-batch equivalents
    lowest_probe_layer: int = 0  # the probe backward stops at this decoder block's output
    lens_lengths: tuple[int, ...] = ()  # sequences whose hidden states go through the LM head (RepNoise), all ranks
    lens_states: int = 0  # how many hidden states of each (RepNoise: L + 1)


NO_EXTRA_PASSES = ExtraPasses()


class Method:
    name = "base"
    needs_safety = False  # whether the run data must include data.safety (the pair table)
    safety_mix = 0.0  # refusal demonstrations from data.safety added to the task data, per task example
    # The phases a step times (trainer.timer): logged as time/<phase>, the bench's columns. Every step
    # ends with the trainer's main pass, timed as "main".
    phases: tuple[str, ...] = ("main",)

    def __init__(self, cfg):
        self.cfg = cfg

    def check_model_config(self, model_dir: Path) -> None:
        """Check the config against the model's config.json before the model loads (SAP: its
        probe layers against the depth), so that a mistake costs seconds, not the load and
        sharding of a 70B model."""

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

    def extra_passes(self, trainer, step: int) -> ExtraPasses:
        """What step ``step``, just taken, computed beside the forward and backward of its
        task batch: the trainer's per-step TFLOP/s and MFU and the bench count it with the
        FLOPs model, which knows the passes but not when a method runs them."""
        return NO_EXTRA_PASSES

    def log_stats(self, trainer) -> dict:
        """Extra record entries, on the steps the trainer logs only (they may read the device).
        The one place a method sees its own statistics: SAP also warns there, once, when the
        working dtype stops holding its perturbation."""
        return {}

    def replicated_values(self) -> list[torch.Tensor]:
        """State that every rank must hold identically (not sharded by ZeRO): the trainer's
        ``check_rank_consistency`` compares it across ranks, with the step counter, since a
        silent divergence would train a different model on every rank."""
        return []

    def state_dict(self) -> dict:
        return {"meta": {}, "tensors": {}}

    def load_state_dict(self, state: dict, resharded: bool) -> None:
        pass

    def export_transform(self, trainer, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def save_beside_export(self, folder: Path) -> None:
        """Write the method's own files into the export folder (rank 0), next to the model:
        what it trained that the model does not hold (SAP's probe, for analysis)."""

    def close(self) -> None:
        """Release what the method attached to the model (SAP's probe hooks), so that another
        Trainer in this process starts clean (bench variants, the GPU check)."""

    # ------------------------------------------------------------------ for sap-ds bench

    def min_warmup_steps(self) -> int:
        """The fewest warm-up steps that run every pass of this method once, so that their
        first-use costs (buffers, allocator growth) are never timed."""
        return 0

    def nominal_passes(self) -> Optional[ExtraPasses]:
        """The long-run share of steps that run each extra pass under this config's schedule
        (no lengths): the bench's ideal ratio over SFT. None for a method whose steps cost
        SFT's."""
        return None

    def bench_settings(self, trainer) -> dict:
        """The method's settings the bench records beside its numbers (``settings``)."""
        return {}
