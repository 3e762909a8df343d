"""Booster (Huang, Hu, Ilhan, Tekin, Liu, "Booster: Tackling Harmful Fine-tuning for Large
Language Models via Attenuating Harmful Perturbation", ICLR 2025), after the authors'
``BoosterAlignmentTrainer.training_step`` in ``trainer.py`` of github.com/git-disl/Booster
(commit 6421918; docs/alignment_defences.md lists every difference).

An alignment-stage defence: the run's own data is the alignment data (refusals to harmful
prompts, configs/booster_align.yaml), and each optimizer step descends

    g_align + lamb * (g_h(W) - g_h(W - alpha * g_h(W) / ||g_h(W)||))

the first-order gradient of f(W) + lamb * [h(W) - h(W - alpha * grad h / ||grad h||)]: the
alignment loss plus how much one normalised harmful step would lower the harmful loss h.
The harmful batch (``booster.harmful_batch_size`` per rank) is the harmful responses of
``data.safety``'s pairs, drawn in an order of its own.

One step on ZeRO-3, phase by phase (``PHASES``; the buffer and the kernels are SAP's):

1. ``harmful``: engine forward/backward of h on the harmful batch; the reduced gradient
   shard is copied into one fp32 buffer per flat group (``d``), the gradients dropped.
2. ``perturb``: ||g_h|| from one all-reduce of the local sums; the working shards become
   ``cast(master - alpha / (||g_h|| + 1e-7) * d)`` (SAP's fused kernel), gathered copies
   released.
3. ``harmful_perturbed``: h again on the same batch at the perturbed shards;
   ``d -= g_h(W')`` read straight off the gradient shard (no second buffer).
4. ``restore``: working shards ``= cast(master)``, bit for bit (SAP's kernel; fp32 runs keep
   a copy of W, since there the working shard is the master).
5. ``main``: the trainer's main pass on the alignment micro-batches; before
   ``engine.step`` the reduced gradient gets ``+ lamb * d``, so clipping and AdamW see the
   combined gradient, as the authors' HF Trainer does.

Non-finite harmful gradients leave the step to the alignment gradient (the term is
zeroed, ``booster/term_ok`` 0 in the log, warned on a logged step), never NaN in the weights.
"""
from __future__ import annotations

import logging
import math

import sap_ds_kernels
import torch

from sap_ds.data import collate, global_batch_indices
from sap_ds.errors import ConfigError
from sap_ds.methods.base import ExtraPasses, Method
from sap_ds.model.losses import forward_logits, task_loss
from sap_ds.parallel import zero3
from sap_ds.parallel.collectives import all_reduce_sum
from sap_ds.parallel.distributed import is_main
from sap_ds.sap import resolution
from sap_ds.sap import step as sap_step

log = logging.getLogger("sap_ds")

HARMFUL_SEED_OFFSET = 17  # the harmful batches' order: (seed + 17, epoch), apart from task, SAP, Lisa and mix draws
NORM_EPS = 1e-7  # the authors' ``self._grad_norm(stored_grads) + 1e-7`` (trainer.py:295)
PHASES = ("harmful", "perturb", "harmful_perturbed", "restore", "main")


