"""The training methods' config sections and their registry, ``METHOD_SECTIONS``; and
SafeLoRA's section at export.

Each method has a section (``MethodSection``): its knobs, their defaults and which source
each default comes from (docs/algorithm.md), and what the rest of sap-ds asks of the method
before torch is imported, so that none of it branches on the method's name: which data the
run needs, which keys cannot change it, what resume must keep, which engine settings it
refuses, how costly a step is (compare's launch order, the planner's column) and the bench's
variants. What needs the model or the engine is the method object's
(``sap_ds.methods.base.Method``). Part of the run config (``sap_ds.config.run.RunConfig``,
one key per section with knobs), kept apart so that the shared sections stay short.

Adding a method: its module in ``sap_ds/methods/`` (a ``Method``), its section here, and its
entry in ``METHOD_SECTIONS``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Optional

from pydantic import Field, field_validator, model_validator

from sap_ds.config.reading import Section
from sap_ds.errors import ConfigError


class RankBatch(NamedTuple):
    """A batch a method draws beside the task batch, ``size_key`` examples per rank and
    indexed by step as the task batch is: its global size is kept in checkpoint metadata
    (``meta_key``), and a resume on another number of ranks must keep it, or the run would
    skip or repeat examples (``sap_ds.training.resume.check_batch_on_new_world``)."""

    size_key: str  # the section's key of its per-rank size
    meta_key: str  # the checkpoint metadata entry of its global size
    what: str  # how an error names it ("safety batch")
    unit: str  # what it counts ("pairs")


class MethodSection(Section):
    """A training method's section of the run config, and its answers to the questions the
    config validator, resume, the DeepSpeed config, compare, bench and plan ask of a method
    (each hook says who asks and why). The defaults are SFT's: a step that is the trainer's
    main pass and nothing else."""

    name: ClassVar[str]  # the config's ``method:`` value, and this section's key in the run config
    implementation: ClassVar[str]  # "module:Class" of its Method, imported when a run starts (sap_ds.methods)
    # Keys that set how one of the method's optimizers steps: a change on resume is applied from the
    # next step and logged with the train.* ones (sap_ds/training/resume_optimizer.py: OPTIMIZER_KEYS).
    optimizer_keys: ClassVar[tuple[str, ...]] = ()
    rank_batches: ClassVar[tuple[RankBatch, ...]] = ()  # batches besides the task batch that resume must keep
    # sap-ds plan's estimate for the method: which of its columns (sap_ds/cost/plan.py COLUMNS: "sft",
    # "sap", "lisa", "booster", "vaccine", "repnoise") models the step and the memory, and a line for
    # its assumptions where that column is not the method's own.
    plan_column: ClassVar[str] = "sft"
    plan_note: ClassVar[str] = ""

    def check_run(self, run) -> None:
        """The method's demands on the rest of the run config ``run`` (data it needs, keys of
        other sections it depends on): ValueError naming the keys. Run by the config
        validator for the run's own method only, so a mistake fails before anything loads."""

    def unused_keys(self) -> set[str]:
        """This section's keys that cannot change what a run of this method trains with these
        settings: a change of one is no change of the run (``config_changes``, the resume log).
        (Every key of another method's section is unused too: the run config says so.)"""
        return set()

    def check_engine(self, zero: dict, offloaded: list[str], path: Path) -> None:
        """Refuse the DeepSpeed ``zero_optimization`` settings this run cannot honour
        (ConfigError naming ``path``), before any rank starts (``load_ds_config``).
        ``offloaded``: the ``offload_*`` sections whose device is not none."""

    @property
    def relative_step_cost(self) -> float:
        """About what one optimizer step costs against an SFT step on the same batch:
        ``sap-ds compare`` starts the costliest runs first, so that runs side by side end
        together (a heuristic, never a measurement)."""
        return 1.0

    @classmethod
    def bench_variants(cls) -> dict[str, list[str]]:
        """The variants ``sap-ds bench`` times for this method when the config names none:
        name -> overrides of the base config (default: one, the method as configured)."""
        return {cls.name: [f"method={cls.name}"]}


