"""``sap-ds plan``: size a ZeRO-3 job of any training method before spending a GPU hour.

Given a model (a Hugging Face ``config.json`` or a named size), a cluster shape and the
training settings, it prints for each method's column (``COLUMNS``: SFT, SAP, Lisa,
Booster, Vaccine, RepNoise) the per-GPU memory (model states, ZeRO-3 working set,
activations, logits, the method's buffers), the CPU memory per node under offload, and an
estimated step time and throughput, with every assumption.

Everything is closed-form arithmetic; nothing here imports torch or DeepSpeed, so it runs
anywhere in milliseconds. The cost model is a few named steps (the parameter counts, the
model states, the ZeRO-3 working set, the passes of a method's step, its buffers, the FLOPs,
the communication, the step time), each a function that says what it counts. A column is
its method's passes (``Pass``: batch, length, how often, which backward) and buffers; its
memory, FLOPs and communication are derived from those by the same functions for every
method. ``plan(...)`` composes them, ``main(argv)`` is the CLI. Each input's default is
written once, in ``PlanInputs`` (the flags take theirs from it); where an input is a
run-config key, its default is that key's.

Conventions: bytes are exact integers where the inputs divide evenly (floats otherwise);
GiB = 2**30 bytes; GPU capacities are the usable memory nvidia-smi reports.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from sap_ds.config.methods import METHOD_SECTIONS, BoosterConfig, SapConfig
from sap_ds.config.run import DataConfig, LoraConfig
from sap_ds.cost.model_spec import NAMED_MODELS, ModelSpec, PlanError, resolve_model
from sap_ds.entry import run_command

GIB = 2**30
# The headline choices: every training method. Each takes the column its section names
# (``MethodSection.plan_column``): a method whose step is SFT's takes the SFT column (safety_mix:
# its refusal demonstrations are task examples, the same step on other batches, with
# round(ratio x N) more examples per epoch; its ``plan_note`` says so).
METHODS = tuple(METHOD_SECTIONS)
# probe passes per probe step by sap.probe_timing, as SAP's section counts them (SapConfig.probe_passes)
PROBE_PASSES = {timing: SapConfig(probe_timing=timing).probe_passes
                for timing in typing.get_args(SapConfig.model_fields["probe_timing"].annotation)}

# --------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int  # usable, as nvidia-smi reports it
    bf16_tflops: float  # dense peak
    hbm_tbps: float
    intra_node_gbps: float  # GB/s per GPU, bidirectional as vendors quote it (NVLink, else PCIe)
    note: str = ""


MIB = 2**20
GPUS: dict[str, GpuSpec] = {
    "h100-80gb": GpuSpec("h100-80gb", 81559 * MIB, 989.0, 3.35, 900.0, "H100 SXM5, NVLink 4"),
    "h100-pcie": GpuSpec("h100-pcie", 81559 * MIB, 756.0, 2.0, 128.0, "H100 PCIe, PCIe Gen5 x16 (NVLink bridge pairs not modelled)"),
    "h200": GpuSpec("h200", 143771 * MIB, 989.0, 4.8, 900.0, "H200 SXM, NVLink 4"),
    "a100-80gb": GpuSpec("a100-80gb", 81920 * MIB, 312.0, 2.039, 600.0, "A100 SXM4 80GB, NVLink 3"),
    "a100-40gb": GpuSpec("a100-40gb", 40960 * MIB, 312.0, 1.555, 600.0, "A100 SXM4 40GB, NVLink 3"),
    "l40s": GpuSpec("l40s", 46068 * MIB, 362.0, 0.864, 64.0, "L40S, PCIe Gen4 x16, no NVLink"),
}


# --------------------------------------------------------------------------- the inputs


def _run_default(section, key: str):
    """The run config's default for ``section.key`` (a list as a tuple): an input that is a
    run-config key plans, by default, the run a config without it would make."""
    value = section.model_fields[key].get_default(call_default_factory=True)
    return tuple(value) if isinstance(value, list) else value


@dataclass
class PlanInputs:
    """What ``plan`` needs; each field's default is the flag's (``build_parser`` reads them here)."""

    model: str
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "h100-80gb"
    offload: str = "none"  # none | optimizer | all
    method: str = "sap"  # which method's memory is the headline (METHODS)
    lora: bool = False
    lora_r: int = _run_default(LoraConfig, "r")
    lora_targets: tuple[str, ...] = _run_default(LoraConfig, "target_modules")
    lora_dropout: float = _run_default(LoraConfig, "dropout")
    seq_len: int = 2048  # a long-context job, not data.max_length's small-run default
    micro_batch: int = 1
    grad_accum: int = 1
    safety_seq_len: int = _run_default(DataConfig, "safety_max_length")
    safety_batch: int = _run_default(SapConfig, "safety_batch_size")  # safety *pairs* per GPU per pass
    harmful_batch: int = _run_default(BoosterConfig, "harmful_batch_size")  # Booster's harmful sequences per GPU
    probe_layers: tuple[int, ...] = _run_default(SapConfig, "probe_layers")
    safety_every: int = _run_default(SapConfig, "safety_every")
    probe_fraction: float = _run_default(SapConfig, "probe_fraction")
    probe_timing: str = _run_default(SapConfig, "probe_timing")  # same_step adds the probe pass at W (PROBE_PASSES)
    probe_micro_batches: Optional[int] = _run_default(SapConfig, "probe_micro_batches")  # None: all of grad_accum
    activation_checkpointing: bool = True  # a large job's setting, not model.gradient_checkpointing's default
    mfu: float = 0.4
    internode_gbps: float = 400.0  # Gb/s per GPU
    overlap: float = 0.0  # fraction of communication hidden behind compute
    reserve_gib: float = 3.0  # CUDA context, NCCL buffers, allocator fragmentation
    # DeepSpeed ZeRO-3's own defaults (elements), overridable to match a ds_config
    prefetch_bucket_size: int = 50_000_000  # stage3_prefetch_bucket_size
    param_persistence_threshold: int = 100_000  # stage3_param_persistence_threshold
    reduce_bucket_size: int = 500_000_000  # reduce_bucket_size
    sub_group_size: int = 1_000_000_000  # sub_group_size


@dataclass
class StepEstimate:
    compute_s: float
    comm_s: float
    step_s: float  # compute + (1 - overlap) * comm
    step_s_full_overlap: float  # max(compute, comm)
    tokens_per_step: int  # global trained tokens per optimizer step (task tokens; RepNoise: its pairs')
    tokens_per_s: float
    flops_per_step_per_gpu: float
    comm_bytes_per_step_per_gpu: float


@dataclass
class ColumnPlan:
    """One column's estimate (``COLUMNS``)."""

    memory: dict[str, float]  # item -> bytes per GPU
    total: float  # bytes per GPU
    cpu_per_node: float  # offloaded states and buffers, bytes per node
    fits: bool
    step: StepEstimate
    over_sft_throughput: float  # trained tokens/s over SFT's


# The names a column's figures go by on ``PlanResult`` and in ``--json`` (``gpu_total_sap``,
# ``fits_booster``, ``sap`` for SAP's step estimate, ...): prefix + column -> ColumnPlan field.
FLAT_NAMES = {"gpu_memory_": "memory", "gpu_total_": "total", "cpu_memory_per_node_": "cpu_per_node", "fits_": "fits"}