class BoosterMethod(Method):
    name = "booster"
    phases = PHASES

    def __init__(self, cfg):
        super().__init__(cfg)
        self.needs_safety = cfg.booster.lamb > 0
        self.world = 1
        self.buffers: sap_step.SapState | None = None  # direction d, its scale, the fp32 backup, the stats
        self._term_warned = False
        self._resolution_warned = False

    @property
    def active(self) -> bool:
        """lamb 0: the term is zero whatever the passes give, so none runs (SFT's step)."""
        return self.cfg.booster.lamb > 0

    def setup(self, trainer) -> None:
        """SAP's per-step buffers, without a probe: ``direction`` holds g_h, then g_h - g_h'."""
        self.world = trainer.world
        shards = trainer.shards
        device = shards.groups[0].master.device if shards.groups else torch.device("cpu")
        backup = shards.new_flat_buffers() if any(g.master_aliases_lp for g in shards.groups) else None
        self.buffers = sap_step.SapState(probe=None, probe_optimizer=None, direction=shards.new_flat_buffers(),
                                         scale=torch.zeros((), device=device), backup=backup)

    # ------------------------------------------------------------------ the harmful batches

    def harmful_indices(self, trainer, step: int) -> list[int]:
        """The global harmful batch of step ``step`` (``harmful_batch_size`` per rank), a new one
        every step, as the authors' cycling RandomSampler draws one per training_step
        (trainer.py:172-180)."""
        size = self.cfg.booster.harmful_batch_size
        return global_batch_indices(len(trainer.data.safety), size * self.world, step,
                                    self.cfg.seed + HARMFUL_SEED_OFFSET)

    def harmful_batch(self, trainer, step: int) -> dict:
        """This rank's share of the step's harmful batch: harmful responses to harmful prompts
        (loss on the response tokens), on the device."""
        size = self.cfg.booster.harmful_batch_size
        mine = self.harmful_indices(trainer, step)[trainer.rank * size : (trainer.rank + 1) * size]
        items = [trainer.data.safety[i].harmful for i in mine]
        return trainer._to_device(collate(items, trainer.tokenizer.pad_token_id))

    # ------------------------------------------------------------------ the step

    def _harmful_pass(self, trainer, batch: dict) -> torch.Tensor:
        """Forward/backward of h on ``batch``, the gradient reduced into the shards (mean over
        ranks). ``scale_wrt_gas=False``: one batch per step, not a micro-batch, and its
        gradient enters the combination at its own scale (the authors' GA is 1)."""
        engine = trainer.engine
        engine.set_gradient_accumulation_boundary(True)
        loss = task_loss(forward_logits(engine, batch), batch["labels"])
        engine.backward(loss, scale_wrt_gas=False)
        engine.set_gradient_accumulation_boundary(None)
        return loss.detach().float()

    def _harmful_gradient(self, trainer, batch: dict) -> torch.Tensor:
        """Phase 1: g_h into the buffers (trainer.py:282-291); returns ||g_h||^2 over all ranks."""
        shards, b = trainer.shards, self.buffers
        loss = self._harmful_pass(trainer, batch)
        shards.copy_local_grads(b.direction)
        shards.drop_grads()
        backend = self.cfg.booster.kernels
        sums = torch.stack([sap_ds_kernels.sumsq(d, g.master, backend=backend)
                            for d, g in zip(b.direction, shards.groups)]).sum(0)
        g2, w2 = all_reduce_sum(sums.to(torch.float64)).unbind()
        b.stats = {"harmful_loss": loss, "harmful_grad_norm": g2.clamp_min(0).sqrt(), "weight_norm": w2.clamp_min(0).sqrt()}
        return g2

    def _set_scale(self, g2: torch.Tensor, alpha: float) -> torch.Tensor:
        """scale = -alpha / (||g_h|| + 1e-7) (trainer.py:295-300), 0 where ||g_h|| is not finite
        (non-finite elements of d are zeroed: nothing NaN reaches the shards). Returns whether
        the gradient was finite (0-dim bool)."""
        b = self.buffers
        ok = torch.isfinite(g2)
        scale = -alpha / (g2.clamp_min(0).sqrt() + NORM_EPS)
        for d in b.direction:
            torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
        b.scale.copy_(torch.where(ok, scale, torch.zeros_like(scale)).to(b.scale.dtype))
        return ok

    def step(self, trainer, step: int, micro_batches: list[dict]) -> list[float]:
        if not self.active:
            with trainer.timer("main"):
                return trainer.main_pass(micro_batches)
        c, shards, b, timer = self.cfg.booster, trainer.shards, self.buffers, trainer.timer
        batch = self.harmful_batch(trainer, step)
        rng = sap_step.rng_state()
        with timer("harmful"):
            g2 = self._harmful_gradient(trainer, batch)
        with timer("perturb"):
            ok = self._set_scale(g2, c.alpha)
            sap_step.perturb(shards, b, c.kernels)  # W' = W - alpha g_h / ||g_h||, in the working shards
        with timer("harmful_perturbed"):
            sap_step.restore_rng_state(rng)  # the same dropout masks as the pass at W: h(W) - h(W') sees the step, not the masks
            b.stats["harmful_loss_perturbed"] = self._harmful_pass(trainer, batch)  # trainer.py:303-313
            shards.accumulate_local_grads(b.direction, -1.0)  # d = g_h(W) - g_h(W')
            shards.drop_grads()
        with timer("restore"):
            sap_step.restore(shards, b, c.kernels)  # exact, from the master (the authors add back: trainer.py:316-319)
        # The term's norm, and whether it is finite on every rank: a NaN in g_h' would otherwise
        # pass the main pass's check (made before the term is added) and reach the weights.
        t2 = all_reduce_sum(_sumsq(b.direction).reshape(1))[0]
        term_ok = ok & torch.isfinite(t2)
        for d in b.direction:
            torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
        coef = torch.where(term_ok, torch.tensor(float(c.lamb), dtype=torch.float32, device=term_ok.device),
                           torch.zeros((), dtype=torch.float32, device=term_ok.device))
        b.stats.update({"term_norm": float(c.lamb) * t2.clamp_min(0).sqrt(), "term_ok": term_ok})
        with timer("main"):  # grad = g_align + lamb * (g_h - g_h') before clipping and AdamW (trainer.py:373-375)
            return trainer.main_pass(micro_batches, before_step=lambda: shards.add_to_local_grads(b.direction, coef))

    def preflight(self, trainer) -> None:
        """Whether the working dtype holds the simulated harmful step at step 1's harmful batch
        (``booster.resolution_check``): the realised ``cast(W - alpha g/||g||) - cast(W)``
        must have the intended norm within 10 % and a cosine of at least 0.99 with it (SAP's
        thresholds, ``sap_ds/sap/resolution.py``), or the second harmful gradient is taken
        at a point that is not the simulated step. ConfigError on every rank alike, naming
        booster.alpha and the smallest alpha that passes. Leaves weights, gradients and the
        RNG as it found them."""
        c = self.cfg.booster
        if not self.active or c.resolution_check == "off" or c.alpha == 0:
            return
        rng = sap_step.rng_state()
        with trainer.timer("harmful"):  # logged with step 1
            g2 = self._harmful_gradient(trainer, self.harmful_batch(trainer, 0))
        sap_step.restore_rng_state(rng)
        self._set_scale(g2, c.alpha)
        check_alpha(trainer.shards, self.buffers, c, self.cfg.model.dtype)

    # ------------------------------------------------------------------ what the tools read

    def extra_passes(self, trainer, step: int) -> ExtraPasses:
        """Two forward+backward passes on the harmful batch (weight 2 on its lengths, all ranks)."""
        if not self.active:
            return ExtraPasses()
        lengths = tuple(len(trainer.data.safety[i].harmful.input_ids) for i in self.harmful_indices(trainer, step))
        return ExtraPasses(safety=2.0, safety_lengths=lengths)

    def nominal_passes(self) -> ExtraPasses | None:
        return ExtraPasses(safety=2.0) if self.active else None

    def log_stats(self, trainer) -> dict:
        """The last step's harmful losses at W and W', ||g_h||, ||W||, lamb * ||g_h - g_h'||,
        whether the term was applied, and how faithfully the shards held the step (SAP's
        ``perturb_*`` figures), with one device-to-host read; warns once if a logged step's
        term was dropped or its step left the working dtype's resolution."""
        if not self.active or not self.buffers.stats:
            return {}
        stats = self.buffers.stats
        keys = list(stats)
        values = torch.stack([torch.as_tensor(stats[k]).detach().reshape(()).double().cpu() for k in keys]).tolist()
        record = {f"booster/{k}": v for k, v in zip(keys, values)}
        if is_main() and record.get("booster/term_ok", 1.0) == 0.0 and not self._term_warned:
            self._term_warned = True
            log.warning("step %d: Booster's harmful gradients were not finite: the step took the alignment gradient "
                        "alone (booster/term_ok in metrics.jsonl marks such steps; warned once)", trainer.step)
        ratio, cosine = record.get("booster/perturb_realized_ratio"), record.get("booster/perturb_cosine")
        if (ratio is not None and cosine is not None and not math.isnan(ratio) and not self._resolution_warned
                and self.cfg.booster.resolution_check != "off"):
            measured = resolution.Fidelity(ratio, cosine, record.get("booster/perturb_changed_fraction", float("nan")))
            if not measured.ok:
                self._resolution_warned = True
                if is_main():
                    log.warning("step %d: the %s working shards no longer hold Booster's simulated harmful step (%s; "
                                "the check before step 1 passed): raise booster.alpha or train in fp32 (warned once)",
                                trainer.step, self.cfg.model.dtype, measured.describe())
        return record

    def replicated_values(self) -> list[torch.Tensor]:
        """The step's scale -alpha / ||g_h||: from an all-reduced norm, identical on every rank."""
        return [self.buffers.scale] if self.buffers is not None else []

    def bench_settings(self, trainer) -> dict:
        c = self.cfg.booster
        return {"lamb": c.lamb, "alpha": c.alpha, "harmful_batch_size": c.harmful_batch_size,
                "safety_max_length": self.cfg.data.safety_max_length}