class SftConfig(MethodSection):
    """Plain supervised fine-tuning: no knobs, so no section in a run config."""

    name: ClassVar[str] = "sft"
    implementation: ClassVar[str] = "sap_ds.methods.sft:SftMethod"


# ZeRO settings under which SAP's perturbation cannot reach the probe pass (refused only when the run
# perturbs: a trained, enabled probe; SFT accepts them all): key -> (refused value?, why).
SAP_REFUSED = {
    "zero_hpz_partition_size": (
        lambda v: v not in (None, 0, 1),
        "ZeRO++ hpZ keeps a secondary copy of every weight that the forward gathers from and only DeepSpeed's own "
        "optimizer step refreshes, so the probe pass would run at W instead of the perturbed W'; set it to 1"),
    "zero_quantized_weights": (
        lambda v: bool(v),
        "ZeRO++ qwZ gathers the weights quantized to int8 blocks, whose error (~1e-2 relative) swamps a perturbation "
        "of rho ~ 1e-5 to 1e-2 relative; set it to false (zero_quantized_nontrainable_weights, which quantizes only "
        "frozen weights, is accepted)"),
    "mics_shard_size": (
        lambda v: v not in (None, -1, 0),
        "MiCS shards each weight within a sub-group and replicates it across sub-groups, so SAP's sums over the "
        "world (norms, the realised perturbation) would count every shard several times, and this path is untested; "
        "remove it (or set it to -1)"),
}

# The bench's SAP variants: the authors' settings (docs/algorithm.md) and the fast preset
# (configs/sap_fast.yaml, justified in docs/benchmarks.md; tests/test_bench.py checks they agree).
SAP_PAPER_OVERRIDES = ["method=sap", "sap.safety_every=1", "sap.probe_fraction=1.0"]
SAP_FAST_OVERRIDES = ["method=sap", "sap.safety_every=16", "sap.probe_fraction=0.125", "data.safety_max_length=64"]