@dataclass
class PlanResult:
    inputs: PlanInputs
    model: ModelSpec
    gpu: GpuSpec
    world_size: int
    total_params: int
    trainable_params: int
    lora_params: int
    largest_layer_params: int
    gpu_capacity: int
    columns: dict[str, ColumnPlan]  # COLUMNS' order
    assumptions: list[str] = field(default_factory=list)

    def __getattr__(self, name: str):
        """A column's figure by its flat name (``FLAT_NAMES``; ``<column>`` is its step
        estimate, ``<column>_over_sft_throughput`` its throughput over SFT's)."""
        columns = self.__dict__.get("columns", {})
        for prefix, attribute in FLAT_NAMES.items():
            if name.startswith(prefix) and name[len(prefix):] in columns:
                return getattr(columns[name[len(prefix):]], attribute)
        if name in columns:
            return columns[name].step
        if name.endswith("_over_sft_throughput") and name.removesuffix("_over_sft_throughput") in columns:
            return columns[name.removesuffix("_over_sft_throughput")].over_sft_throughput
        raise AttributeError(f"{type(self).__name__} has no attribute '{name}'")

    def as_dict(self) -> dict:
        """``--json``'s object: the inputs and counts, then each column's figures under their
        flat names (``FLAT_NAMES``), then the assumptions."""
        whole = dataclasses.asdict(self)
        out = {key: value for key, value in whole.items() if key not in ("columns", "assumptions")}
        for name, column in self.columns.items():
            figures = whole["columns"][name]
            out.update({prefix + name: figures[attribute] for prefix, attribute in FLAT_NAMES.items()})
            out[name] = figures["step"]
            out[f"{name}_over_sft_throughput"] = column.over_sft_throughput
        out["assumptions"] = list(self.assumptions)
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)



def check_inputs(inp: PlanInputs) -> None:
    """Every input that can be checked without the model; PlanError names the flag."""
    if inp.nodes <= 0:
        raise PlanError(f"--nodes must be a positive integer (got {inp.nodes})")
    if inp.gpus_per_node <= 0:
        raise PlanError(f"--gpus-per-node must be a positive integer (got {inp.gpus_per_node})")
    for name in ("seq_len", "micro_batch", "grad_accum", "lora_r", "safety_every", "safety_seq_len", "safety_batch",
                 "harmful_batch"):
        if getattr(inp, name) <= 0:
            raise PlanError(f"--{name.replace('_', '-')} must be positive (got {getattr(inp, name)})")
    if inp.gpu not in GPUS:
        raise PlanError(f"unknown GPU '{inp.gpu}'; valid: {', '.join(GPUS)}")
    if inp.offload not in ("none", "optimizer", "all"):
        raise PlanError(f"unknown offload '{inp.offload}'; valid: none, optimizer, all")
    if inp.method not in METHODS:
        raise PlanError(f"unknown method '{inp.method}'; valid: {', '.join(METHODS)}")
    if not 0 < inp.mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1] (got {inp.mfu})")
    if not 0 <= inp.overlap <= 1:
        raise PlanError(f"--overlap must be in [0, 1] (got {inp.overlap})")
    if not 0 < inp.probe_fraction <= 1:
        raise PlanError(f"--probe-fraction must be in (0, 1] (got {inp.probe_fraction})")
    if inp.probe_timing not in PROBE_PASSES:
        raise PlanError(f"--probe-timing '{inp.probe_timing}'; valid: {', '.join(PROBE_PASSES)}")
    if inp.probe_micro_batches is not None and not 1 <= inp.probe_micro_batches <= inp.grad_accum:
        raise PlanError(f"--probe-micro-batches {inp.probe_micro_batches}: must be in [1, --grad-accum {inp.grad_accum}]")


# --------------------------------------------------------------------------- the cost model, step by step


def _div(a: int, b: int) -> float | int:
    """Exact integer when it divides, float otherwise."""
    return a // b if a % b == 0 else a / b


def layer_activation_bytes(m: ModelSpec, tokens: int, lora_targets: Sequence[str] = (), lora_r: int = 0,
                           lora_dropout: float = 0.0) -> int:
    """bf16 activations one decoder layer keeps for backward, for ``tokens`` = batch*seq tokens.

    Korthikanti et al. (2022) count 34*s*b*h + 5*a*s^2*b bytes per GPT layer. With SDPA /
    flash attention the s^2 score matrix is never stored (no s^2 term); without dropout
    and with a SwiGLU MLP and GQA the same bookkeeping gives, per token:
      attention: 2h (norm input) + 2h (q/k/v input) + 2q_dim (Q) + 4kv_dim (K, V) + 2q_dim (attn out = o_proj input)
      MLP:       2h (norm input) + 2h (gate/up input) + 2I (gate) + 2I (up) + 2I (silu(gate)) + 2I (down input)
    = 8h + 4q_dim + 4kv_dim + 8I bytes (= 12h + 4kv + 8I when q_dim = h).
    LoRA adds per targeted linear: 2*r (A output) and, with dropout, 2*d_in + 1*d_in (dropped input + mask).
    """
    h, i = m.hidden_size, m.intermediate_size
    per_token = 8 * h + 4 * m.q_dim + 4 * m.kv_dim + 8 * i
    shapes = m.linear_shapes()
    for t in lora_targets:
        per_token += 2 * lora_r + (3 * shapes[t][0] if lora_dropout > 0 else 0)
    return tokens * per_token


def activation_bytes(m: ModelSpec, batch: int, seq: int, checkpointing: bool, **lora) -> int:
    """Activations of the whole model for one micro-batch.

    No checkpointing: layers * per-layer activations.
    Checkpointing (per decoder layer): layers * seq*batch*hidden*2 (the saved layer inputs)
    + one layer's full activations (recomputed during its backward).
    """
    tokens = batch * seq
    per_layer = layer_activation_bytes(m, tokens, **lora)
    if checkpointing:
        return m.num_hidden_layers * tokens * m.hidden_size * 2 + per_layer
    return m.num_hidden_layers * per_layer


def logits_bytes(m: ModelSpec, batch: int, seq: int) -> int:
    """fp32 logits for the loss: batch * seq * vocab * 4."""
    return batch * seq * m.vocab_size * 4


def forward_flops_per_token(m: ModelSpec, seq: int, extra_matmul_params: int = 0) -> int:
    """2 * (matmul weights) + attention scores 4 * layers * seq * q_dim (QK^T and AV, non-causal count)."""
    return 2 * (m.matmul_params() + extra_matmul_params) + 4 * m.num_hidden_layers * seq * m.q_dim


@dataclass(frozen=True)
class Parameters:
    """The parameter counts the later steps use."""

    total: int  # the model's, plus the LoRA adapters
    trainable: int  # the adapters under LoRA, every parameter under full fine-tuning
    lora: int  # the adapters (0 without LoRA)
    largest_layer: int  # the largest module, which ZeRO-3 gathers whole
    persistent: int  # in tensors at most stage3_param_persistence_threshold: kept whole on every GPU


def parameters(m: ModelSpec, inp: PlanInputs) -> Parameters:
    """Counts from the model's shapes (``ModelSpec``) and, with ``--lora``, its adapters'."""
    lora = m.lora_params(inp.lora_r, inp.lora_targets) if inp.lora else 0
    persistent = sum(t for t in m.all_tensors() if t <= inp.param_persistence_threshold)
    if inp.lora:
        persistent += sum(t for t in m.lora_tensors(inp.lora_r, inp.lora_targets) if t <= inp.param_persistence_threshold)
    return Parameters(total=m.param_count() + lora, trainable=lora if inp.lora else m.param_count(), lora=lora,
                      largest_layer=m.largest_layer_params(), persistent=persistent)


def model_states(inp: PlanInputs, n: Parameters, world: int) -> tuple[dict[str, float], float]:
    """Per-GPU bytes of the model states, partitioned over all ``world`` ranks (ZeRO-3), and
    the CPU bytes per rank that ZeRO-Offload moves there. Mixed precision: bf16 parameters
    (2 B) and gradients (2 B), an fp32 master, Adam's m and v (12 B per trainable parameter);
    offloaded, the gradient partition is held in fp32 for the CPU Adam step (16 B)."""
    params_b = _div(2 * n.total, world)
    mem: dict[str, float] = {"params (bf16, 2 B/param / world)": params_b if inp.offload != "all" else 0}
    cpu_rank = 0.0
    if inp.offload == "none":
        mem["grads (bf16, 2 B/trainable / world)"] = _div(2 * n.trainable, world)
        mem["optimizer (fp32 master+m+v, 12 B/trainable / world)"] = _div(12 * n.trainable, world)
    else:
        cpu_rank += _div(16 * n.trainable, world)
        mem["grads (offloaded to CPU)"] = 0
        mem["optimizer (offloaded to CPU)"] = 0
    if inp.offload == "all":
        cpu_rank += params_b
    return mem, cpu_rank


