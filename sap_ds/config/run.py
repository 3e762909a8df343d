"""One typed run configuration: a YAML/JSON file plus dotted ``key=value`` overrides.

Why pydantic: every key is declared once, with its type, default and allowed values, so a
typo or a wrong type fails at start-up with a message naming the key, instead of hours
later on a cluster. The run config owns what the trainer decides (batch sizes, precision,
clipping); the DeepSpeed JSON owns the engine's internals (ZeRO stage, offload, buckets).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, create_model, field_validator, model_validator

from sap_ds.config.methods import METHOD_SECTIONS, MethodSection, SafeLoraExportConfig

# Reading files (sap_ds.config.reading) and the method sections (sap_ds.config.methods) live in
# modules of their own; callers import each name from the module that defines it.
from sap_ds.config.reading import (
    CONFIG_PATH,
    INPUT_PATH,
    Section,
    find_config_file,
    read_config_file,
    shipped_or_as_given,
    validate_tree,
)

EMBEDDED_MODEL = "embedded"


class ModelConfig(Section):
    path: str = Field(EMBEDDED_MODEL, description="Local Hugging Face folder, or 'embedded' for SmolLM2-135M-Instruct.")
    from_config: bool = Field(False, description="Build random weights from path's config.json (benchmarks, tests).")
    dtype: Literal["bf16", "fp32"] = "bf16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _flash_attention_needs_half_precision(self) -> "ModelConfig":
        """flash-attention's kernels take fp16/bf16 only: fp32 with them would load, shard and
        then fail at the first forward; refused here, whether or not flash-attn is installed."""
        if self.dtype == "fp32" and self.attn_implementation == "flash_attention_2":
            raise ValueError("model.dtype fp32 with model.attn_implementation flash_attention_2: flash-attention "
                             "computes in fp16/bf16 only; set model.dtype=bf16, or model.attn_implementation to sdpa "
                             "or eager for fp32")
        return self


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


DataFormat = Literal["alpaca", "alpaca_seed", "gsm8k", "sst2", "advbench", "instruction", "refusal", "messages", "sharegpt",
                     "prompt_completion", "safety_pairs", "hh_rlhf", "preference", "circuit_breakers"]


class DataSource(Section):
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


class DataConfig(Section):
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
        "truncate", description="Longer than max_length: cut at turn boundaries (later turns dropped whole, only the "
                                "last kept answer cut; dropped only if no learned token is left), drop the example, or "
                                "stop with an error. Counts are logged and in summary.json.")
    packing: bool = Field(False, description="Pack training examples into sequences of max_length (docs/data.md).")
    num_proc: Optional[int] = Field(None, gt=0, description="Processes for tokenizing (null: all cores for large sets).")
    cache_dir: Optional[str] = Field(None, description="Tokenized-data cache (default: <SAP_DS_CACHE>/data).")


class TrainConfig(Section):
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
        "can be built (sap_ds/parallel/ds_config.py: choose_offload_adam). Without offload the torch AdamW always runs.")


class DistributedConfig(Section):
    """How long a rank waits for the others before the job is killed (slurm/README.md,
    "Collective timeouts"). How ranks talk, not what is trained: a change is never a
    change of the run (``config_changes`` skips this section)."""

    timeout_minutes: float = Field(30.0, gt=0, description="Every collective of the training process group "
                                   "(NCCL watchdog, gloo); DeepSpeed's own default is 10.")
    wait_timeout_minutes: float = Field(120.0, gt=0, description="The barriers where ranks wait for rank 0 "
                                        "alone: export (a 70B merge and save), checkpoint rename and pruning.")


class WandbConfig(Section):
    """Weights & Biases logging, next to metrics.jsonl and TensorBoard (never instead)."""

    project: str = Field(description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B team or user (default: your default entity).")
    mode: Literal["online", "offline", "disabled"] = Field("online", description="offline: write the run to "
                                                           "<output_dir>/wandb without network, for `wandb sync` later.")
    name: Optional[str] = Field(None, description="Run name (default: run_name).")
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(Section):
    """Where metrics go besides metrics.jsonl (always written, the record scripts read)."""

    tensorboard: bool = True
    wandb: Optional[WandbConfig] = None


class ExportConfig(Section):
    enabled: bool = True
    merge_lora: bool = True
    keep_probe: bool = Field(False, description="SAP: write the probe into the exported model as mlp.down_proj.bias of "
                             "the probe layers (the authors' code leaves it there); false: the model without it.")
    safelora: SafeLoraExportConfig = Field(default_factory=SafeLoraExportConfig)


# The ``method:`` values: the registry's (sap_ds.config.methods.METHOD_SECTIONS), each with its
# Method in sap_ds/methods/; compare.py's ``methods`` takes the same names.
MethodName = Literal[tuple(METHOD_SECTIONS)]


def _synonyms(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """``{target: names}`` -> ``{name: target}``."""
    return {name: target for target, names in table.items() for name in names}


# The names other fine-tuning toolkits (Hugging Face Trainer, TRL, axolotl, DeepSpeed's JSON,
# Lightning, the SAP authors' code) give to keys that sap-ds names differently: an unknown key
# of this list, at any level of a file or on the command line, gets "did you mean" the sap-ds
# key (sap_ds.config.reading.key_hints). After ": " a note where the value is not given the same
# way. tests/test_config.py checks that every target is a key of RunConfig.
KEY_SYNONYMS = _synonyms({
    "train.lr": ("learning_rate", "lr_rate", "max_lr"),
    "train.lr_schedule: cosine, constant or linear": ("lr_scheduler_type", "lr_scheduler", "scheduler", "lr_scheduler_name",
                                                      "schedule"),
    "train.grad_accum": ("gradient_accumulation_steps", "gradient_accumulation", "grad_accumulation_steps",
                         "accumulate_grad_batches"),
    "train.micro_batch_size: examples per rank per micro-batch; the global batch is train.micro_batch_size x "
    "train.grad_accum x ranks": ("per_device_train_batch_size", "train_micro_batch_size_per_gpu", "batch_size",
                                 "train_batch_size", "micro_batch", "per_gpu_train_batch_size"),
    "train.epochs": ("num_train_epochs", "num_epochs", "n_epochs", "max_epochs"),
    "train.max_steps": ("max_train_steps", "total_steps", "num_steps", "training_steps", "num_training_steps"),
    "train.grad_clip: 0 disables clipping": ("max_grad_norm", "gradient_clipping", "clip_grad_norm", "grad_norm_clip",
                                             "clip_grad", "max_norm"),
    "train.warmup_steps: a number of optimizer steps, not a fraction: warmup_ratio x train.max_steps": (
        "warmup_ratio", "warmup_fraction", "warmup_proportion"),
    "train.warmup_steps": ("num_warmup_steps", "lr_warmup_steps", "warmup"),
    "train.weight_decay": ("adam_weight_decay", "wd", "decay"),
    "train.adam_betas: a pair [beta1, beta2]": ("adam_beta1", "adam_beta2", "betas", "beta1", "beta2"),
    "train.adam_eps": ("adam_epsilon", "eps", "epsilon"),
    "train.log_every: steps": ("logging_steps", "log_steps", "log_interval", "logging_interval"),
    "train.save_every: steps; 0 saves at the end and on preemption only": ("save_steps", "save_interval", "checkpoint_every",
                                                                             "checkpoint_steps"),
    "train.eval_every: steps; 0 evaluates at the end only": ("eval_steps", "evaluation_steps", "eval_interval",
                                                            "val_check_interval"),
    "train.resume: auto or never": ("resume_from_checkpoint", "auto_resume"),
    "model.path: a local Hugging Face folder, or 'embedded'": ("model_name_or_path", "pretrained_model_name_or_path",
                                                               "model_name", "model_path", "model_id"),
    "model.dtype: bf16 or fp32": ("torch_dtype", "bf16", "fp16", "precision", "mixed_precision"),
    "model.attn_implementation: sdpa, eager or flash_attention_2": ("flash_attention", "flash_attn", "use_flash_attention_2",
                                                                    "attn_impl", "attention"),
    "model.gradient_checkpointing": ("activation_checkpointing", "use_gradient_checkpointing"),
    "data.max_length: tokens per example": ("max_seq_length", "max_seq_len", "seq_len", "seq_length", "sequence_len",
                                            "sequence_length", "cutoff_len", "max_len", "block_size", "model_max_length"),
    "data.packing": ("sample_packing", "pack", "pack_sequences", "group_by_length"),
    "data.train: a list of sources, each {path: ..., format: ...}": ("dataset", "datasets", "train_file", "train_files",
                                                                     "train_data", "dataset_path", "data_path"),
    "data.eval: a list of sources, each {path: ..., format: ...}": ("eval_file", "validation_file", "eval_dataset",
                                                                    "eval_data", "test_file"),
    "data.eval_fraction": ("val_set_size", "validation_split", "eval_split_size", "test_size"),
    "lora.enabled": ("use_lora", "use_peft", "peft", "adapter"),
    "lora.r": ("lora_r", "lora_rank"),
    "lora.alpha": ("lora_alpha",),
    "lora.dropout": ("lora_dropout",),
    "lora.target_modules": ("lora_target_modules", "lora_targets"),
    "deepspeed_config: a DeepSpeed JSON file or a shipped one's name": ("deepspeed", "ds_config", "deepspeed_config_file"),
    "output_dir": ("output_path", "out_dir", "save_dir", "outdir"),
    "seed": ("random_seed", "data_seed"),
    "logging.wandb.project": ("wandb_project",),
    "logging.wandb: a section {project: ...}; TensorBoard: logging.tensorboard": ("report_to",),
    "sap.rho: relative to ||W||, as the authors' grad_rate": ("grad_rate",),
})


class RunConfigBase(Section):
    """The keys and sections every run has, whatever its method; ``RunConfig`` adds the
    sections of the methods (one key per method with knobs: ``sap``, ``lisa``, ...)."""

    KEY_SYNONYMS: ClassVar[dict[str, str]] = KEY_SYNONYMS
    run_name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 42
    method: MethodName = Field("sft", description=f"sap_ds/methods/: {', '.join(METHOD_SECTIONS)}.")
    deepspeed_config: str = Field("ds_configs/zero3_cpu.json", json_schema_extra=CONFIG_PATH,
                                  description="DeepSpeed JSON: a path, or a shipped one's name (zero3_bf16.json).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
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

    @property
    def method_section(self) -> MethodSection:
        """The section of this run's method: the file's, or the defaults of a method without
        knobs (SFT), which has none. What the rest of sap-ds asks of the method before torch
        is imported, it asks this (``MethodSection``)."""
        name = self.method
        return getattr(self, name) if name in type(self).model_fields else METHOD_SECTIONS[name]()

    def method_sections(self) -> dict[str, MethodSection]:
        """Every method section this config holds (one per method with knobs), by method name."""
        return {name: getattr(self, name) for name in METHOD_SECTIONS if name in type(self).model_fields}

    @model_validator(mode="after")
    def _sections_agree(self) -> "RunConfigBase":
        self.method_section.check_run(self)  # what the method needs of the rest (data.safety, ...)
        if self.export.keep_probe and self.lora.enabled and not self.export.merge_lora:
            raise ValueError("export.keep_probe writes the probe into the merged model: it needs export.merge_lora true")
        if self.data.harmful_ratio > 0 and self.data.harmful is None:
            raise ValueError("data.harmful_ratio > 0 needs data.harmful (a harmful instruction file)")
        return self

    @model_validator(mode="after")
    def _safelora_needs_lora(self) -> "RunConfigBase":
        if self.export.safelora.enabled and not self.lora.enabled:
            raise ValueError("export.safelora.enabled projects LoRA updates: it needs lora.enabled true")
        if self.export.safelora.enabled and not self.export.enabled:
            raise ValueError("export.safelora.enabled runs at export: it needs export.enabled true")
        return self


# The run config: the shared keys, then one section per method with knobs, made from the registry so
# that a new method's section needs no line here (its key in a file is the method's name: ``sap:``).
RunConfig = create_model(
    "RunConfig", __base__=RunConfigBase, __module__=__name__,
    __doc__="A run's whole configuration: ``RunConfigBase``'s keys and every method's section.",
    **{name: (section, Field(default_factory=section))
       for name, section in METHOD_SECTIONS.items() if section.model_fields})


# --------------------------------------------------------------------------- run configs


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
    """How ``cfg`` differs from ``saved`` (a run's config.json), one ``key: old → new`` line
    each, in the dotted keys a user would override: a list of sections goes entry by entry
    (``data.train.0.path: 'data/a.jsonl' → 'data/b.jsonl'``, not the whole list twice), and a
    long value is shortened in the middle (``change_line``).

    The output folder is not compared (a moved run is the same run), nor the timeouts of the
    ``distributed`` section, nor the keys that cannot change what this run trains
    (``unused_method_keys``: the ``sap`` section of an SFT run, ``sap.resolution_check``), so
    that only a change that alters what is trained is reported."""
    ignore = NOT_TRAINING_KEYS | unused_method_keys(cfg)
    ignore |= {f"distributed.{key}" for key in DistributedConfig.model_fields}
    found: list[tuple[str, Any, Any]] = []
    _differences(saved, config_to_dict(cfg), "", found)
    lines = []
    for key, old, new in found:
        if old is NOT_SET:  # a run recorded before the key existed was trained with this
            old = ADDED_LATER.get(key, NOT_SET)
        if old != new and key not in ignore and not key.startswith("logging."):
            lines.append(change_line(key, old, new))
    return lines


def unused_method_keys(cfg: RunConfig) -> set[str]:
    """The dotted keys of method sections that cannot change what ``cfg`` trains: every key
    of another method's section (also: a run recorded before a section existed has none of
    it), and those of its own method's that these settings leave unread
    (``MethodSection.unused_keys``)."""
    active = cfg.method_section
    return {f"{name}.{key}" for name, section in cfg.method_sections().items()
            for key in (section.unused_keys() if section is active else type(section).model_fields)}


class _NotSet:
    def __repr__(self) -> str:
        return "(not set)"


NOT_SET = _NotSet()  # a key one of the two configs does not have
CHANGE_VALUE_CHARS = 100  # a value longer than this is shown as its start ... its end


def _differences(old: Any, new: Any, key: str, found: list) -> None:
    """Append ``(key, old, new)`` for every leaf where the two config trees differ; sections
    are compared key by key and lists of sections (``data.train``) entry by entry."""
    if isinstance(old, dict) or isinstance(new, dict):
        if (isinstance(old, dict) or old is NOT_SET) and (isinstance(new, dict) or new is NOT_SET):
            old, new = {} if old is NOT_SET else old, {} if new is NOT_SET else new
            for name in sorted(set(old) | set(new)):
                _differences(old.get(name, NOT_SET), new.get(name, NOT_SET), f"{key}.{name}" if key else name, found)
            return
    elif _is_section_list(old) and _is_section_list(new):
        for i in range(max(len(old), len(new))):
            if i < len(old) and i < len(new):
                _differences(old[i], new[i], f"{key}.{i}", found)
            else:  # an entry added or removed: one line, with the keys it sets
                entry = {k: v for k, v in (old if i < len(old) else new)[i].items() if v is not None}
                found.append((f"{key}.{i}", entry if i < len(old) else NOT_SET, entry if i < len(new) else NOT_SET))
        return
    if old != new:
        found.append((key, old, new))


def _is_section_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def change_line(key: str, old: Any, new: Any) -> str:
    """``key: old → new``, each value as Python writes it and at most ``CHANGE_VALUE_CHARS``
    long: a longer one keeps its start and its end (where a path's file name is)."""
    def show(value: Any) -> str:
        text = repr(value)
        if len(text) <= CHANGE_VALUE_CHARS:
            return text
        half = (CHANGE_VALUE_CHARS - 1) // 2
        return f"{text[:half]}…{text[-half:]}"

    return f"{key}: {show(old)} → {show(new)}"


# Keys added after runs were recorded without them, and the value that is what those runs did.
ADDED_LATER = {"sap.probe_update": "adam", "sap.probe_timing": "next_step", "sap.probe_in_safety": False}

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