class SapConfig(MethodSection):
    """Safety-Aware Probing (docs/algorithm.md). Ignored unless method is 'sap'."""

    name: ClassVar[str] = "sap"
    implementation: ClassVar[str] = "sap_ds.methods.sap:SapMethod"
    optimizer_keys: ClassVar[tuple[str, ...]] = ("probe_lr", "probe_adam_eps", "probe_lr_schedule")  # the probe's AdamW
    rank_batches: ClassVar[tuple[RankBatch, ...]] = (
        RankBatch("safety_batch_size", "safety_global_batch", "safety batch", "pairs"),)
    plan_column: ClassVar[str] = "sap"

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
        "error", description="Before step 1: can the working dtype (bf16) hold the perturbation rho gives, and resolve "
        "the probe gradient it gives? 'error' stops the run naming a rho that passes, 'warn' only says so "
        "(docs/algorithm.md, precision).")
    # Variants and ablations (docs/algorithm.md, "Variants"): the authors' method is the default
    # (but for probe_in_safety, below).
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
    # The authors' code (ChengcanWu/SAP, SAPcode/train.py:47-48) takes the safety gradient with the
    # model as it stands: the probe is a real down_proj bias, live in that forward, only its own
    # gradient stopped. sap-ds's default is the paper's L_safe(W), without the probe
    # (docs/algorithm.md, "Differences from the authors' code").
    probe_in_safety: bool = Field(False, description="true: the safety forward runs with the current probe added "
                                  "(no gradient to it), as the authors' code does; false: with the probe off, the "
                                  "paper's L_safe(W). Only next_step (or probe_reset false) has a non-zero probe there.")

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
        if not self.probe_train and self.probe_init == "zeros":
            raise ValueError("sap.probe_train false keeps the probe at its initial value, which is zero: "
                             "set sap.probe_init: random (the fixed-random-probe ablation)")
        if len(set(self.probe_layers)) != len(self.probe_layers):
            raise ValueError(f"sap.probe_layers has duplicates: {self.probe_layers}")
        return self

    @property
    def perturbs(self) -> bool:
        """Whether a step perturbs the weights (a trained, enabled probe): what the safety
        pass, the engine settings and the cost depend on."""
        return self.probe_enabled and self.probe_train

    def check_run(self, run) -> None:
        """The safety direction needs data.safety; the probe passes run on at most the step's
        micro-batches."""
        if self.direction == "safety" and self.perturbs and not run.data.safety:
            raise ValueError("method 'sap' needs safety pairs: set data.safety to a list of sources")
        if self.probe_micro_batches is not None and self.probe_micro_batches > run.train.grad_accum:
            accum = run.train.grad_accum
            raise ValueError(f"sap.probe_micro_batches {self.probe_micro_batches} is more than the step's "
                             f"train.grad_accum {accum} micro-batches: set it to 1..{accum} (or null: all of them)")

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

    def unused_keys(self) -> set[str]:
        """``resolution_check`` (it only decides whether a run may start); for a fixed probe
        (``probe_train: false``) the keys of the passes it skips; the probe's Adam eps under
        ``probe_update: gradient``; ``probe_in_safety`` where the safety forward never sees a
        non-zero probe (no safety pass, or ``same_step`` zeroes V just before it)."""
        if not self.probe_train:
            return {"rho", "probe_lr", "probe_adam_eps", "probe_reset", "probe_lr_schedule", "safety_loss", "temperature",
                    "safety_batch_size", "safety_every", "perturb_norm", "probe_fraction", "direction", "kernels",
                    "resolution_check", "probe_update", "probe_timing", "probe_micro_batches", "probe_in_safety"}
        unused = {"resolution_check"}
        if self.probe_update == "gradient":
            unused.add("probe_adam_eps")
        if not self.probe_enabled or self.direction == "random" or (self.probe_timing == "same_step" and self.probe_reset):
            unused.add("probe_in_safety")  # no safety forward, or no probe in it, or one zeroed just before it
        return unused

    def check_engine(self, zero: dict, offloaded: list[str], path: Path) -> None:
        """``SAP_REFUSED`` when the run perturbs; offload with ``kernels: triton``."""
        if not self.perturbs:
            return
        for key, (refused, why) in SAP_REFUSED.items():
            if key in zero and refused(zero[key]):
                raise ConfigError(f"{path}: 'zero_optimization.{key}' is {zero[key]!r}, which method sap cannot "
                                  f"honour: {why} (SFT runs accept it)")
        if offloaded and self.kernels == "triton":
            where = " and ".join(f"'zero_optimization.{k}.device' is {zero[k]['device']}" for k in offloaded)
            raise ConfigError(f"sap.kernels is 'triton' but in {path} {where}: the fp32 master or the working shards "
                              f"then live in CPU memory, where the Triton kernels cannot run; set sap.kernels to 'auto' "
                              f"or 'torch' (the PyTorch twins run there)")

    @property
    def relative_step_cost(self) -> float:
        """The main pass, plus on the steps that probe (``probe_fraction``) the probe passes
        and, every ``safety_every`` steps, the safety pass: each counted as about one pass."""
        if not self.perturbs:
            return 1.0
        return 1.0 + self.probe_fraction * (self.probe_passes + 1 / self.safety_every)

    @classmethod
    def bench_variants(cls) -> dict[str, list[str]]:
        """The authors' settings ("paper") and the fast preset ("fast")."""
        return {"paper": list(SAP_PAPER_OVERRIDES), "fast": list(SAP_FAST_OVERRIDES)}


def parse_layer_band(text: str) -> list[int]:
    """An inclusive band of layer indices, ``'11-20'`` -> ``[11, 12, ..., 20]``."""
    first, sep, last = text.strip().partition("-")
    if not (sep and first.strip().isdigit() and last.strip().isdigit()) or int(first) > int(last):
        raise ValueError(f"'{text}' is neither a list of layer indices ([3, 9]) nor an inclusive band 'first-last' of "
                         "non-negative indices with first <= last ('11-20')")
    return list(range(int(first), int(last) + 1))