def zero3_working_set(inp: PlanInputs, n: Parameters) -> dict[str, float]:
    """What ZeRO-3 holds beyond the partitions: the largest module gathered (and, under full
    fine-tuning, its full gradient before the reduce-scatter), the prefetch bucket, the small
    parameters kept whole and the reduce-scatter bucket (DeepSpeed's settings, ``PlanInputs``)."""
    return {
        "largest layer gathered (2 B) + its full grad (2 B, full FT only)": n.largest_layer * (2 if inp.lora else 4),
        "prefetch bucket (2 B * stage3_prefetch_bucket_size)": 2 * inp.prefetch_bucket_size,
        "persistent small params kept whole (2 B * numel <= threshold)": 2 * n.persistent,
        "reduce-scatter bucket (2 B * min(reduce_bucket_size, trainable))": 2 * min(inp.reduce_bucket_size, n.trainable),
    }


def _lora_shapes(inp: PlanInputs) -> dict:
    """The LoRA keywords of ``activation_bytes`` (none under full fine-tuning)."""
    return dict(lora_targets=inp.lora_targets if inp.lora else (), lora_r=inp.lora_r if inp.lora else 0,
                lora_dropout=inp.lora_dropout if inp.lora else 0.0)


# --------------------------------------------------------------------------- a step's passes


@dataclass(frozen=True)
class Pass:
    """One forward, with its backward, that a method's step runs: what its column's memory,
    FLOPs and communication are counted from (``column_memory``, ``pass_flops``,
    ``pass_comm_bytes``). A column's first pass is its main pass: the batch the step trains
    on, ``grad_accum`` micro-batches of it."""

    name: str  # "task", "safety", ...: the table's "<name> pass activations+logits beyond the <main> pass"
    sequences: int  # per GPU in one run of the pass
    seq_len: int
    runs: float  # per optimizer step (micro-batches, times the share of steps that run it)
    every: int = 1  # it runs once every this many steps (sap.safety_every)
    # "train": activation and weight gradients, reduced (a reduce-scatter); "activations": activation
    # gradients only (autograd.grad: SAP's probe, Vaccine's first pass), through ``depth`` of the layers
    backward: str = "train"
    depth: float = 1.0  # share of the decoder layers the backward runs through
    own_batch: bool = True  # False: the main pass's micro-batch again (its activations are the main pass's)
    label: str = ""  # main pass: the table's "activations (<label>)"
    shape: str = ""  # main pass: the table's "logits fp32 (<shape>*vocab*4)"

    @property
    def tokens(self) -> float:
        """Tokens per GPU per step (before ``every``)."""
        return self.sequences * self.seq_len * self.runs


def task_main_pass(inp: PlanInputs) -> Pass:
    """The task micro-batches: SFT's whole step, the main pass of every method that trains on
    the run's data."""
    return Pass("task", inp.micro_batch, inp.seq_len, inp.grad_accum, label="task micro-batch",
                shape="micro_batch*seq")


def pass_bytes(m: ModelSpec, inp: PlanInputs, p: Pass) -> tuple[int, int]:
    """Activations (``activation_bytes``) and fp32 logits of one run of pass ``p``: its
    forward/backward peak. An activation-only backward keeps what a training one does."""
    return (activation_bytes(m, p.sequences, p.seq_len, inp.activation_checkpointing, **_lora_shapes(inp)),
            logits_bytes(m, p.sequences, p.seq_len))


def task_pass(m: ModelSpec, inp: PlanInputs) -> dict[str, int]:
    """Activations and fp32 logits of one task micro-batch: the forward/backward peak every
    method that trains on the task data has."""
    activations, logits = pass_bytes(m, inp, task_main_pass(inp))
    return {"activations (task micro-batch)": activations, "logits fp32 (micro_batch*seq*vocab*4)": logits}


STEP_COPY = "optimizer-step fp32 grad copy beyond fwd/bwd peak (4 B * min(sub_group, shard))"

# Under offload SAP's perturb/restore run as PyTorch twins on the CPU master
# (kernels/sap_ds_kernels/perturb.py, _offload.py), one sub-group at a time, in chunks of
# OFFLOAD_TWIN_CHUNK elements (the kernels' OFFLOAD_CHUNK; tests/test_offload_twin_memory.py
# holds the two equal and measures the figure below). Live per element of a chunk: scale *
# direction (4 B), master + that (4 B, until cast), then for the statistics r and one product
# at a time (4 B each) or the master cast (2 B); on a GPU node also the cast in pinned memory
# (2 B) and a second pinned buffer still copying (2 B). Peak RSS grew by 16 B per chunk element
# on CPU (the allocator keeps some freed chunks); 24 B leaves the pinned buffers room.
OFFLOAD_TWIN_CHUNK = 2**22
OFFLOAD_TWIN_BYTES_PER_ELEMENT = 24
OFFLOAD_TWIN = "SAP offload twin temporaries (on CPU, one chunk per rank)"


def optimizer_step_copy(inp: PlanInputs, n: Parameters, world: int) -> float:
    """The optimizer step's transient: the fp32 copy of one sub-group's gradient (on the GPU
    only without offload). It runs after the activations are freed, so only what exceeds the
    forward/backward peak counts (``column_memory`` subtracts it)."""
    return 4 * min(inp.sub_group_size, n.trainable / world) if inp.offload == "none" else 0


def offload_twin_transient(inp: PlanInputs, n: Parameters, world: int) -> float:
    """CPU bytes per rank the offload twins hold while perturbing or restoring: one chunk's
    temporaries, or one sub-group's where the rank's sub-group is smaller than a chunk."""
    return OFFLOAD_TWIN_BYTES_PER_ELEMENT * min(OFFLOAD_TWIN_CHUNK, inp.sub_group_size, n.trainable / world)


@dataclass
class Buffers:
    """What a method holds beside its passes' activations: per-GPU bytes held through the
    optimizer step (``gpu``), per-GPU bytes alive only during the forward/backward
    (``in_pass``: part of the peak the optimizer step's copy is measured against) and CPU
    bytes per rank (``cpu_rank``)."""

    gpu: dict[str, float] = field(default_factory=dict)
    in_pass: dict[str, float] = field(default_factory=dict)
    cpu_rank: float = 0.0


def shard_buffer(inp: PlanInputs, n: Parameters, world: int, label: str, twins: Optional[str] = None) -> Buffers:
    """One fp32 buffer shaped like the master shard (4 B per trainable parameter over the
    world: SAP's direction, Lisa's anchor, Booster's harmful gradient): on the GPU, or under
    offload on the CPU with the master, where a method that perturbs through the offload twins
    (``twins``: its name in the table) also holds one chunk of their temporaries."""
    size = _div(4 * n.trainable, world)
    if inp.offload == "none":
        return Buffers(gpu={f"{label} (fp32, 4 B/trainable / world)": size})
    gpu = {f"{label} (on CPU with the master)": 0}
    if twins is None:
        return Buffers(gpu=gpu, cpu_rank=size)
    gpu[f"{twins} offload twin temporaries (on CPU, one chunk per rank)"] = 0
    return Buffers(gpu=gpu, cpu_rank=size + offload_twin_transient(inp, n, world))


@dataclass(frozen=True)
class ProbeSchedule:
    """How much probing a SAP step does on average."""

    passes: int  # task-batch passes per probe step (sap.probe_timing: PROBE_PASSES)
    micro_batches: int  # of grad_accum, the micro-batches each probe pass runs on (sap.probe_micro_batches)
    lowest_layer: int  # the backward of a probe pass stops there
    fraction_above: float  # of the layers, those from the lowest probe layer up


def probe_schedule(m: ModelSpec, inp: PlanInputs) -> ProbeSchedule:
    lowest = min(inp.probe_layers)
    return ProbeSchedule(passes=PROBE_PASSES[inp.probe_timing],
                         micro_batches=inp.grad_accum if inp.probe_micro_batches is None else inp.probe_micro_batches,
                         lowest_layer=lowest, fraction_above=(m.num_hidden_layers - lowest) / m.num_hidden_layers)


# The logit lens's live bytes per logit of the one hidden state being backpropagated: its fp32
# log-softmax (recomputed under checkpointing, saved for the backward), the gradient arriving at
# it and the gradient it passes on, 4 B each (the bf16 logits and their gradient come and go
# around them).
LENS_BYTES_PER_LOGIT = 12


