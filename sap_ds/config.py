"""One typed run configuration: a YAML/JSON file plus dotted ``key=value`` overrides.

Why pydantic: every key is declared once, with its type, default and allowed values, so a
typo or a wrong type fails at start-up with a message naming the key, instead of hours
later on a cluster. The run config owns what the trainer decides (batch sizes, precision,
clipping); the DeepSpeed JSON owns the engine's internals (ZeRO stage, offload, buckets).
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED_MODEL = "embedded"

# How a relative path in a config file is read (docs/design.md, "Paths"): the rule, in one
# sentence, is "relative to the config file's folder in a file, to the working directory
# on the command line; output and model folders always to the working directory".
# Fields marked INPUT_PATH are files a config ships with (data); CONFIG_PATH fields name
# another config, which may also be a shipped config's name (sap_ds.resources). Unmarked
# paths (output_dir, model.path) are left as written: relative to the working directory.
INPUT_PATH = {"sap_ds_path": "input"}
CONFIG_PATH = {"sap_ds_path": "config"}


class ConfigError(ValueError):
    """A bad configuration: the message names the file, the key and what would be valid."""


class _Section(BaseModel):
    # coerce_numbers_to_str: overrides are parsed as YAML, so ``run_name=123`` arrives as an int.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(_Section):
    path: str = Field(EMBEDDED_MODEL, description="Local Hugging Face folder, or 'embedded' for SmolLM2-135M-Instruct.")
    from_config: bool = Field(False, description="Build random weights from path's config.json (benchmarks, tests).")
    dtype: Literal["bf16", "fp32"] = "bf16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


DataFormat = Literal["alpaca", "alpaca_seed", "gsm8k", "sst2", "advbench", "instruction", "refusal", "messages", "sharegpt",
                     "prompt_completion", "safety_pairs", "hh_rlhf", "preference", "circuit_breakers"]


class DataSource(_Section):
    """One data source: a local file (JSON, JSONL, CSV, TSV, TXT, Parquet, optionally
    gzipped), a folder written by ``datasets.save_to_disk``, or a hub name (``hf://org/name``,
    or a bare name with ``split``). ``format`` says how its columns become conversations
    (docs/data.md)."""

    path: str = Field(json_schema_extra=INPUT_PATH)
    format: DataFormat = "instruction"
    split: Optional[str] = Field(None, description="Split of a hub data set or of a saved DatasetDict folder.")
    subset: Optional[str] = Field(None, description="Configuration name of a hub data set.")
    revision: Optional[str] = Field(None, description="Hub revision (commit, tag or branch); pin it so the cache is exact.")
    limit: Optional[int] = Field(None, gt=0, description="Keep only the first N usable rows.")
    offset: int = Field(0, ge=0, description="Skip the first N usable rows (for disjoint splits of one file).")
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    messages_column: Optional[str] = Field(None, description="Conversation column of 'messages'/'sharegpt' "
                                           "(default: messages / conversations).")
    safe_column: Optional[str] = None
    harmful_column: Optional[str] = None
    refusal: Optional[str] = Field(None, description="Fixed response for format 'refusal' (default: built-in refusals).")


class DataConfig(_Section):
    train: list[DataSource] = Field(default_factory=list)
    eval: list[DataSource] = Field(default_factory=list)
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Held-out share of train when 'eval' is empty.")
    eval_max_examples: int = Field(64, gt=0, description="Eval loss on at most the first N eval examples (logged).")
    harmful: Optional[DataSource] = None
    harmful_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Share of harmful examples in the task data.")
    safety: list[DataSource] = Field(default_factory=list)
    max_length: int = Field(256, gt=8)
    safety_max_length: int = Field(256, gt=8)
    system_prompt: Optional[str] = Field(None, description="System turn for conversations that have none.")
    shuffle: bool = True
    loss_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="Which assistant turns of a conversation are learned.")
    overlength: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Longer than max_length: cut the end (dropped only if no learned token is left), "
                                "drop the example, or stop with an error. Counts are logged and in summary.json.")
    packing: bool = Field(False, description="Pack training examples into sequences of max_length (docs/data.md).")
    num_proc: Optional[int] = Field(None, gt=0, description="Processes for tokenizing (null: all cores for large sets).")
    cache_dir: Optional[str] = Field(None, description="Tokenized-data cache (default: <SAP_DS_CACHE>/data).")


class TrainConfig(_Section):
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping.")
    eval_every: int = Field(0, ge=0, description="Steps between eval losses; 0: only at the end.")
    log_every: int = Field(1, gt=0)
    save_every: int = Field(0, ge=0, description="Steps between checkpoints; 0: only at the end/on preemption.")
    save_total_limit: int = Field(2, gt=0)
    resume: Literal["auto", "never"] = "auto"
    max_bad_steps: int = Field(5, gt=0, description="Consecutive non-finite steps before the run stops.")
    check_ranks_every: int = Field(0, ge=0, description="Steps between cross-rank consistency checks; 0: off.")
    offload_adam: Literal["auto", "deepspeed", "torch"] = Field(
        "auto", description="With a ZeRO-Offload optimizer: 'deepspeed' CPU Adam, 'torch' AdamW, 'auto' CPU Adam where it "
        "can be built (sap_ds/ds_config.py: choose_offload_adam). Without offload the torch AdamW always runs.")


class DistributedConfig(_Section):
    """How long a rank waits for the others before the job is killed (slurm/README.md,
    "Collective timeouts"). How ranks talk, not what is trained: a change is never a
    change of the run (``config_changes`` skips this section)."""

    timeout_minutes: float = Field(30.0, gt=0, description="Every collective of the training process group "
                                   "(NCCL watchdog, gloo); DeepSpeed's own default is 10.")
    wait_timeout_minutes: float = Field(120.0, gt=0, description="The barriers where ranks wait for rank 0 "
                                        "alone: export (a 70B merge and save), checkpoint rename and pruning.")


class SapConfig(_Section):
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
        (``sap_ds.probe.check_layers``)."""
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