class LisaConfig(MethodSection):
    """Lisa (Huang et al., NeurIPS 2024; docs/algorithm.md, "Lisa"): alternating phases of
    alignment-data steps (the safe responses of data.safety) and task-data steps, with a
    proximal term toward the other phase's last weights. Ignored unless method is 'lisa'.
    Defaults: the authors' script/finetune/lisa_poison_ratio.sh."""

    name: ClassVar[str] = "lisa"
    implementation: ClassVar[str] = "sap_ds.methods.lisa:LisaMethod"
    plan_column: ClassVar[str] = "lisa"

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

    def check_run(self, run) -> None:
        """Alignment steps train on the safe responses of data.safety."""
        if self.align_steps > 0 and not run.data.safety:
            raise ValueError("method 'lisa' aligns on the safe responses of data.safety: set data.safety to a list of "
                             "sources (or lisa.align_steps: 0)")

    @classmethod
    def bench_variants(cls) -> dict[str, list[str]]:
        """The authors' 1:9 share of alignment steps is 100 of every 1,000; a bench times ~16
        steps, so a 16-step cycle with 2 alignment steps (12.5 %) puts both kinds in the timed
        window."""
        return {"lisa": ["method=lisa", "lisa.align_steps=2", "lisa.finetune_steps=14"]}


class SafetyMixConfig(MethodSection):
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

    name: ClassVar[str] = "safety_mix"
    implementation: ClassVar[str] = "sap_ds.methods.safety_mix:SafetyMixMethod"
    plan_note: ClassVar[str] = ("safety_mix: SFT's step (the SFT column); its refusal demonstrations are task "
                                "examples, so an epoch holds (1 + safety_mix.ratio) x the task examples and takes "
                                "that many more steps")

    def check_run(self, run) -> None:
        """The demonstrations come from data.safety."""
        if not run.data.safety:
            raise ValueError("method 'safety_mix' adds refusal demonstrations (the prompts of data.safety with their "
                             "safe responses) to the task data: set data.safety to a list of sources")


class BoosterConfig(MethodSection):
    """Booster (Huang, Hu, Ilhan, Tekin, Liu, "Booster: Tackling Harmful Fine-tuning for Large
    Language Models via Attenuating Harmful Perturbation", ICLR 2025; docs/alignment_defences.md):
    an alignment-stage defence. Each step trains on the run's data (the alignment data:
    refusals, as configs/booster_align.yaml) with the gradient
    g_align + lamb * (g_h(W) - g_h(W - alpha * g_h / ||g_h||)), g_h the gradient of the loss
    on a harmful batch: the harmful responses of data.safety's pairs (the authors draw their
    harmful set from the same refusal-paired file as the alignment set). Defaults: the
    authors' script/alignment/smooth_align.sh and trainer.py. Ignored unless method is
    'booster'."""

    name: ClassVar[str] = "booster"
    implementation: ClassVar[str] = "sap_ds.methods.booster:BoosterMethod"
    rank_batches: ClassVar[tuple[RankBatch, ...]] = (
        RankBatch("harmful_batch_size", "harmful_global_batch", "harmful batch", "examples"),)
    plan_column: ClassVar[str] = "booster"  # two harmful passes, the fp32 gradient buffer (sap_ds/cost/plan.py)

    lamb: float = Field(5.0, ge=0.0, description="lambda, the weight of the attenuation term (authors' --lamb, "
                        "smooth_align.sh: 5).")
    alpha: float = Field(0.1, ge=0.0, description="Norm of the simulated harmful step W - alpha * g_h / ||g_h|| "
                         "(authors' --alpha: 0.1), absolute, over all trainable parameters.")
    harmful_batch_size: int = Field(10, gt=0, description="Harmful examples per rank per step (authors: 10, "
                                    "hard-coded in trainer.py:149), from the harmful responses of data.safety.")
    kernels: Literal["auto", "triton", "torch"] = Field("auto", description="The perturb/restore kernels (SAP's).")
    resolution_check: Literal["error", "warn", "off"] = Field(
        "error", description="Before step 1: can the working dtype (bf16) hold the step alpha gives? 'error' stops "
        "the run naming an alpha that passes, 'warn' only says so (docs/alignment_defences.md).")

    def check_run(self, run) -> None:
        """The harmful batches are the harmful responses of data.safety."""
        if self.lamb > 0 and not run.data.safety:
            raise ValueError("method 'booster' needs a harmful set: set data.safety to a list of sources (pairs of a "
                             "harmful prompt with a safe and a harmful response; Booster's harmful batches are the "
                             "harmful responses), or booster.lamb=0 (plain SFT)")

    def unused_keys(self) -> set[str]:
        """``resolution_check`` (it only decides whether a run may start); with lamb 0 every key."""
        if self.lamb == 0:
            return {"alpha", "harmful_batch_size", "kernels", "resolution_check"}
        return {"resolution_check"}

    def check_engine(self, zero: dict, offloaded: list[str], path: Path) -> None:
        """SAP's refusals: the second harmful pass must run at the perturbed shards."""
        if self.lamb == 0:
            return
        for key, (refused, why) in SAP_REFUSED.items():
            if key in zero and refused(zero[key]):
                raise ConfigError(f"{path}: 'zero_optimization.{key}' is {zero[key]!r}, which method booster cannot "
                                  f"honour: {why.replace('probe pass', 'second harmful pass')} (SFT runs accept it)")
        if offloaded and self.kernels == "triton":
            raise ConfigError(f"booster.kernels is 'triton' but {path} offloads ({', '.join(offloaded)}): the shards "
                              f"then live in CPU memory, where the Triton kernels cannot run; set booster.kernels to "
                              f"'auto' or 'torch'")

    @property
    def relative_step_cost(self) -> float:
        """The main pass and two passes on a harmful batch of about a task batch's size."""
        return 1.0 if self.lamb == 0 else 3.0