# --------------------------------------------------------------------------- the columns


@dataclass(frozen=True)
class BatchKnob:
    """A column's batch of its own that a fit hint may shrink: the ``PlanInputs`` field, its
    flag, the run-config key and what a smaller one costs."""

    input: str
    flag: str
    key: str
    cost: str


@dataclass(frozen=True)
class Column:
    """One method's estimate: its step's passes (the first the main pass), what it holds beside
    them, FLOPs beyond its passes (``extra_flops``), the flag of its main pass's sequence length
    and the batch of its own a fit hint may shrink. ``MethodSection.plan_column`` names one."""

    title: str
    passes: Callable[[ModelSpec, PlanInputs], tuple[Pass, ...]]
    buffers: Callable[[ModelSpec, PlanInputs, Parameters, int], Buffers] = lambda m, inp, n, world: Buffers()
    extra_flops: Callable[[ModelSpec, PlanInputs, Parameters], float] = lambda m, inp, n: 0
    seq_flag: str = "--seq-len"
    batch: Optional[BatchKnob] = None


def _sap_passes(m: ModelSpec, inp: PlanInputs) -> tuple[Pass, ...]:
    """The task pass, the safety pass (2 sequences per pair, every ``safety_every`` steps) and
    the probe passes (a forward and an activation-only backward down to the lowest probe layer,
    on ``probe.micro_batches`` task micro-batches, ``probe_fraction`` of the steps)."""
    probe = probe_schedule(m, inp)
    return (task_main_pass(inp),
            Pass("safety", 2 * inp.safety_batch, inp.safety_seq_len, 1, every=inp.safety_every),
            Pass("probe", inp.micro_batch, inp.seq_len, probe.passes * probe.micro_batches * inp.probe_fraction,
                 backward="activations", depth=probe.fraction_above, own_batch=False))


def _sap_buffers(m: ModelSpec, inp: PlanInputs, n: Parameters, world: int) -> Buffers:
    """The fp32 safety direction (through the offload twins under offload) and the probe
    (value, Adam m and v per probed layer)."""
    b = shard_buffer(inp, n, world, "SAP direction buffer", twins="SAP")
    b.gpu["SAP probe (layers*hidden*4 B * 3: value, Adam m, v)"] = len(inp.probe_layers) * m.hidden_size * 4 * 3
    return b


def _booster_passes(m: ModelSpec, inp: PlanInputs) -> tuple[Pass, ...]:
    """The alignment (task) pass and two training passes on the harmful batch, at W and at the
    simulated harmful step W' (sap_ds/methods/booster.py)."""
    return task_main_pass(inp), Pass("harmful", inp.harmful_batch, inp.safety_seq_len, 2)


def _vaccine_passes(m: ModelSpec, inp: PlanInputs) -> tuple[Pass, ...]:
    """Per task micro-batch, before its main pass, a first pass: a forward and d loss / d a_l
    w.r.t. the perturbed modules' outputs only (no weight gradients, no reduce-scatter), down
    to block 0 (sap_ds/methods/vaccine.py)."""
    return task_main_pass(inp), Pass("activation_grad", inp.micro_batch, inp.seq_len, inp.grad_accum,
                                     backward="activations", own_batch=False)


def _vaccine_buffers(m: ModelSpec, inp: PlanInputs, n: Parameters, world: int) -> Buffers:
    """The perturbations: one activation gradient per decoder layer in the working dtype
    (layers x micro_batch x seq x hidden x 2 B), held from the first pass through the main
    pass and the optimizer step; and in the first pass the perturbed modules' outputs it
    captures (the same size), beside the previous micro-batch's perturbations when there are
    several micro-batches (with one, the two are never alive together)."""
    size = m.num_hidden_layers * inp.micro_batch * inp.seq_len * m.hidden_size * 2
    return Buffers(gpu={"Vaccine perturbations (layers*micro_batch*seq*hidden*2 B)": size},
                   in_pass={"Vaccine first pass: captured outputs beside them (same size; grad_accum > 1)":
                            size if inp.grad_accum > 1 else 0})


def _repnoise_passes(m: ModelSpec, inp: PlanInputs) -> tuple[Pass, ...]:
    """Pairs, not task data: ``micro_batch`` pairs per micro-batch, the refusals and the harmful
    answers (2 sequences each, ``safety_seq_len`` tokens) in one forward and backward
    (sap_ds/methods/repnoise.py)."""
    return (Pass("pair", 2 * inp.micro_batch, inp.safety_seq_len, inp.grad_accum,
                 label="pair micro-batch: 2*micro_batch sequences of safety_seq_len",
                 shape="2*micro_batch*safety_seq_len"),)


def _repnoise_buffers(m: ModelSpec, inp: PlanInputs, n: Parameters, world: int) -> Buffers:
    """Alive in the backward beside the pair pass: the MMD's fp32 inputs (each layer's harmful
    MLP outputs and their Gaussian noise), one hidden state's logit-lens logits at a time
    (checkpointed: ``LENS_BYTES_PER_LOGIT``), and the lens's gradients for the L+1 hidden
    states, waiting for the backward to reach their layer (bf16, the whole pair batch wide)."""
    harmful = inp.micro_batch * inp.safety_seq_len  # tokens of the harmful half
    L, h = m.num_hidden_layers, m.hidden_size
    return Buffers(in_pass={
        "RepNoise MMD inputs fp32 (layers*micro_batch*safety_seq_len*hidden*8 B)": L * harmful * h * 8,
        "RepNoise logit lens, one hidden state (micro_batch*safety_seq_len*vocab*12 B)":
            harmful * m.vocab_size * LENS_BYTES_PER_LOGIT,
        "RepNoise lens grads waiting ((layers+1)*2*micro_batch*safety_seq_len*hidden*2 B)": (L + 1) * 2 * harmful * h * 2,
    })


def _repnoise_lens_flops(m: ModelSpec, inp: PlanInputs, n: Parameters) -> float:
    """The logit lens: each of the L+1 hidden states of the harmful half through the LM head
    (2*V*h per token; the norm is not counted), forward, recompute (checkpointed) and backward."""
    bwd, _ = _passes_per_forward(inp)
    harmful_tokens = inp.micro_batch * inp.safety_seq_len * inp.grad_accum
    return (m.num_hidden_layers + 1) * harmful_tokens * 2 * m.vocab_size * m.hidden_size * (2 + bwd)


# The planner's columns, in the table's order; each method's section names its own
# (``MethodSection.plan_column``; tests/test_plan.py checks that every section's is here).
COLUMNS: dict[str, Column] = {
    "sft": Column("SFT", lambda m, inp: (task_main_pass(inp),)),
    "sap": Column("SAP", _sap_passes, _sap_buffers,
                  batch=BatchKnob("safety_batch", "--safety-batch", "sap.safety_batch_size",
                                  "fewer safety pairs per GPU per step (a noisier safety direction)")),
    "lisa": Column("Lisa", lambda m, inp: (task_main_pass(inp),),
                   lambda m, inp, n, world: shard_buffer(inp, n, world, "Lisa anchor")),
    "booster": Column("Booster", _booster_passes, lambda m, inp, n, world: shard_buffer(
        inp, n, world, "Booster harmful-gradient buffer", twins="Booster"),
        batch=BatchKnob("harmful_batch", "--harmful-batch", "booster.harmful_batch_size",
                        "fewer harmful examples per GPU per step (a noisier harmful gradient)")),
    "vaccine": Column("Vaccine", _vaccine_passes, _vaccine_buffers),
    "repnoise": Column("RepNoise", _repnoise_passes, _repnoise_buffers, _repnoise_lens_flops, seq_flag="--safety-seq-len"),
}


