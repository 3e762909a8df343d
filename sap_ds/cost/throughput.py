"""Model TFLOP/s and MFU of every training step, from the step's real token counts.

The FLOPs are the benchmark's model (``sap_ds.cost.flops``: forward, backward, and the
extra passes a method's step ran, ``Method.extra_passes``: SAP's safety and probe passes on
the steps that ran them), counted on real, unpadded sequence lengths of the whole job's
batch, so the number means the same on every machine and padding never inflates it. MFU divides by the job's peak
(``sap_ds.cost.hardware``): the GPU table, or on CPU a GEMM measured once when the trainer
starts. When there is no peak (a GPU missing from the table) MFU is null and
``mfu_note`` says why; when the model's config.json is not a Llama-style one the FLOPs
cannot be counted and both are null, with the reason.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from sap_ds.methods.base import ExtraPasses

log = logging.getLogger("sap_ds")


class Throughput:
    """Per-step records (``step``) and the run's totals (``summary``). Collective to build
    on CPU (every rank measures the GEMM peak at once)."""

    def __init__(self, cfg, model_path, world: int):
        from sap_ds.cost.flops import from_run_config
        from sap_ds.cost.hardware import job_peak_flops

        self.flops_model, self.note = None, None
        try:
            self.flops_model = from_run_config(cfg, model_path)
        except Exception as exc:  # noqa: BLE001 - a model the FLOPs model cannot read must not stop training
            self.note = f"no FLOPs model for {model_path} ({exc})"
            log.warning("TFLOP/s and MFU are not logged: %s", self.note)
        self.peak = job_peak_flops(cfg.model.dtype, world)
        if self.peak["total"] is None and self.note is None:
            self.note = self.peak["source"]
        self.flops = 0.0
        self.seconds = 0.0

    def step(self, task_lengths: Sequence[int], extra: ExtraPasses, seconds: float) -> dict:
        """The record entries of one step. ``extra``: what the step computed beside its task
        batch's forward and backward (``Method.extra_passes``; nothing for SFT): SAP's safety
        and probe passes count where they ran, the probe pass ``probe_passes`` times (2 under
        ``same_step``)."""
        if self.flops_model is None or seconds <= 0:
            return {"model_tflops_per_s": None, "mfu": None, "mfu_note": self.note}
        flops = self.flops_model.step(task_lengths, extra.safety_lengths, safety=extra.safety, probe=extra.probe,
                                      lowest_probe_layer=extra.lowest_probe_layer,
                                      probe_passes=extra.probe_passes, lens_lengths=extra.lens_lengths,
                                      lens_states=extra.lens_states).total
        self.flops += flops
        self.seconds += seconds
        return self._entries(flops, seconds)

    def summary(self) -> dict:
        """Over all steps of this start: model FLOPs / the steps' wall time."""
        if self.flops_model is None or self.seconds <= 0:
            return {"model_tflops_per_s": None, "mfu": None, "mfu_note": self.note}
        return {**self._entries(self.flops, self.seconds), "mfu_peak_source": self.peak["source"]}

    def _entries(self, flops: float, seconds: float) -> dict:
        rate = flops / seconds
        mfu: Optional[float] = rate / self.peak["total"] if self.peak["total"] else None
        out = {"model_tflops_per_s": rate / 1e12, "mfu": mfu}
        if mfu is None:
            out["mfu_note"] = self.note
        return out