class RepNoiseConfig(MethodSection):
    """RepNoise (Rosati et al., "Representation Noising: A Defence Mechanism Against Harmful
    Finetuning", NeurIPS 2024; docs/alignment_defences.md): an alignment-stage defence that
    trains on data.safety's pairs (a harmful prompt with a refusal and a harmful answer) with
    the authors' ``rep_noise_loss`` (representation_noising/loss.py:74-130):
    CE(refusals) + beta * MMD(harmful MLP outputs, Gaussian noise) - alpha * log(mean harmful
    CE over the output and every layer's hidden state through the final norm and LM head + 1).
    Each step's micro-batches are train.micro_batch_size pairs (train.grad_accum of them per
    rank); data.train is not trained on (the authors have no other data). Defaults: the
    authors' loss.py:76 and demo notebook. Ignored unless method is 'repnoise'."""

    name: ClassVar[str] = "repnoise"
    implementation: ClassVar[str] = "sap_ds.methods.repnoise:RepNoiseMethod"
    plan_column: ClassVar[str] = "repnoise"  # the pair pass, the MMD and the logit lens (sap_ds/cost/plan.py)

    alpha: float = Field(1.0, ge=0.0, description="Weight of -log(harmful loss + 1), the ascent term (authors' "
                         "loss.py:76 and demo notebook: 1).")
    beta: float = Field(0.001, ge=0.0, description="Weight of the MMD between the harmful MLP outputs and Gaussian "
                        "noise (authors' loss.py:76, notebook and released model 'repnoise_0.001_beta': 0.001).")
    kernel_mul: float = Field(2.0, gt=0.0, description="Ratio between the MMD's Gaussian bandwidths (authors' "
                              "MMD_loss: 2.0).")
    kernel_num: int = Field(5, gt=0, description="Number of Gaussian kernels in the MMD (authors' MMD_loss: 5).")

    def check_run(self, run) -> None:
        """The pairs come from data.safety, and train.epochs would count data.train's examples."""
        if not run.data.safety:
            raise ValueError("method 'repnoise' trains on pairs of a refusal and a harmful answer to the same prompt: "
                             "set data.safety to a list of sources with format safety_pairs (a prompt with a safe and "
                             "a harmful response)")
        if run.train.max_steps is None:
            raise ValueError("method 'repnoise' trains on the pairs of data.safety, not on data.train, so train.epochs "
                             "(which counts data.train's examples) does not say how long it runs: set train.max_steps")

    def unused_keys(self) -> set[str]:
        """The MMD's kernels when beta is 0 (no MMD is computed)."""
        return {"kernel_mul", "kernel_num"} if self.beta == 0 else set()

    @property
    def relative_step_cost(self) -> float:
        """A forward and backward over twice the micro-batch, plus the logit lens (L+1 LM-head
        projections of the harmful half, with their backward)."""
        return 3.0