def column_memory(column: Column, m: ModelSpec, inp: PlanInputs, n: Parameters, world: int) -> tuple[dict[str, float], float]:
    """A column's per-GPU bytes and CPU bytes per rank: the model states, the ZeRO-3 working
    set, the main pass's activations and logits, what each pass on a batch of its own needs
    beyond the larger of those before it (the peak is the largest pass, not their sum), the
    optimizer step's copy where it exceeds the forward/backward peak, and the method's buffers."""
    mem, cpu_rank = model_states(inp, n, world)
    mem.update(zero3_working_set(inp, n))
    main, *others = column.passes(m, inp)
    activations, logits = pass_bytes(m, inp, main)
    mem[f"activations ({main.label})"] = activations
    mem[f"logits fp32 ({main.shape}*vocab*4)"] = logits
    mem[STEP_COPY] = 0
    peak = activations + logits
    for p in others:
        if p.own_batch:
            beyond = max(0, sum(pass_bytes(m, inp, p)) - peak)
            mem[f"{p.name} pass activations+logits beyond the {main.name} pass"] = beyond
            peak += beyond
    extra = column.buffers(m, inp, n, world)
    mem[STEP_COPY] = max(0, optimizer_step_copy(inp, n, world) - peak - sum(extra.in_pass.values()))
    mem.update(extra.gpu)
    mem.update(extra.in_pass)
    return mem, cpu_rank + extra.cpu_rank


def _passes_per_forward(inp: PlanInputs) -> tuple[int, int]:
    """(backward, recompute) cost in forwards: a backward is 2 forwards under full
    fine-tuning (activation and weight gradients), 1 under LoRA (no weight gradients for the
    frozen weights); activation checkpointing recomputes 1 forward."""
    return (1 if inp.lora else 2), (1 if inp.activation_checkpointing else 0)


def pass_flops(m: ModelSpec, inp: PlanInputs, n: Parameters, p: Pass) -> float:
    """Per-GPU FLOPs of pass ``p`` per step: its tokens times the forward per token
    (``forward_flops_per_token``, LoRA's matmuls included) times 1 + backward + recompute
    (a training backward; an activation-only one costs a forward over ``depth`` of the
    layers, recomputed there under checkpointing)."""
    bwd, ckpt = _passes_per_forward(inp)
    factor = 1 + bwd + ckpt if p.backward == "train" else 1 + p.depth * (1 + ckpt)
    flops = p.tokens * forward_flops_per_token(m, p.seq_len, n.lora) * factor
    return flops / p.every if p.every != 1 else flops  # exact integers while they are


def column_flops(column: Column, m: ModelSpec, inp: PlanInputs, n: Parameters) -> float:
    """Per-GPU FLOPs of a step of the column's method: its passes' and its ``extra_flops``."""
    return sum(pass_flops(m, inp, n, p) for p in column.passes(m, inp)) + column.extra_flops(m, inp, n)


@dataclass(frozen=True)
class Link:
    """The bandwidth each GPU's ZeRO-3 collectives see (bytes/s per direction)."""

    bytes_per_s: float
    note: str


def link(inp: PlanInputs, gpu: GpuSpec, world: int) -> Link:
    """One node: NVLink (or PCIe), half the vendor's bidirectional figure; several: the
    network, the bottleneck; one GPU: no communication."""
    if world == 1:
        return Link(float("inf"), "world size 1: no communication")
    if inp.nodes == 1:
        return Link(gpu.intra_node_gbps / 2 * 1e9, f"intra-node: {gpu.intra_node_gbps:g} GB/s bidirectional -> "
                    f"{gpu.intra_node_gbps / 2:g} GB/s per direction per GPU")
    return Link(inp.internode_gbps / 8 * 1e9, f"inter-node: {inp.internode_gbps:g} Gb/s per GPU = "
                f"{inp.internode_gbps / 8:g} GB/s per direction (the bottleneck when nodes > 1)")


def _ring(n: Parameters, world: int) -> tuple[float, float]:
    """(all-gather of every parameter, reduce-scatter of the trainable gradients): bytes per
    GPU of each ring collective, 2 B * N * (world-1)/world."""
    ring = (world - 1) / world
    return 2 * n.total * ring, 2 * n.trainable * ring


def pass_comm_bytes(n: Parameters, world: int, p: Pass) -> float:
    """Per-GPU bytes pass ``p`` moves per step: per run, a gather of the parameters for the
    forward and one for the backward over ``depth`` of the layers, and a training backward's
    reduce-scatter of the gradients."""
    gather, reduce_scatter = _ring(n, world)
    return p.runs * (gather * (1 + p.depth) + (reduce_scatter if p.backward == "train" else 0)) / p.every


def column_comm_bytes(column: Column, m: ModelSpec, inp: PlanInputs, n: Parameters, world: int) -> float:
    return sum(pass_comm_bytes(n, world, p) for p in column.passes(m, inp))


def step_estimate(inp: PlanInputs, gpu: GpuSpec, world: int, bandwidth: Link, flops: float,
                  comm_bytes: float, tokens_per_gpu: float) -> StepEstimate:
    """Step time: compute (FLOPs at ``mfu`` of the bf16 dense peak) plus the communication
    not hidden behind it (``overlap``); the fully-overlapped bound too; global trained tokens/s
    (``tokens_per_gpu``: the main pass's per step)."""
    compute = flops / (gpu.bf16_tflops * 1e12 * inp.mfu)
    comm = comm_bytes / bandwidth.bytes_per_s if world > 1 else 0.0
    step = compute + (1 - inp.overlap) * comm
    tokens = tokens_per_gpu * world
    return StepEstimate(compute, comm, step, max(compute, comm), tokens, tokens / step, flops, comm_bytes)


