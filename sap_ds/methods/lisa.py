"""Lisa (Huang et al., "Lisa: Lazy Safety Alignment for Large Language Models against
Harmful Fine-tuning Attack", NeurIPS 2024), after the authors' ``LisaTrainer`` in
``trainer.py`` of github.com/git-disl/Lisa.

A run alternates ``align_steps`` optimizer steps on alignment data (the safe responses of
``data.safety``: harmful prompts answered safely, as the authors' BeaverTails_safe) with
``finetune_steps`` steps on the task data, starting with alignment. Each step adds the
proximal term ``rho/2 ||w - w_other||^2`` to its loss, where ``w_other`` is the other
phase's last weights. The authors keep both phases' weights, but a phase only ever reads
the other's, which are the weights at the moment the current phase began (both start as
the initial weights): one anchor, renewed at every phase switch. Their code turns the
term off for the first 10 % of the run's steps (``proximal_after``).

On ZeRO-3 the term's gradient ``rho * (w - anchor)`` is added to each rank's reduced
local gradient shard before ``engine.step`` (``Zero3Shards.add_proximal_gradient``): the same
gradient as the authors' loss term (``torch.norm(param - anchor)**2`` differentiates to
``2 (param - anchor)``), with no gather and no extra collective. ``w`` is the fp32 master
shard; the anchor a persistent fp32 buffer per flat group, shaped like it (padding zero).

Steps are counted in optimizer steps (the authors count ``training_step`` calls, which is
the same at their gradient_accumulation_steps 1). An alignment step trains on an
alignment batch of the task batch's size (the authors' loader uses the train batch size)
in place of that step's task batch, which is skipped, as in their code.
"""
from __future__ import annotations

import torch

from sap_ds.data import collate, global_batch_indices
from sap_ds.errors import CheckpointError
from sap_ds.methods.base import Method
from sap_ds.parallel import zero3
from sap_ds.parallel.collectives import all_reduce_sum

ALIGNMENT_SEED_OFFSET = 11  # the alignment batches' order: (seed + 11, epoch), apart from task and SAP safety batches