# The normal range (smallest normal, largest finite) of each working dtype, from the formats'
# definitions (8 exponent bits for both; 7 and 23 mantissa bits): vaccine.rho must lie in it.
NORMAL_RANGE = {"bf16": (2.0**-126, (2 - 2.0**-7) * 2.0**127), "fp32": (2.0**-126, (2 - 2.0**-23) * 2.0**127)}


class VaccineConfig(MethodSection):
    """Vaccine (Huang, Hu, Liu, "Vaccine: Perturbation-aware Alignment for Large Language
    Models against Harmful Fine-tuning Attack", NeurIPS 2024; docs/alignment_defences.md): an
    alignment-stage defence. Each micro-batch of the run's data (the alignment data, as
    configs/vaccine_align.yaml) is trained with the output a_l of every decoder block's
    attention perturbed by rho * g_l / ||g||, g_l = d loss / d a_l from a first pass and ||g||
    over all layers. Defaults: the authors' script/alignment/Vaccine.sh and trainer.py.
    Ignored unless method is 'vaccine'."""

    name: ClassVar[str] = "vaccine"
    implementation: ClassVar[str] = "sap_ds.methods.vaccine:VaccineMethod"
    plan_column: ClassVar[str] = "vaccine"  # the stored perturbations and the first pass (sap_ds/cost/plan.py)

    rho: float = Field(2.0, gt=0.0, allow_inf_nan=False, description="Radius of the activation perturbation, "
                       "absolute, over all perturbed layers of a micro-batch (authors' --rho: 2, Vaccine.sh).")
    modules: Literal["attention", "decoder_layer"] = Field(
        "attention", description="Whose outputs are perturbed: each decoder block's attention module (the "
        "authors' code, trainer.py:36-50) or the whole block (the paper's 'hidden embedding' of each layer).")
    resolution_check: Literal["error", "warn", "off"] = Field(
        "error", description="Before step 1: can the working dtype (bf16) hold a + eps on step 1's first "
        "micro-batch? 'error' stops the run naming a rho that passes, 'warn' only says so "
        "(docs/alignment_defences.md).")

    def check_run(self, run) -> None:
        """rho a normal number of the working dtype: a rho that rounds to 0, to a subnormal
        or to infinity there cannot scale a perturbation (``NORMAL_RANGE``)."""
        low, high = NORMAL_RANGE[run.model.dtype]
        if not low <= self.rho <= high:
            raise ValueError(f"vaccine.rho {self.rho:g} cannot be represented in the working dtype "
                             f"(model.dtype {run.model.dtype}, normal numbers {low:.4g} to {high:.4g}): set vaccine.rho "
                             "within that range (authors: 2)")

    def unused_keys(self) -> set[str]:
        """``resolution_check`` only decides whether a run may start."""
        return {"resolution_check"}

    @property
    def relative_step_cost(self) -> float:
        """The main pass and a forward with an activation-only backward on the same batch."""
        return 2.0


# The training methods, by the config's ``method:`` value; the order is the one the docs, the
# error messages and the bench's default variants list them in. A new method adds its section's
# class here (tests/test_methods.py checks that every entry's name and Method agree).
METHOD_SECTIONS: dict[str, type[MethodSection]] = {
    section.name: section for section in (SftConfig, SapConfig, LisaConfig, SafetyMixConfig, BoosterConfig, RepNoiseConfig,
                                          VaccineConfig)}


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