def _sumsq(buffers: list[torch.Tensor]) -> torch.Tensor:
    """sum of squares of flat buffers in float64, a chunk at a time (no shard-sized temporary)."""
    total = torch.zeros((), dtype=torch.float64, device=buffers[0].device if buffers else None)
    for buf in buffers:
        for (piece,) in zero3.chunked(buf):
            total += piece.double().square().sum().to(total.device)
    return total


def check_alpha(shards, buffers, cfg, dtype_name: str) -> resolution.Fidelity:
    """The check before step 1 on the first harmful direction (``buffers``: its direction and
    scale, set): the realised perturbation's fidelity (``resolution.shard_fidelity``, nothing
    written); when it fails, ConfigError (``booster.resolution_check: error``) or a warning
    (``warn``) naming booster.alpha and the smallest alpha that passes on these shards, searched
    up to a step as large as the weights (||W||)."""
    measured = resolution.shard_fidelity(shards, buffers, 1.0, cfg.kernels)
    if cfg.resolution_check == "off" or measured.ok:
        return measured
    weight_norm = math.sqrt(all_reduce_sum(_sumsq([g.master for g in shards.groups]).reshape(1)).item())
    ceiling = max(weight_norm / cfg.alpha, 1.0)
    best = resolution.smallest_passing_multiplier(lambda m: resolution.shard_fidelity(shards, buffers, m, cfg.kernels),
                                                  ceiling)
    advice = (f"no booster.alpha up to ||W|| = {weight_norm:.3g} meets it" if best is None else
              f"the smallest booster.alpha that meets it on these weights is about "
              f"{resolution.round_up(cfg.alpha * best):.2g}")
    message = (
        f"booster.alpha={cfg.alpha:g} is below what the {dtype_name} working weights can represent: at the first "
        f"harmful gradient the simulated harmful step W - alpha g/||g|| that the second harmful pass would see has "
        f"{measured.describe()} (needed: norm within {100 * resolution.RATIO_TOLERANCE:.0f} % of alpha and cosine "
        f">= {resolution.COSINE_MIN}); {advice}. Set booster.alpha to that, or train in fp32 (model.dtype=fp32), or "
        f"set booster.resolution_check=warn to run anyway (the attenuation term would measure rounding noise)")
    if cfg.resolution_check == "error":
        raise ConfigError(message)
    if is_main():
        log.warning("%s", message)
    return measured
