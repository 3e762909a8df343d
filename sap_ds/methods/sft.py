"""Plain supervised fine-tuning: the trainer's main pass, nothing else."""
from __future__ import annotations

from sap_ds.methods.base import Method


class SftMethod(Method):
    name = "sft"

    def step(self, trainer, step: int, micro_batches: list[dict]) -> list[float]:
        with trainer.timer("main"):
            return trainer.main_pass(micro_batches)