def assumptions(m: ModelSpec, inp: PlanInputs, gpu: GpuSpec, world: int, n: Parameters, bandwidth: Link) -> list[str]:
    """What the estimate assumes, in the order of the steps above (printed under the table)."""
    bwd, _ = _passes_per_forward(inp)
    probe = probe_schedule(m, inp)
    sb, ssl, hb = inp.safety_batch, inp.safety_seq_len, inp.harmful_batch
    twins = ("" if inp.offload == "none" else f"; under offload, perturb/restore temporaries on CPU: "
             f"{OFFLOAD_TWIN_BYTES_PER_ELEMENT} B * min({OFFLOAD_TWIN_CHUNK:,}-element chunk, sub-group) per rank")
    lines = [
        f"model: {m.name}: hidden {m.hidden_size}, intermediate {m.intermediate_size}, layers {m.num_hidden_layers}, "
        f"heads {m.num_attention_heads}/{m.num_key_value_heads} kv, vocab {m.vocab_size}, tied {m.tie_word_embeddings}"
        + (", q/k/v bias" if m.attention_bias else ""),
        "params: embeddings + per layer (q,k,v,o with GQA + SwiGLU gate,up,down + 2 RMSNorm) + final norm + lm_head unless tied",
        f"world size {world} = {inp.nodes} node(s) x {inp.gpus_per_node} GPU(s); everything partitioned over all {world} "
        "ranks (ZeRO-3)",
        "mixed precision: bf16 params 2 B + bf16 grads 2 B + fp32 master/m/v 12 B per trainable param; frozen params 2 B",
        f"LoRA r={inp.lora_r} on {','.join(inp.lora_targets)}: r*(d_in+d_out) per module per layer" if inp.lora else "full fine-tuning: every param trainable",
        {"none": "no offload",
         "optimizer": "offload optimizer: fp32 master/m/v + fp32 grad partition (16 B/trainable/world) in CPU RAM",
         "all": "offload all: optimizer (16 B/trainable/world) and bf16 params (2 B/param/world) in CPU RAM"}[inp.offload]
        + ("" if inp.offload == "none" else "; the CPU Adam step and the PCIe copies are NOT in the step time"),
        f"ZeRO-3 working set: largest module ({n.largest_layer:,} params) gathered in bf16 plus, full FT, its bf16 grad; "
        f"prefetch bucket {inp.prefetch_bucket_size:,}; persistence threshold {inp.param_persistence_threshold:,} "
        f"({n.persistent:,} params kept whole); reduce bucket {inp.reduce_bucket_size:,} (DeepSpeed defaults unless overridden)",
        "activations per layer per token (bf16, SDPA/flash so no s^2 term; Korthikanti et al. 2022 bookkeeping adapted to "
        "SwiGLU+GQA): 8h + 4*q_dim + 4*kv_dim + 8*I bytes"
        + (" + LoRA: 2r + 3*d_in per target (dropout input+mask)" if inp.lora and inp.lora_dropout > 0 else ""),
        "activation checkpointing: layers*seq*batch*hidden*2 bytes (saved layer inputs) + one full layer recomputed"
        if inp.activation_checkpointing else "no activation checkpointing: all layers' activations kept",
        "logits: micro_batch*seq*vocab*4 bytes (fp32 copy for the loss; bf16 logits and the softmax grad not counted)",
        "every column's peak is its largest pass (activations + logits), not the sum of its passes; a pass with an "
        "activation-only backward keeps what a training pass keeps",
        f"SAP: safety pass on {sb} pair(s) = {2 * sb} sequences x {ssl} tokens; direction buffer fp32 "
        f"4 B/trainable/world; probe len(layers)*hidden*4 B*3" + twins,
        f"usable GPU memory: {gpu.memory_bytes / GIB:.1f} GiB ({gpu.name}) - {inp.reserve_gib:g} GiB reserve "
        "(CUDA context, NCCL, fragmentation)",
        f"FLOPs: forward = 2*(matmul weights incl. lm_head) + 4*layers*seq*q_dim per token (attention, non-causal count); "
        f"backward = {bwd}x forward ({'LoRA: activation grads only' if inp.lora else 'full FT: activation + weight grads'})"
        + ("; checkpointing recomputes 1 forward" if inp.activation_checkpointing else "")
        + "; an activation-only backward (autograd.grad) = 1x forward over the layers it runs through",
        f"SAP FLOPs per step: + safety pass (fwd+bwd on {2 * sb}x{ssl} tokens per GPU, every {inp.safety_every} step(s)) "
        f"+ {probe.passes} probe pass(es) ({inp.probe_timing}) on {probe.micro_batches} of {inp.grad_accum} task "
        f"micro-batch(es) x {inp.probe_fraction:g} (forward + backward without weight grads down to layer "
        f"{probe.lowest_layer}: {probe.fraction_above:.3f} of the layers)",
        f"compute time = FLOPs / ({gpu.bf16_tflops:g} TFLOP/s bf16 dense * MFU {inp.mfu:g})",
        "ZeRO-3 comm per micro-batch: 2 all-gathers of all params (forward, backward) + 1 reduce-scatter of the trainable "
        "grads, each 2 B * N * (world-1)/world per GPU; each extra training pass adds the same, an activation-only pass "
        "its gathers (forward, and backward over the layers it runs through) and no reduce-scatter; SAP: the safety pass "
        "and 1 + (fraction above the lowest probe layer) gathers per probe pass",
        f"bandwidth: {bandwidth.note}",
        "Lisa: SFT's step (an alignment step trains on an alignment batch of the task batch's size instead; the "
        "proximal term is element-wise on the local shards, no collective) + the anchor, fp32 4 B/trainable/world",
        f"Booster: the task (alignment) pass + 2 training passes on the harmful batch ({hb} sequences x {ssl} tokens per "
        "GPU, at W and at W - alpha*g/||g||: fwd+bwd, 2 gathers + 1 reduce-scatter each) + one fp32 gradient buffer "
        "4 B/trainable/world; perturb/restore element-wise on the local shards (SAP's kernels), no collective but a "
        "scalar norm" + twins,
        "Vaccine: per task micro-batch a first pass (forward + activation-only backward through every layer: 2 gathers, "
        "no reduce-scatter) before the main pass; the perturbations, one activation gradient per layer "
        "(layers*micro_batch*seq*hidden*2 B, bf16), held through the optimizer step; the first pass's captured outputs "
        "(as large) count beside them when grad_accum > 1 (the next micro-batch's first pass runs while they are held); "
        "the perturbing hook's one-layer fp32 temporaries not counted",
        f"RepNoise: trains on pairs, not task data: --micro-batch pairs per micro-batch = {2 * inp.micro_batch} "
        f"sequences x {ssl} tokens (--safety-seq-len; refusals and harmful answers in one forward and backward), "
        "'trained tokens' are theirs; beside that pass: the MMD's fp32 inputs, one hidden state's logit lens at a time "
        f"({LENS_BYTES_PER_LOGIT} B per logit: fp32 log-softmax, its incoming and outgoing gradient) and the lens's "
        "bf16 gradients for the L+1 hidden states until the backward reaches their layer; FLOPs + the lens: "
        f"(L+1) x harmful tokens x 2*V*h x (forward + checkpoint recompute + {bwd}x backward); the head's repeated calls "
        "are assumed not to re-gather it (ZeRO-3 keeps a module gathered that is used again soon: "
        "stage3_max_reuse_distance), so no extra communication",
        f"step time = compute + {1 - inp.overlap:g} * comm (overlap {inp.overlap:g}); the fully-overlapped bound "
        "max(compute, comm) is shown too",
    ]
    if note := METHOD_SECTIONS[inp.method].plan_note:  # where the method's column is another's (safety_mix: SFT's)
        lines.append(note)
    return lines


def plan(inp: PlanInputs) -> PlanResult:
    """The whole estimate: the steps above, composed for every column. Raises PlanError on bad input."""
    check_inputs(inp)
    m, gpu, world = resolve_model(inp.model), GPUS[inp.gpu], inp.nodes * inp.gpus_per_node
    if not inp.probe_layers or any(not 0 <= l < m.num_hidden_layers for l in inp.probe_layers):
        raise PlanError(f"--probe-layers {list(inp.probe_layers)}: each must be in [0, {m.num_hidden_layers - 1}]")
    n, bandwidth = parameters(m, inp), link(inp, gpu, world)
    usable = gpu.memory_bytes - inp.reserve_gib * GIB
    columns: dict[str, ColumnPlan] = {}
    for name, column in COLUMNS.items():
        memory, cpu_rank = column_memory(column, m, inp, n, world)
        total = float(sum(memory.values()))
        step = step_estimate(inp, gpu, world, bandwidth, column_flops(column, m, inp, n),
                             column_comm_bytes(column, m, inp, n, world), column.passes(m, inp)[0].tokens)
        columns[name] = ColumnPlan(memory, total, cpu_rank * inp.gpus_per_node, total <= usable, step,
                                   step.tokens_per_s / columns["sft"].step.tokens_per_s if columns else 1.0)
    return PlanResult(
        inputs=inp, model=m, gpu=gpu, world_size=world, total_params=n.total, trainable_params=n.trainable,
        lora_params=n.lora, largest_layer_params=n.largest_layer, gpu_capacity=gpu.memory_bytes, columns=columns,
        assumptions=assumptions(m, inp, gpu, world, n, bandwidth),
    )


def headline_column(inp: PlanInputs) -> str:
    """The column of the headline method (``--method``), as its section says
    (``MethodSection.plan_column``)."""
    return METHOD_SECTIONS[inp.method].plan_column


def headline_total(r: PlanResult) -> float:
    """Per-GPU bytes of the headline method (``--method``): its column's."""
    return r.columns[headline_column(r.inputs)].total


def headline_fits(r: PlanResult) -> bool:
    return headline_total(r) <= r.gpu_capacity - r.inputs.reserve_gib * GIB


def _headline_cpu(r: PlanResult) -> float:
    return r.columns[headline_column(r.inputs)].cpu_per_node


# --------------------------------------------------------------------------- when it does not fit

# The most nodes the "more nodes" option searches (per-GPU memory never grows with the node
# count: ZeRO-3 partitions the model states over all GPUs, the rest is per GPU).
MAX_NODES = 4096


@dataclass(frozen=True)
class FitOption:
    """One change that makes a job fit: the flags to add to the ``sap-ds plan`` command (which
    plan it again with the change), the headline method's per-GPU memory then, and what it
    means for the run (the config key, the cost)."""

    flags: tuple[str, ...]
    gpu_total: float
    note: str


def _planned(inp: PlanInputs, **changes) -> Optional[PlanResult]:
    """``inp`` planned again with ``changes``, if the job then fits (None if not, or if the
    change is not valid for this job)."""
    try:
        r = plan(dataclasses.replace(inp, **changes))
    except PlanError:
        return None
    return r if headline_fits(r) else None


