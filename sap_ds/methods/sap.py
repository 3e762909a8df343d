"""Safety-Aware Probing as a method: the step and its state are ``sap_ds/sap.py``'s
(unchanged); this module only connects them to the trainer (batches, checkpoint
tensors, the check before step 1, logged statistics, the probe at export)."""
from __future__ import annotations

import torch

from sap_ds.methods.base import Method
from sap_ds.sap import step as sap_step


class SapMethod(Method):
    name = "sap"
    needs_safety = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.state: sap_step.SapState | None = None
        self.world = 1

    def setup(self, trainer) -> None:
        self.world = trainer.world
        self.state = sap_step.make_state(trainer.engine, trainer.shards, self.cfg.sap, trainer.hidden_size, seed=self.cfg.seed)
        trainer.sap_state = self.state  # read by export, bench, diagnostics and the rank check

    def _safety(self, trainer, step: int) -> dict | None:
        """The safety batch when a new direction is due, else None. The random-direction
        ablation needs no safety batch, only the signal that a new direction is due (an
        empty batch)."""
        if not sap_step.direction_due(self.state, step, self.cfg.sap.safety_every):
            return None
        return trainer.safety_batch(step) if self.cfg.sap.direction == "safety" else {}

    def step(self, trainer, step: int, micro_batches: list[dict]) -> list[float]:
        return sap_step.sap_step(trainer.engine, trainer.shards, self.state, self.cfg.sap, step, micro_batches,
                            self._safety(trainer, step), trainer.main_pass, trainer.timer,
                            lr_factor=trainer.lr_factor(step))

    def preflight(self, trainer) -> None:
        """Whether the working dtype can hold SAP's perturbation (``sap.preflight``;
        ConfigError on every rank alike)."""
        safety = self._safety(trainer, 0)
        with trainer.timer("safety"):  # step 1's safety pass, run here: logged with step 1
            sap_step.preflight(trainer.engine, trainer.shards, self.state, self.cfg.sap, safety, self.cfg.model.dtype)

    def log_stats(self, trainer) -> dict:
        stats = {f"sap/{k}": float(v) for k, v in sap_step.stats_as_floats(self.state).items()}
        trainer._watch_resolution(stats)
        return stats

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        s = self.state
        tensors = {"sap.probe": s.probe.vectors.detach(), "sap.scale": s.scale.reshape(1)}
        tensors.update({f"sap.direction.{i}": d for i, d in enumerate(s.direction)})
        # probe_update: gradient keeps no optimizer state, so its checkpoints hold no sap.opt.*
        opt_state = s.probe_optimizer.state.get(s.probe.vectors, {}) if s.probe_optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in opt_state:
                tensors[f"sap.opt.{key}"] = (torch.as_tensor(opt_state[key]).reshape(-1).float() if key == "step"
                                             else opt_state[key])
        meta = {"safety_global_batch": self.cfg.sap.safety_batch_size * self.world, "direction_step": s.direction_step}
        return {"meta": meta, "tensors": tensors}

    def load_state_dict(self, state: dict, resharded: bool) -> None:
        s, tensors, meta = self.state, state["tensors"], state["meta"]
        with torch.no_grad():
            s.probe.vectors.copy_(tensors["sap.probe"])
            s.scale.copy_(tensors["sap.scale"].reshape(()))
            resharded = bool(s.direction) and "sap.direction.0" not in tensors
            for i, d in enumerate(s.direction):
                # Re-sharded (another world size): the direction is shard-shaped, so a new one
                # is made due at the next step instead; the probe and its optimizer are replicated.
                d.zero_() if resharded else d.copy_(tensors[f"sap.direction.{i}"])
            if resharded:
                s.scale.zero_()
        # Resumed under another probe_update (a logged config change): a gradient run ignores
        # an Adam checkpoint's moments; an Adam run after a gradient checkpoint starts its moments.
        if "sap.opt.exp_avg" in tensors and s.probe_optimizer is not None:
            s.probe_optimizer.state[s.probe.vectors] = {
                "exp_avg": tensors["sap.opt.exp_avg"].to(s.probe.vectors.device),
                "exp_avg_sq": tensors["sap.opt.exp_avg_sq"].to(s.probe.vectors.device),
                "step": tensors["sap.opt.step"].reshape(()).clone(),
            }
        s.direction_step = None if resharded else meta.get("direction_step")

    def export_transform(self, trainer, model: torch.nn.Module) -> torch.nn.Module:
        """``export.keep_probe``: the probe written into the model as MLP biases."""
        if not self.cfg.export.keep_probe:
            return model
        from sap_ds.training.export import with_probe_as_bias

        return with_probe_as_bias(model, self.state.probe)