class LisaMethod(Method):
    name = "lisa"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.needs_safety = cfg.lisa.align_steps > 0
        self.anchor: list[torch.Tensor] = []
        self.total_steps = 1
        self._proximal_on = False

    # ------------------------------------------------------------------ schedule

    def aligning(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is an alignment step: each cycle starts
        with ``align_steps`` of them (the authors' ``check_mode``)."""
        a, f = self.cfg.lisa.align_steps, self.cfg.lisa.finetune_steps
        return step % (a + f) < a

    def switches_at(self, step: int) -> bool:
        """Whether a new phase begins at ``step`` (the authors' ``switch_model``)."""
        return step > 0 and self.aligning(step) != self.aligning(step - 1)

    def alignment_steps_before(self, step: int) -> int:
        a, f = self.cfg.lisa.align_steps, self.cfg.lisa.finetune_steps
        cycles, within = divmod(step, a + f)
        return cycles * a + min(within, a)

    def proximal_active(self, step: int) -> bool:
        """The authors' ``self.steps > 0.1 * len(train_dataloader) * num_train_epochs``."""
        return self.cfg.lisa.rho > 0 and step > self.cfg.lisa.proximal_after * self.total_steps

    # ------------------------------------------------------------------ the step

    def setup(self, trainer) -> None:
        self.total_steps = trainer.total_steps
        self.anchor = trainer.shards.new_flat_buffers()
        self._set_anchor(trainer)  # the initial weights (a resume overwrites them)

    @torch.no_grad()
    def _set_anchor(self, trainer) -> None:
        for buf, g in zip(self.anchor, trainer.shards.groups):
            buf.copy_(g.master)

    def alignment_indices(self, n: int, global_batch: int, step: int) -> list[int]:
        return global_batch_indices(n, global_batch, self.alignment_steps_before(step),
                                    self.cfg.seed + ALIGNMENT_SEED_OFFSET)

    def alignment_micro_batches(self, trainer, step: int) -> list[dict]:
        """This rank's slice of the step's global alignment batch, as the task batch is cut."""
        t = self.cfg.train
        idx = self.alignment_indices(len(trainer.data.safety), trainer.global_batch, step)
        per_rank = t.micro_batch_size * t.grad_accum
        mine = idx[trainer.rank * per_rank : (trainer.rank + 1) * per_rank]
        pad = trainer.tokenizer.pad_token_id
        return [trainer._to_device(collate([trainer.data.safety[i].safe for i in
                                            mine[m * t.micro_batch_size : (m + 1) * t.micro_batch_size]], pad))
                for m in range(t.grad_accum)]

    def step(self, trainer, step: int, micro_batches: list[dict]) -> list[float]:
        if self.switches_at(step):
            self._set_anchor(trainer)  # the phase that ended leaves its last weights as the anchor
        batches = self.alignment_micro_batches(trainer, step) if self.aligning(step) else micro_batches
        self._proximal_on = self.proximal_active(step)
        with trainer.timer("main"):
            return trainer.main_pass(batches, before_step=(lambda: self._add_proximal(trainer)) if self._proximal_on else None)

    @torch.no_grad()
    def _add_proximal(self, trainer) -> None:
        trainer.shards.add_proximal_gradient(self.anchor, self.cfg.lisa.rho)

    def trains_on(self, step: int) -> str:
        return "alignment" if self.aligning(step) else "task"

    def trained_micro_batches(self, trainer, step: int) -> list[dict]:
        return self.alignment_micro_batches(trainer, step) if self.aligning(step) else trainer.task_micro_batches(step)

    def trained_lengths(self, trainer, step: int) -> list[int]:
        if not self.aligning(step):
            return trainer._task_lengths(step)
        idx = self.alignment_indices(len(trainer.data.safety), trainer.global_batch, step)
        return [len(trainer.data.safety[i].safe.input_ids) for i in idx]

    def log_stats(self, trainer) -> dict:
        """The phase of the step just taken, whether it had the proximal term, and the
        squared distance to the anchor (the authors print it at each switch), summed in float64
        a chunk at a time (``zero3.chunked``: no shard-sized temporary)."""
        drift = torch.zeros((), dtype=torch.float64, device=self.anchor[0].device if self.anchor else None)
        for g, anchor in zip(trainer.shards.groups, self.anchor):
            for master, anchor_piece in zero3.chunked(g.master, anchor):
                drift += torch.sub(master, anchor_piece).double().pow_(2).sum()
        return {"lisa/aligning": float(self.aligning(trainer.step - 1)), "lisa/proximal": float(self._proximal_on),
                "lisa/drift_sq": all_reduce_sum(drift.reshape(1)).item()}

    def bench_settings(self, trainer) -> dict:
        lisa = self.cfg.lisa
        return {"align_steps": lisa.align_steps, "finetune_steps": lisa.finetune_steps, "rho": lisa.rho}

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        return {"meta": {}, "tensors": {f"lisa.anchor.{i}": a for i, a in enumerate(self.anchor)}}

    def load_state_dict(self, state: dict, resharded: bool) -> None:
        """The anchor is shard-shaped: it resumes on the world size it was written on. On
        another one it is rebuilt only where it equals the current weights, at a phase
        switch; elsewhere the run is refused (it would pull toward the wrong weights)."""
        step = state["meta"]["step"]
        if resharded:
            if not self.switches_at(step):
                raise CheckpointError(
                    f"method lisa: the checkpoint at step {step} holds anchors sharded for another number of ranks, "
                    f"and step {step} is not a phase switch (where they would be renewed): resume on the world size "
                    f"it was written on, or from a checkpoint at a switch (a multiple of lisa.align_steps/finetune_steps)")
            return  # step() renews the anchor at this switch
        with torch.no_grad():
            for i, a in enumerate(self.anchor):
                a.copy_(state["tensors"][f"lisa.anchor.{i}"])
