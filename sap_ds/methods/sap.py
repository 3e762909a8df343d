"""Safety-Aware Probing as a method: the step and its state are ``sap_ds/sap/``'s
(unchanged); this module only connects them to the trainer (the safety batches,
checkpoint tensors, the check before step 1, logged statistics and the watch on their
resolution, the passes the FLOPs model counts, the probe at export and its hooks)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from sap_ds.data import collate_pairs, global_batch_indices
from sap_ds.methods.base import ExtraPasses, Method
from sap_ds.parallel.distributed import is_main
from sap_ds.sap import step as sap_step

log = logging.getLogger("sap_ds")

SAFETY_SEED_OFFSET = 7  # the safety batches' order: (seed + 7, epoch), apart from the task batches


class SapMethod(Method):
    name = "sap"
    needs_safety = True
    phases = sap_step.PHASES

    def __init__(self, cfg):
        super().__init__(cfg)
        self.state: sap_step.SapState | None = None
        self.world = 1
        self._resolution_warned = False

    def check_model_config(self, model_dir: Path) -> None:
        """The probe layers against the depth in config.json: a band such as '11-20' on a
        shallower model fails here (ProbeError)."""
        from sap_ds.sap.probe import check_layers_from_config

        check_layers_from_config(self.cfg.sap.probe_layers, model_dir / "config.json")

    def setup(self, trainer) -> None:
        self.world = trainer.world
        self.state = sap_step.make_state(trainer.engine, trainer.shards, self.cfg.sap, trainer.hidden_size, seed=self.cfg.seed)

    # ------------------------------------------------------------------ the safety batches

    def safety_indices(self, trainer, step: int) -> list[int]:
        """The global safety batch of step ``step`` (``sap.safety_batch_size`` pairs per rank):
        a new one every ``sap.safety_every`` steps, in an order apart from the task data's."""
        size = self.cfg.sap.safety_batch_size
        return global_batch_indices(len(trainer.data.safety), size * self.world, step // self.cfg.sap.safety_every,
                                    self.cfg.seed + SAFETY_SEED_OFFSET)

    def safety_batch(self, trainer, step: int) -> dict:
        """This rank's share of step ``step``'s safety batch, on the device."""
        size = self.cfg.sap.safety_batch_size
        mine = self.safety_indices(trainer, step)[trainer.rank * size : (trainer.rank + 1) * size]
        return trainer._to_device(collate_pairs([trainer.data.safety[i] for i in mine], trainer.tokenizer.pad_token_id))

    def _safety(self, trainer, step: int) -> dict | None:
        """The safety batch when a new direction is due, else None. The random-direction
        ablation needs no safety batch, only the signal that a new direction is due (an
        empty batch)."""
        if not sap_step.direction_due(self.state, step, self.cfg.sap.safety_every):
            return None
        return self.safety_batch(trainer, step) if self.cfg.sap.direction == "safety" else {}

    # ------------------------------------------------------------------ the step

    def step(self, trainer, step: int, micro_batches: list[dict]) -> list[float]:
        return sap_step.sap_step(trainer.engine, trainer.shards, self.state, self.cfg.sap, step, micro_batches,
                                 self._safety(trainer, step), trainer.main_pass, trainer.timer,
                                 lr_factor=trainer.lr_factor(step))

    def preflight(self, trainer) -> None:
        """Whether the working dtype can hold SAP's perturbation and resolve the probe
        gradient it gives on step 1's task batch (``sap.preflight``; ConfigError on every
        rank alike)."""
        safety = self._safety(trainer, 0)
        with trainer.timer("safety"):  # step 1's safety pass, run here: logged with step 1
            sap_step.preflight(trainer.engine, trainer.shards, self.state, self.cfg.sap, safety, self.cfg.model.dtype,
                               micro_batches=trainer.task_micro_batches(0))

    def extra_passes(self, trainer, step: int) -> ExtraPasses:
        """The safety and probe passes step ``step`` ran (``SapState.ran``), with the lengths
        (safe and harmful responses) of the safety batch it draws, also where the pass did not
        run (the bench weighs them with the long-run share); none for the random-direction
        ablation, whose safety pass is no forward or backward."""
        ran = self.state.ran
        lengths = ()
        if self.cfg.sap.direction == "safety" and self.cfg.sap.perturbs:
            pairs = [trainer.data.safety[i] for i in self.safety_indices(trainer, step)]
            lengths = tuple(len(t.input_ids) for pair in pairs for t in (pair.safe, pair.harmful))
        return ExtraPasses(safety=1.0 if ran.get("safety") else 0.0, safety_lengths=lengths,
                           probe=1.0 if ran.get("probe") else 0.0, probe_passes=ran.get("probe_passes") or 1,
                           lowest_probe_layer=min(self.state.probe.layers))

    def log_stats(self, trainer) -> dict:
        stats = {f"sap/{k}": float(v) for k, v in sap_step.stats_as_floats(self.state).items()}
        self._watch_resolution(trainer.step, stats)
        return stats

    def _watch_resolution(self, step: int, record: dict) -> None:
        """The check before step 1 sees only the first direction; a LoRA run starts with B = 0,
        where bf16 holds any step, and loses resolution as B grows. Warn once (rank 0) when a
        logged probe step's realised perturbation leaves the tolerance, naming the figures."""
        from sap_ds.sap.resolution import Fidelity

        ratio, cosine = record.get("sap/perturb_realized_ratio"), record.get("sap/perturb_cosine")
        if self._resolution_warned or ratio is None or cosine is None or math.isnan(ratio) or math.isnan(cosine):
            return
        measured = Fidelity(ratio, cosine, record.get("sap/perturb_changed_fraction", float("nan")))
        if measured.ok or self.cfg.sap.resolution_check == "off":
            return
        self._resolution_warned = True
        if is_main():
            log.warning("step %d: the %s working shards no longer hold SAP's perturbation (%s; the check before step 1 "
                        "passed): the probe pass measures rounding noise from here on. Raise sap.rho or train in fp32; "
                        "sap/perturb_* in metrics.jsonl follow it (warned once)", step, self.cfg.model.dtype,
                        measured.describe())

    def replicated_values(self) -> list[torch.Tensor]:
        """The probe and the direction scale (replicated, not sharded: identical on every
        rank). The scale lives with the master: on the CPU under ZeRO-Offload."""
        return [self.state.probe.vectors, self.state.scale]

    # ------------------------------------------------------------------ checkpoint state

    @property
    def direction_reused(self) -> bool:
        """Whether a direction outlives the step that computed it (``sap.safety_every > 1``
        on a run that perturbs): only then is it worth a checkpoint's space (4 B per trainable
        parameter, ~280 GB at 70B full fine-tuning). With ``safety_every: 1`` every probing
        step computes its own before using it."""
        return self.cfg.sap.perturbs and self.cfg.sap.safety_every > 1

    def state_dict(self) -> dict:
        s = self.state
        tensors = {"sap.probe": s.probe.vectors.detach(), "sap.scale": s.scale.reshape(1)}
        if self.direction_reused:
            tensors.update({f"sap.direction.{i}": d for i, d in enumerate(s.direction)})
        # probe_update: gradient keeps no optimizer state, so its checkpoints hold no sap.opt.*
        opt_state = s.probe_optimizer.state.get(s.probe.vectors, {}) if s.probe_optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in opt_state:
                tensors[f"sap.opt.{key}"] = (torch.as_tensor(opt_state[key]).reshape(-1).float() if key == "step"
                                             else opt_state[key])
        return {"meta": {"direction_step": s.direction_step}, "tensors": tensors}

    def load_state_dict(self, state: dict, resharded: bool) -> None:
        s, tensors, meta = self.state, state["tensors"], state["meta"]
        with torch.no_grad():
            s.probe.vectors.copy_(tensors["sap.probe"])
            s.scale.copy_(tensors["sap.scale"].reshape(()))
            stored = not s.direction or "sap.direction.0" in tensors
            for i, d in enumerate(s.direction):
                # Not stored (safety_every 1: never reused) or re-sharded (another world size: the
                # direction is shard-shaped): a new one is made due at the next step instead; the
                # probe and its optimizer are replicated.
                d.copy_(tensors[f"sap.direction.{i}"]) if stored else d.zero_()
            if not stored:
                s.scale.zero_()
        # Resumed under another probe_update (a logged config change): a gradient run ignores
        # an Adam checkpoint's moments; an Adam run after a gradient checkpoint starts its moments.
        if "sap.opt.exp_avg" in tensors and s.probe_optimizer is not None:
            s.probe_optimizer.state[s.probe.vectors] = {
                "exp_avg": tensors["sap.opt.exp_avg"].to(s.probe.vectors.device),
                "exp_avg_sq": tensors["sap.opt.exp_avg_sq"].to(s.probe.vectors.device),
                "step": tensors["sap.opt.step"].reshape(()).clone(),
            }
        s.direction_step = meta.get("direction_step") if stored else None

    # ------------------------------------------------------------------ export and teardown

    def export_transform(self, trainer, model: torch.nn.Module) -> torch.nn.Module:
        """``export.keep_probe``: the probe written into the model as MLP biases."""
        if not self.cfg.export.keep_probe:
            return model
        from sap_ds.sap.probe import with_probe_as_bias

        return with_probe_as_bias(model, self.state.probe)

    def save_beside_export(self, folder: Path) -> None:
        """``probe.safetensors``: the probe vectors and their layers, for analysis (the
        exported model holds no probe unless ``export.keep_probe``)."""
        from safetensors.torch import save_file

        save_file({"probe": self.state.probe.vectors.detach().cpu().contiguous(),
                   "layers": torch.tensor(self.state.probe.layers)}, str(folder / "probe.safetensors"))

    def close(self) -> None:
        """The probe's forward hooks come off the model."""
        if self.state is not None:
            self.state.probe.remove()

    # ------------------------------------------------------------------ for sap-ds bench

    def min_warmup_steps(self) -> int:
        """Through the first step that runs the probe pass (with probe_fraction 0.5 step 0
        runs none and step 1 would carry the first-use costs of the SAP phases)."""
        if not self.cfg.sap.probe_enabled:
            return 0
        return next(s for s in range(10**6) if sap_step.runs_probe(s, self.cfg.sap.probe_fraction)) + 1

    def nominal_passes(self) -> ExtraPasses:
        """The long-run shares of safety and probe steps under ``safety_every`` and
        ``probe_fraction`` (``sap_step.nominal_shares``)."""
        c = self.cfg.sap
        safety, probe = sap_step.nominal_shares(c.safety_every, c.probe_fraction)
        return ExtraPasses(safety=safety, probe=probe, probe_passes=c.probe_share(self.cfg.train.grad_accum),
                           lowest_probe_layer=min(self.state.probe.layers))

    def bench_settings(self, trainer) -> dict:
        c = self.cfg.sap
        return {"safety_every": c.safety_every, "probe_fraction": c.probe_fraction,
                "safety_batch_size": c.safety_batch_size, "safety_max_length": self.cfg.data.safety_max_length,
                "probe_layers": c.probe_layers, "probe_update": c.probe_update, "probe_timing": c.probe_timing}
