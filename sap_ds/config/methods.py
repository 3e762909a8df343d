"""The config sections of the training methods other than SFT (``sap``, ``lisa``,
``safety_mix``) and of SafeLoRA at export: each method's knobs, their defaults and which
source each default comes from (docs/algorithm.md). Part of the run config
(``sap_ds.config.run.RunConfig``), kept apart so that the shared sections stay short.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from sap_ds.config.reading import Section


class SapConfig(Section):
    """Safety-Aware Probing (docs/algorithm.md). Ignored unless method is 'sap'."""

    rho: float = Field(2e-5, ge=0.0, description="Perturbation radius relative to ||W|| (authors' grad_rate).")
    probe_layers: list[int] = Field(default_factory=lambda: [3, 9], description="Decoder blocks whose output gets the "
                                    "probe: a list ([3, 9], the authors') or an inclusive band '11-20' (the paper's middle band).")
    probe_lr: float = Field(0.05, ge=0.0, description="The probe's step size: AdamW's lr (probe_update: adam) or the "
                            "gradient step's beta (probe_update: gradient).")
    probe_adam_eps: float = Field(1e-8, gt=0.0, description="eps of the probe's AdamW.")
    probe_reset: bool = Field(True, description="Zero the probe before each probe step (authors' behaviour).")
    probe_enabled: bool = True
    safety_loss: Literal["contrastive", "difference"] = "contrastive"
    temperature: float = Field(1.0, gt=0.0)
    safety_batch_size: int = Field(8, gt=0)
    safety_every: int = Field(1, gt=0, description="Recompute the safety direction every k steps, reuse it between.")
    perturb_norm: Literal["global", "per_tensor"] = "global"
    probe_fraction: float = Field(1.0, gt=0.0, le=1.0, description="Share of steps that run the probe pass.")
    probe_micro_batches: Optional[int] = Field(None, gt=0, description="Run the probe pass on the first k of the step's "
                                               "train.grad_accum micro-batches only, the W side of gV taken from the main "
                                               "pass's same k (a cheaper, noisier gV); null: all of them.")
    kernels: Literal["auto", "triton", "torch"] = "auto"
    resolution_check: Literal["error", "warn", "off"] = Field(
        "error", description="Before step 1: can the working dtype (bf16) hold the perturbation rho gives? 'error' stops "
        "the run naming the smallest rho that passes, 'warn' only says so (docs/algorithm.md, precision).")
    # Variants and ablations (docs/algorithm.md, "Variants"): the authors' method is the default.
    probe_scale: Optional[float] = Field(None, gt=0.0, description="Rescale each probe vector after every update to this "
                                         "fraction of the mean hidden-state norm at its layer; null: as the optimizer leaves it.")
    probe_lr_schedule: Literal["constant", "follow"] = Field("constant", description="'follow': the probe lr takes the "
                                                             "task lr's warm-up and decay factor.")
    direction: Literal["safety", "random"] = Field("safety", description="Ablation 'random': a Gaussian direction "
                                                   "instead of the safety gradient, same norm rho*||W||.")
    probe_train: bool = Field(True, description="Ablation false: the probe keeps its initial value (probe_init: "
                                                "random); no safety, perturbation or probe pass.")
    probe_init: Literal["zeros", "random"] = "zeros"
    probe_init_norm: float = Field(1.0, gt=0.0, description="L2 norm of each layer's vector with probe_init: random.")
    # The two forms of the probe step (docs/algorithm.md, "Two forms of the probe step"): the
    # defaults are the authors' code; 'gradient' + 'same_step' is the paper's Algorithm 1.
    probe_update: Literal["adam", "gradient"] = Field("adam", description="'adam': one step of the probe's own AdamW "
                                                      "(authors' code); 'gradient': V <- V - probe_lr * gV, no optimizer "
                                                      "state (paper Algorithm 1, V = beta * grad_V L_su).")
    probe_timing: Literal["next_step", "same_step"] = Field("next_step", description="'next_step': the probe computed "
                                                            "in step t is used in step t+1's main pass (authors' code); "
                                                            "'same_step': computed from step t's batch, with one extra "
                                                            "pass at W, and used in step t's main pass (paper Algorithm 1).")

    @field_validator("probe_layers", mode="before")
    @classmethod
    def _band(cls, value: Any) -> Any:
        """``'11-20'`` -> ``[11, ..., 20]`` (inclusive, as the paper writes v_[11:20]); a list
        passes through. Checked against the model's depth before the model loads
        (``sap_ds.sap.probe.check_layers``)."""
        return parse_layer_band(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _forms(self) -> "SapConfig":
        if (self.probe_timing == "same_step" and self.probe_reset and self.probe_init == "random" and self.probe_train
                and self.probe_enabled):
            raise ValueError("sap.probe_init random with sap.probe_timing same_step and sap.probe_reset true: the probe "
                             "is zeroed before every probe pass, so the random start would never be used; set "
                             "sap.probe_reset false (start from it and keep updating it) or sap.probe_init zeros")
        return self

    @property
    def probe_passes(self) -> int:
        """Task-batch passes for the probe gradient on a probing step (the FLOPs model's q):
        the pass at W' and, with ``same_step``, the one at W before the main pass."""
        return 2 if self.probe_timing == "same_step" else 1

    def probed_micro_batches(self, grad_accum: int) -> int:
        """How many of a step's ``grad_accum`` micro-batches the probe passes run on."""
        return grad_accum if self.probe_micro_batches is None else min(self.probe_micro_batches, grad_accum)

    def probe_share(self, grad_accum: int) -> float:
        """Probe passes per probing step in whole-batch equivalents (the FLOPs model's
        weight): ``probe_passes`` times the probed share of the micro-batches."""
        return self.probe_passes * self.probed_micro_batches(grad_accum) / grad_accum

    def unused_keys(self, method: str) -> set[str]:
        """The keys that cannot change a run of ``method`` with these settings: all of them
        for SFT; for a fixed probe (``probe_train: false``) the ones of the passes it skips;
        the probe's Adam eps under ``probe_update: gradient``."""
        if method != "sap":
            return set(type(self).model_fields)
        if not self.probe_train:
            return {"rho", "probe_lr", "probe_adam_eps", "probe_reset", "probe_lr_schedule", "safety_loss", "temperature",
                    "safety_batch_size", "safety_every", "perturb_norm", "probe_fraction", "direction", "kernels",
                    "resolution_check", "probe_update", "probe_timing", "probe_micro_batches"}
        if self.probe_update == "gradient":
            return {"probe_adam_eps"}
        return set()


def parse_layer_band(text: str) -> list[int]:
    """An inclusive band of layer indices, ``'11-20'`` -> ``[11, 12, ..., 20]``."""
    first, sep, last = text.strip().partition("-")
    if not (sep and first.strip().isdigit() and last.strip().isdigit()) or int(first) > int(last):
        raise ValueError(f"'{text}' is neither a list of layer indices ([3, 9]) nor an inclusive band 'first-last' of "
                         "non-negative indices with first <= last ('11-20')")
    return list(range(int(first), int(last) + 1))


class LisaConfig(Section):
    """Lisa (Huang et al., NeurIPS 2024; docs/algorithm.md, "Lisa"): alternating phases of
    alignment-data steps (the safe responses of data.safety) and task-data steps, with a
    proximal term toward the other phase's last weights. Ignored unless method is 'lisa'.
    Defaults: the authors' script/finetune/lisa_poison_ratio.sh."""

    align_steps: int = Field(100, ge=0, description="Optimizer steps on alignment data per cycle (authors: 100).")
    finetune_steps: int = Field(900, ge=0, description="Optimizer steps on task data per cycle (authors: 900).")
    rho: float = Field(1.0, ge=0.0, description="Proximal strength: rho/2 ||w - w_other||^2 (authors' script: 1).")
    proximal_after: float = Field(0.1, ge=0.0, le=1.0, description="No proximal term for this fraction of the "
                                  "run's steps (authors' code: 0.1, hard-coded).")

    @model_validator(mode="after")
    def _some_steps(self) -> "LisaConfig":
        if self.align_steps == 0 and self.finetune_steps == 0:
            raise ValueError("lisa.align_steps and lisa.finetune_steps are both 0: give at least one a step count")
        return self


class SafetyMixConfig(Section):
    """Safety-data mixing (docs/algorithm.md, "Safety-data mixing"): refusal demonstrations,
    the harmful prompts of data.safety answered with their safe responses, added to the task
    data, which is then fine-tuned as plain SFT. SafeInstr (Bianchi et al., "Safety-Tuned
    LLaMAs", ICLR 2024) adds safety examples to the user's data rather than replacing any, so
    round(ratio x N) demonstrations join the N task examples the run trains on (after the
    length limit; harmful ones included), drawn without replacement (seed + 13). Default
    0.03: the paper's headline, "adding just 3% safety examples (a few hundred demonstrations)"
    improves safety substantially (more brings exaggerated refusals). Ignored unless method is
    'safety_mix'."""

    ratio: float = Field(0.03, gt=0.0, description="Demonstrations added per task example: round(ratio x N) of "
                         "data.safety's pairs for N task examples (SafeInstr's headline: 0.03); more than "
                         "data.safety holds is an error.")

    def unused_keys(self, method: str) -> set[str]:
        """The keys that cannot change a run of ``method``: all of them unless it is safety_mix."""
        return set(type(self).model_fields) if method != "safety_mix" else set()


class SafeLoraExportConfig(Section):
    """SafeLoRA at export (docs/algorithm.md, "SafeLoRA"); defaults are IBM/SafeLoRA's."""

    enabled: bool = False
    base_model: Optional[str] = Field(None, description="The unaligned base model (folder or 'embedded'/'tiny-random').")
    aligned_model: Optional[str] = Field(None, description="The aligned model made from it (usually model.path).")
    select: Literal["threshold", "number"] = Field("number", description="'number': the num_layers layers of lowest "
                                                   "cosine; 'threshold': every layer with cosine <= threshold.")
    threshold: float = 0.5
    num_layers: int = Field(10, ge=0)
    projection: Literal["published", "orthogonal"] = Field("published", description="'published': C = V V^T / ||V||_F "
                                                           "(the paper and code); 'orthogonal': the projector onto V's columns.")

    @model_validator(mode="after")
    def _paths_given(self) -> "SafeLoraExportConfig":
        missing = [key for key in ("base_model", "aligned_model") if self.enabled and not getattr(self, key)]
        if missing:
            raise ValueError(f"export.safelora.enabled needs {' and '.join(f'export.safelora.{k}' for k in missing)} "
                             "(a model folder, or 'embedded' / 'tiny-random')")
        return self