class LisaConfig(_Section):
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


class SafetyMixConfig(_Section):
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


class SafeLoraExportConfig(_Section):
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


class WandbConfig(_Section):
    """Weights & Biases logging, next to metrics.jsonl and TensorBoard (never instead)."""

    project: str = Field(description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B team or user (default: your default entity).")
    mode: Literal["online", "offline", "disabled"] = Field("online", description="offline: write the run to "
                                                           "<output_dir>/wandb without network, for `wandb sync` later.")
    name: Optional[str] = Field(None, description="Run name (default: run_name).")
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(_Section):
    """Where metrics go besides metrics.jsonl (always written, the record scripts read)."""

    tensorboard: bool = True
    wandb: Optional[WandbConfig] = None


class ExportConfig(_Section):
    enabled: bool = True
    merge_lora: bool = True
    keep_probe: bool = Field(False, description="SAP: write the probe into the exported model as mlp.down_proj.bias of "
                             "the probe layers (the authors' code leaves it there); false: the model without it.")
    safelora: SafeLoraExportConfig = Field(default_factory=SafeLoraExportConfig)


# The ``method:`` values: sap_ds/methods/ has one class for each (tests/test_methods.py checks
# that METHODS and this list agree); compare.py's ``methods`` takes the same names.
MethodName = Literal["sft", "sap", "lisa", "safety_mix"]


class RunConfig(_Section):
    run_name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 42
    method: MethodName = Field("sft", description="sap_ds/methods/: sft, sap, lisa or safety_mix.")
    deepspeed_config: str = Field("ds_configs/zero3_cpu.json", json_schema_extra=CONFIG_PATH,
                                  description="DeepSpeed JSON: a path, or a shipped one's name (zero3_bf16.json).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sap: SapConfig = Field(default_factory=SapConfig)
    lisa: LisaConfig = Field(default_factory=LisaConfig)
    safety_mix: SafetyMixConfig = Field(default_factory=SafetyMixConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("output_dir", "deepspeed_config")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty path")
        return value

    @field_validator("deepspeed_config")
    @classmethod
    def _shipped_ds_config(cls, value: str) -> str:
        """A value from the command line or the default: a path (working directory) or,
        failing that, a shipped DeepSpeed config's name. (Values from a config file arrive
        already resolved by ``read_config_file``.)"""
        return shipped_or_as_given(value)

    @model_validator(mode="after")
    def _sap_needs_safety_data(self) -> "RunConfig":
        needs_safety = self.sap.direction == "safety" and self.sap.probe_train and self.sap.probe_enabled
        if self.method == "sap" and needs_safety and not self.data.safety:
            raise ValueError("method 'sap' needs safety pairs: set data.safety to a list of sources")
        if self.method == "lisa" and self.lisa.align_steps > 0 and not self.data.safety:
            raise ValueError("method 'lisa' aligns on the safe responses of data.safety: set data.safety to a list of "
                             "sources (or lisa.align_steps: 0)")
        if self.method == "safety_mix" and not self.data.safety:
            raise ValueError("method 'safety_mix' adds refusal demonstrations (the prompts of data.safety with their "
                             "safe responses) to the task data: set data.safety to a list of sources")
        if not self.sap.probe_train and self.sap.probe_init == "zeros":
            raise ValueError("sap.probe_train false keeps the probe at its initial value, which is zero: "
                             "set sap.probe_init: random (the fixed-random-probe ablation)")
        if self.export.keep_probe and self.lora.enabled and not self.export.merge_lora:
            raise ValueError("export.keep_probe writes the probe into the merged model: it needs export.merge_lora true")
        if self.data.harmful_ratio > 0 and self.data.harmful is None:
            raise ValueError("data.harmful_ratio > 0 needs data.harmful (a harmful instruction file)")
        if self.sap.probe_micro_batches is not None and self.sap.probe_micro_batches > self.train.grad_accum:
            raise ValueError(f"sap.probe_micro_batches {self.sap.probe_micro_batches} is more than the step's "
                             f"train.grad_accum {self.train.grad_accum} micro-batches: set it to 1..{self.train.grad_accum} "
                             "(or null: all of them)")
        if len(set(self.sap.probe_layers)) != len(self.sap.probe_layers):
            raise ValueError(f"sap.probe_layers has duplicates: {self.sap.probe_layers}")
        return self

    @model_validator(mode="after")
    def _safelora_needs_lora(self) -> "RunConfig":
        if self.export.safelora.enabled and not self.lora.enabled:
            raise ValueError("export.safelora.enabled projects LoRA updates: it needs lora.enabled true")
        if self.export.safelora.enabled and not self.export.enabled:
            raise ValueError("export.safelora.enabled runs at export: it needs export.enabled true")
        return self


# --------------------------------------------------------------------------- loading


def _format_location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _submodel(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic class inside an annotation such as ``Optional[X]`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _section_model(root: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic class that owns the key at ``loc`` (to list its valid keys)."""
    model: Optional[type[BaseModel]] = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _submodel(field.annotation) if field else None
    return model


def explain(root: type[BaseModel], error: dict) -> str:
    """One line per pydantic error, naming the dotted key and what would be valid."""
    loc = error["loc"]
    key = _format_location(loc)
    if error["type"] == "extra_forbidden":
        owner = _section_model(root, loc)
        valid = sorted(owner.model_fields) if owner else []
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        msg = f"unknown key '{key}'"
        if hint:
            msg += f" (did you mean '{_format_location(loc[:-1] + (hint[0],))}'?)"
        if valid:
            msg += f"; valid keys here: {', '.join(valid)}"
        return msg
    text = error["msg"].removeprefix("Value error, ")
    if not loc:
        return text
    got = error.get("input")
    return f"key '{key}': {text}" + ("" if isinstance(got, dict) else f" (got {got!r})")


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    """Set ``a.b.0.c`` in a nested dict/list tree, creating missing sections."""
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: '{dotted}': '{part}' is not an index of a list of {len(node)} items")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            where = ".".join(parts[:depth])
            raise ConfigError(f"{source}: '{dotted}': '{where}' is a value, not a section")
        if depth == len(parts) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-4", "lora.enabled=false"]`` -> typed pairs (values parsed as YAML)."""
    pairs = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


BASE_KEY = "base"


def _read_mapping(path: Path) -> dict:
    """One YAML/JSON file's top-level mapping, with errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(tree).__name__}")
    return tree


def merge_trees(base: dict, child: dict) -> dict:
    """``child`` laid over ``base``: sections merge key by key, any other value (lists
    included) replaces the base's, as a dotted override would."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def shipped_or_as_given(value: str) -> str:
    """``value`` if it names an existing file, else the shipped config of that name
    (``sap_ds.resources.find_shipped``), else ``value`` unchanged (its error comes later)."""
    from sap_ds.resources import find_shipped

    if not value or Path(value).exists():
        return value
    shipped = find_shipped(value)
    return str(shipped) if shipped is not None else value


def _path_kind(field) -> Optional[str]:
    extra = field.json_schema_extra
    return extra.get("sap_ds_path") if isinstance(extra, dict) else None


def _resolve_one(value: Any, folder: Path, kind: str) -> Any:
    if not isinstance(value, str) or not value.strip() or Path(value).is_absolute():
        return value
    local = Path(os.path.normpath(folder / value))
    if kind == "config" and not local.exists():
        from sap_ds.resources import find_shipped

        shipped = find_shipped(value)
        if shipped is not None:
            return str(shipped)
    return str(local)


def resolve_paths(tree: dict, schema: type[BaseModel], folder: Path) -> dict:
    """``tree`` (one config file's keys) with the relative paths of the fields ``schema``
    marks INPUT_PATH / CONFIG_PATH made absolute against ``folder``, the file's folder."""
    out = dict(tree)
    for key, value in tree.items():
        field = schema.model_fields.get(key)
        if field is None:
            continue
        kind = _path_kind(field)
        if kind is not None:
            out[key] = [_resolve_one(v, folder, kind) for v in value] if isinstance(value, list) else \
                _resolve_one(value, folder, kind)
            continue
        sub = _submodel(field.annotation)
        if sub is None:
            continue
        if isinstance(value, dict):
            out[key] = resolve_paths(value, sub, folder)
        elif isinstance(value, list):
            out[key] = [resolve_paths(v, sub, folder) if isinstance(v, dict) else v for v in value]
    return out


def find_config_file(path: str | Path) -> Path:
    """``path`` if it is a file, else the shipped config of that name (``demo``,
    ``configs/demo.yaml``, ``70b/llama2_70b_chat_lora``); ConfigError listing them if neither."""
    from sap_ds.resources import find_shipped, shipped_names

    path = Path(path)
    if path.is_file():
        return path
    shipped = find_shipped(str(path))
    if shipped is not None:
        return shipped
    raise ConfigError(f"config file not found: {path} (neither a file nor the name of a shipped config; "
                      f"shipped: {', '.join(shipped_names())}; `sap-ds configs` lists them)")


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = (), schema: Optional[type[BaseModel]] = None) -> dict:
    """A config file's keys, with ``base: other.yaml`` resolved.

    ``base`` names another config file, relative to this file's folder (or a shipped
    config's name, e.g. ``base: demo``); this file's keys are laid over it
    (``merge_trees``), so a preset states only what it changes and cannot drift from the
    run it derives from. Bases may chain; a loop is an error. With ``schema``, the
    relative paths of its marked fields are made absolute against each file's own folder
    (``resolve_paths``) before the files are merged."""
    path = find_config_file(path) if not _chain else Path(path)
    tree = _read_mapping(path)
    has_base = BASE_KEY in tree
    base = tree.pop(BASE_KEY, None)
    if schema is not None:
        tree = resolve_paths(tree, schema, path.resolve().parent)
    if not has_base:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: key '{BASE_KEY}': expected the path of the config file this one "
                          f"builds on, relative to {path.parent} (e.g. base: demo.yaml), got {base!r}")
    base_path = Path(_resolve_one(base, path.resolve().parent, "config"))
    if not base_path.is_file():
        raise ConfigError(f"{path}: key '{BASE_KEY}': file not found: {base_path} "
                          f"(the path is relative to the folder of {path.name}, or a shipped config's name)")
    chain = _chain + (path.resolve(),)
    if base_path.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ConfigError(f"{path}: key '{BASE_KEY}': the bases form a loop: {loop}")
    return merge_trees(read_config_file(base_path, chain, schema), tree)


def validate_tree(root: type[BaseModel], tree: dict, overrides: list[str] = (), source: str = "<config>"):
    """``root`` validated from ``tree`` with dotted overrides applied; ConfigError on failure."""
    tree = json.loads(json.dumps(tree))  # deep copy, plain types
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value, "command line")
    try:
        return root.model_validate(tree)
    except ValidationError as exc:
        problems = "\n  ".join(explain(root, err) for err in exc.errors())
        raise ConfigError(f"{source}: invalid configuration:\n  {problems}") from None


def build_config(tree: dict, overrides: list[str] = (), source: str = "<config>") -> RunConfig:
    return validate_tree(RunConfig, tree, overrides, source)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The run config of a file (or a shipped config's name) plus command-line overrides."""
    return build_config(read_config_file(path, schema=RunConfig), overrides, source=str(find_config_file(path)))


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted keys of the override syntax."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, cfg: RunConfig) -> list[str]:
    """How ``cfg`` differs from ``saved`` (a run's config.json), one ``key: trained with X,
    now Y`` each, in the dotted keys a user would override.

    The output folder is not compared (a moved run is the same run), nor the timeouts of the
    ``distributed`` section, nor the keys this run cannot read (``SapConfig.unused_keys``: the
    ``sap`` section of an SFT run; the ``lisa`` and ``safety_mix`` sections of other methods),
    so that only a change that alters what is trained is reported."""
    old, new = flatten(saved), flatten(config_to_dict(cfg))
    # sap.resolution_check only decides whether a run may start: it never changes what is trained.
    ignore = NOT_TRAINING_KEYS | {"sap.resolution_check"} | {f"sap.{key}" for key in cfg.sap.unused_keys(cfg.method)}
    ignore |= {f"distributed.{key}" for key in DistributedConfig.model_fields}
    if cfg.method != "lisa":  # also: a run from before the lisa section existed has none
        ignore |= {f"lisa.{key}" for key in LisaConfig.model_fields}
    ignore |= {f"safety_mix.{key}" for key in cfg.safety_mix.unused_keys(cfg.method)}  # likewise
    for key, before in ADDED_LATER.items():  # a run recorded before the key existed was trained with this
        old.setdefault(key, before)
    return [f"{key}: trained with {old.get(key)!r}, now {new.get(key)!r}"
            for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and key not in ignore and not key.startswith("logging.")]


# Keys added after runs were recorded without them, and the value that is what those runs did.
ADDED_LATER = {"sap.probe_update": "adam", "sap.probe_timing": "next_step"}

# Keys that cannot change what a run trains (where it is written, how it is logged, saved
# and resumed): a change of one of them does not make a run another run.
NOT_TRAINING_KEYS = {"output_dir", "train.resume", "train.log_every", "train.save_every", "train.save_total_limit",
                     "train.check_ranks_every"}


def missing_inputs(cfg: RunConfig) -> list[str]:
    """One line per data file of ``cfg`` that does not exist, naming its key and the
    override that replaces it (``data.train.0.path=...``): the configs for models and data
    a user brings (configs/70b, the paper's) hold placeholders such as /path/to/..."""
    sources = [(f"data.{part}.{i}", s) for part in ("train", "eval", "safety") for i, s in enumerate(getattr(cfg.data, part))]
    if cfg.data.harmful is not None:
        sources.append(("data.harmful", cfg.data.harmful))
    return [f"{key}.path: file not found: {source.path}{' (a placeholder)' if _is_placeholder(source.path) else ''}; "
            f"pass {key}.path=/your/{Path(source.path).name} on the command line"
            for key, source in sources if not Path(source.path).is_file()]


def _is_placeholder(path: str) -> bool:
    return "/path/to/" in path.replace("\\", "/")