def _largest_fitting(inp: PlanInputs, name: str, below: int, **also) -> Optional[tuple[int, PlanResult]]:
    """The largest value of the integer input ``name`` under ``below`` with which the job
    fits (memory shrinks with it), and that plan."""
    for value in range(below - 1, 0, -1):
        r = _planned(inp, **{name: value}, **also)
        if r is not None:
            return value, r
    return None


def fit_options(inp: PlanInputs) -> list[FitOption]:
    """What would make a job that does not fit (the headline method's per-GPU memory over the
    usable GPU memory) fit: each change planned again on its own, and only those that fit.

    Offload of the optimizer (ZeRO-Offload; of the parameters too only if that alone does not
    fit), LoRA instead of full fine-tuning, activation checkpointing, the largest smaller
    micro-batch (with checkpointing; gradient accumulation raised to keep the batch), the
    largest smaller batch of the headline column's own (``Column.batch``: SAP's safety batch,
    Booster's harmful batch), the fewest nodes, and the smallest larger GPU."""
    options: list[FitOption] = []
    examples = inp.micro_batch * inp.grad_accum
    if inp.offload == "none" and (r := _planned(inp, offload="optimizer")) is not None:
        options.append(FitOption(("--offload", "optimizer"), headline_total(r),
                                 f"ZeRO-Offload: optimizer states and fp32 gradients in CPU RAM, {_headline_cpu(r) / GIB:,.0f} "
                                 "GiB per node (zero_optimization.offload_optimizer in the DeepSpeed config); the CPU "
                                 "Adam step makes each step slower"))
    if inp.offload != "all" and not options and (r := _planned(inp, offload="all")) is not None:
        options.append(FitOption(("--offload", "all"), headline_total(r),
                                 f"the parameters in CPU RAM too, {_headline_cpu(r) / GIB:,.0f} GiB per node "
                                 "(ds_configs/zero3_offload.json); slower still"))
    if not inp.lora and (r := _planned(inp, lora=True)) is not None:
        options.append(FitOption(("--lora",), headline_total(r),
                                 f"LoRA r={inp.lora_r} on {','.join(inp.lora_targets)} instead of full fine-tuning "
                                 f"(lora.enabled=true): {r.trainable_params:,} trainable parameters"))
    if not inp.activation_checkpointing and (r := _planned(inp, activation_checkpointing=True)) is not None:
        options.append(FitOption(("--activation-checkpointing",), headline_total(r),
                                 "model.gradient_checkpointing=true: each layer's forward is recomputed in backward"))
    # a smaller micro-batch that divides the examples per step (1 always does), gradient accumulation
    # making up the rest: the same batch; with checkpointing too only if that alone does not fit
    smaller = [value for value in range(inp.micro_batch - 1, 0, -1) if examples % value == 0]
    for checkpointing in dict.fromkeys((inp.activation_checkpointing, True)):
        found = next(((value, r) for value in smaller if (r := _planned(inp, micro_batch=value, grad_accum=examples // value,
                                                                        activation_checkpointing=checkpointing))), None)
        if found is not None:
            value, r = found
            also = checkpointing and not inp.activation_checkpointing
            options.append(FitOption(("--micro-batch", str(value), "--grad-accum", str(examples // value))
                                     + (("--activation-checkpointing",) if also else ()), headline_total(r),
                                     f"train.micro_batch_size={value} train.grad_accum={examples // value}"
                                     + (" model.gradient_checkpointing=true" if also else "")
                                     + f": the same {examples} examples per GPU per step, in more micro-batches"))
            break
    knob = COLUMNS[headline_column(inp)].batch
    if knob is not None and (found := _largest_fitting(inp, knob.input, getattr(inp, knob.input))) is not None:
        value, r = found
        options.append(FitOption((knob.flag, str(value)), headline_total(r), f"{knob.key}={value}: {knob.cost}"))
    if _planned(inp, nodes=MAX_NODES) is not None:
        low, high = inp.nodes, MAX_NODES  # does not fit at low, fits at high: bisect (memory falls with nodes)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if _planned(inp, nodes=middle) is not None else (middle, high)
        r = plan(dataclasses.replace(inp, nodes=high))
        options.append(FitOption(("--nodes", str(high)), headline_total(r),
                                 f"the fewest nodes that fit: {high} x {inp.gpus_per_node} = {r.world_size} GPUs share "
                                 "the model states (ZeRO-3)"))
    current = GPUS[inp.gpu].memory_bytes
    for gpu in sorted((g for g in GPUS.values() if g.memory_bytes > current), key=lambda g: g.memory_bytes):
        if (r := _planned(inp, gpu=gpu.name)) is not None:
            options.append(FitOption(("--gpu", gpu.name), headline_total(r),
                                     f"the smallest GPU with more memory that fits: {gpu.note}"))
            break
    return options


def format_fit_options(r: PlanResult, options: list[FitOption]) -> str:
    """The lines ``sap-ds plan`` prints under a job that does not fit."""
    i = r.inputs
    usable = (r.gpu_capacity - i.reserve_gib * GIB) / GIB
    column = COLUMNS[headline_column(i)]
    if not options:
        return (f"No single change makes it fit (tried: offload, LoRA, activation checkpointing, a smaller micro-batch"
                f"{' or ' + column.batch.flag if column.batch else ''}, up to {MAX_NODES} nodes, a larger GPU): "
                f"shorten {column.seq_flag}, or combine changes (e.g. --lora --offload optimizer)")
    flags = [" ".join(o.flags) for o in options]
    width = max(map(len, flags))
    lines = [f"It fits with any one of these changes (each planned again with it alone; {i.method.upper()} per GPU, "
             f"{usable:.1f} GiB usable):"]
    lines += [f"  {text:<{width}}  {o.gpu_total / GIB:7.1f} GiB  {o.note}" for text, o in zip(flags, options)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GIB:9.2f} GiB"


def _rows(tables: list[dict[str, float]]) -> list[str]:
    """The memory items of every column, each once, in the order the columns list them: an
    item a column adds goes just before the next of its items already placed, or last."""
    order: list[str] = []
    for table in tables:
        keys = list(table)
        for index, key in enumerate(keys):
            if key not in order:
                successor = next((k for k in keys[index + 1:] if k in order), None)
                order.insert(order.index(successor) if successor is not None else len(order), key)
    return order


def format_table(r: PlanResult) -> str:
    i = r.inputs
    columns = list(r.columns.values())
    titles = [COLUMNS[name].title for name in r.columns]
    width = max(80, *(len(key) for c in columns for key in c.memory))
    lines = [
        f"sap-ds plan: {r.model.name} on {i.nodes} node(s) x {i.gpus_per_node} {r.gpu.name} "
        f"(world {r.world_size}), {'LoRA r=' + str(i.lora_r) if i.lora else 'full FT'}, offload {i.offload}, "
        f"seq {i.seq_len}, micro-batch {i.micro_batch}, grad-accum {i.grad_accum}, "
        f"checkpointing {'on' if i.activation_checkpointing else 'off'}",
        f"params: total {r.total_params:,}  trainable {r.trainable_params:,}"
        + (f"  (LoRA {r.lora_params:,})" if i.lora else "") + f"  largest module {r.largest_layer_params:,}",
        "",
        f"{'per-GPU memory':<{width + 2}}" + "".join(f" {t:>13}" for t in titles),
    ]
    row = lambda name, cells: f"  {name:<{width}}" + "".join(f" {c:>13}" for c in cells)  # noqa: E731
    for key in _rows([c.memory for c in columns]):
        lines.append(row(key, [_gib(c.memory[key]) if key in c.memory else "-" for c in columns]))
    cap = f"{r.gpu_capacity / GIB:.1f} GiB - {i.reserve_gib:g} reserve"
    lines.append(row(f"TOTAL per GPU (capacity {cap})", [_gib(c.total) for c in columns]))
    lines.append(row("fits", ["yes" if c.fits else "NO" for c in columns]))
    lines.append(row("CPU memory per node (offloaded states)", [_gib(c.cpu_per_node) for c in columns]))
    lines += ["", f"{'step estimate':<40}" + "".join(f" {t:>14}" for t in titles)]
    rows = [
        ("compute per step (s)", lambda s: f"{s.compute_s:.3f}"),
        ("ZeRO-3 comm per step (s)", lambda s: f"{s.comm_s:.3f}"),
        ("step time (s)", lambda s: f"{s.step_s:.3f}"),
        ("step time, comm fully overlapped (s)", lambda s: f"{s.step_s_full_overlap:.3f}"),
        ("trained tokens per step (global)", lambda s: f"{s.tokens_per_step:,}"),
        ("trained tokens/s (global)", lambda s: f"{s.tokens_per_s:,.0f}"),
        ("TFLOP per step per GPU", lambda s: f"{s.flops_per_step_per_gpu / 1e12:.1f}"),
        ("comm GB per step per GPU", lambda s: f"{s.comm_bytes_per_step_per_gpu / 1e9:.1f}"),
    ]
    for name, fmt in rows:
        lines.append(f"  {name:<38}" + "".join(f" {fmt(c.step):>14}" for c in columns))
    lines.append(f"  {'throughput over SFT':<38}" + "".join(f" {c.over_sft_throughput:>14.3f}" for c in columns))
    lines += ["", "assumptions:"] + [f"  - {a}" for a in r.assumptions]
    lines += ["", f"=> {i.method.upper()} needs {headline_total(r) / GIB:.1f} GiB per GPU "
              f"({'fits' if headline_fits(r) else 'does NOT fit'} on {r.gpu.name})"]
    return "\n".join(lines)


def _default(name: str):
    """The flag's default: ``PlanInputs``'s, a tuple written as the flag takes it (comma-separated)."""
    value = PlanInputs.__dataclass_fields__[name].default
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def build_parser() -> argparse.ArgumentParser:
    """Every flag has a help string (tests/test_plan.py checks it); the formatter appends its
    default, which is ``PlanInputs``'s."""
    p = argparse.ArgumentParser(prog="sap-ds plan", description=__doc__.split("\n\n")[0],
                                epilog="When the job does not fit, the changes that would make it fit are listed below "
                                "the table, each planned again on its own.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, default=argparse.SUPPRESS, help=f"HF config.json (or its folder) or one of: {', '.join(NAMED_MODELS)}")
    p.add_argument("--nodes", type=int, default=_default("nodes"), help="number of nodes (machines)")
    p.add_argument("--gpus-per-node", type=int, default=_default("gpus_per_node"),
                   help="GPUs per node; the world size is nodes x this")
    p.add_argument("--gpu", default=_default("gpu"), help=f"GPU model, one of: {', '.join(GPUS)}")
    p.add_argument("--offload", default=_default("offload"), help="ZeRO-Offload to CPU RAM: none | optimizer (fp32 "
                   "master, Adam states and grads) | all (the parameters too; ds_configs/zero3_offload.json)")
    p.add_argument("--method", default=_default("method"), help=f"{' | '.join(METHODS)}: the headline and the fit "
                   "hints (every column is shown; safety_mix is SFT's column)")
    p.add_argument("--lora", action="store_true", default=_default("lora"),
                   help="LoRA instead of full fine-tuning (lora.enabled)")
    p.add_argument("--lora-r", type=int, default=_default("lora_r"), help="LoRA rank (lora.r)")
    p.add_argument("--lora-targets", default=_default("lora_targets"), help="comma-separated module names LoRA adapts "
                   "(lora.target_modules)")
    p.add_argument("--lora-dropout", type=float, default=_default("lora_dropout"), help="LoRA dropout probability, 0 "
                   "to 1 (lora.dropout; above 0 it keeps the dropped inputs for backward)")
    p.add_argument("--seq-len", type=int, default=_default("seq_len"), help="tokens per task sequence (data.max_length)")
    p.add_argument("--micro-batch", type=int, default=_default("micro_batch"), help="task sequences per GPU per "
                   "forward/backward (train.micro_batch_size; RepNoise: pairs, 2 sequences of --safety-seq-len tokens "
                   "each)")
    p.add_argument("--grad-accum", type=int, default=_default("grad_accum"), help="micro-batches per optimizer step "
                   "(train.grad_accum)")
    p.add_argument("--safety-seq-len", type=int, default=_default("safety_seq_len"), help="tokens per safety sequence "
                   "(data.safety_max_length)")
    p.add_argument("--safety-batch", type=int, default=_default("safety_batch"),
                   help="safety pairs per GPU per safety pass, 2 sequences each (sap.safety_batch_size)")
    p.add_argument("--harmful-batch", type=int, default=_default("harmful_batch"),
                   help="harmful sequences of --safety-seq-len tokens per GPU in each of Booster's two harmful "
                   "passes (booster.harmful_batch_size)")
    p.add_argument("--probe-layers", default=_default("probe_layers"), help="comma-separated decoder-layer indices of "
                   "the SAP probe, 0-based (sap.probe_layers)")
    p.add_argument("--safety-every", type=int, default=_default("safety_every"), help="steps between safety-direction "
                   "passes (sap.safety_every)")
    p.add_argument("--probe-fraction", type=float, default=_default("probe_fraction"), help="share of steps that run "
                   "the probe pass, in (0, 1] (sap.probe_fraction)")
    p.add_argument("--probe-timing", default=_default("probe_timing"), help="sap.probe_timing: next_step (one probe "
                   "pass, at W') or same_step (the paper's: also the pass at W before the main pass)")
    p.add_argument("--probe-micro-batches", type=int, default=_default("probe_micro_batches"),
                   help="sap.probe_micro_batches: the probe passes on the first k of --grad-accum micro-batches "
                   "(default: %(default)s = all of them)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   default=_default("activation_checkpointing"),
                   help="recompute each decoder layer's forward in backward, keeping only its input "
                   "(model.gradient_checkpointing)")
    p.add_argument("--mfu", type=float, default=_default("mfu"), help="achieved fraction of the bf16 dense peak, in "
                   "(0, 1]")
    p.add_argument("--internode-gbps", type=float, default=_default("internode_gbps"), help="network Gb/s per GPU "
                   "(400 = InfiniBand NDR)")
    p.add_argument("--overlap", type=float, default=_default("overlap"), help="fraction of ZeRO-3 communication "
                   "hidden behind compute, 0 to 1")
    p.add_argument("--reserve-gib", type=float, default=_default("reserve_gib"), help="per-GPU memory in GiB kept for "
                   "CUDA context/NCCL/fragmentation")
    p.add_argument("--prefetch-bucket-size", type=int, default=_default("prefetch_bucket_size"), help="elements; the "
                   "DeepSpeed config's zero_optimization.stage3_prefetch_bucket_size")
    p.add_argument("--param-persistence-threshold", type=int, default=_default("param_persistence_threshold"),
                   help="elements; parameters this small stay whole on every GPU (stage3_param_persistence_threshold)")
    p.add_argument("--reduce-bucket-size", type=int, default=_default("reduce_bucket_size"), help="elements; gradients "
                   "reduced per bucket (zero_optimization.reduce_bucket_size)")
    p.add_argument("--sub-group-size", type=int, default=_default("sub_group_size"), help="elements; the optimizer "
                   "steps the partition in sub-groups this large (zero_optimization.sub_group_size)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (its fit_options: for a job that "
                   "does not fit, the changes with which it would)")
    return p


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PlanError(f"{flag}: expected comma-separated integers, got '{text}'") from None


def inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    """The flags as ``PlanInputs`` (each flag's dest is its field's name); the two lists are
    comma-separated on the command line."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PlanInputs)}
    values["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    values["probe_layers"] = _int_list(args.probe_layers, "--probe-layers")
    return PlanInputs(**values)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error (exit 2) or --help (exit 0)
        return int(exc.code or 0)
    return run_command(lambda: print_plan(args), user_errors=(PlanError,), command="sap-ds plan")


def print_plan(args: argparse.Namespace) -> int:
    """The table (or ``--json``), and under a job that does not fit, what would make it fit."""
    result = plan(inputs_from_args(args))
    options = [] if headline_fits(result) else fit_options(result.inputs)
    if args.json:
        text = json.dumps({**result.as_dict(), "fit_options": [dataclasses.asdict(o) for o in options]}, indent=2)
    else:
        text = format_table(result) + ("" if headline_fits(result) else "\n\n" + format_fit_options(result, options))
    try:
        print(text)
    except BrokenPipeError:  # `sap-ds plan ... | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
