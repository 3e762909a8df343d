"""``sap-ds plan``: size a ZeRO-3 (SFT, SAP or safety_mix) job before spending a GPU hour.

Given a model (a Hugging Face ``config.json`` or a named size), a cluster shape and the
training settings, it prints the per-GPU memory (model states, ZeRO-3 working set,
activations, logits, SAP buffers), the CPU memory per node under offload, and an
estimated step time and throughput for vanilla SFT and for SAP, with every assumption.

Everything is closed-form arithmetic; nothing here imports torch or DeepSpeed, so it runs
anywhere in milliseconds. The cost model is a few named steps (the parameter counts, the
model states, the ZeRO-3 working set, the task pass, each method's buffers, the FLOPs,
the communication, the step time), each a function that says what it counts; ``plan(...)``
composes them, ``main(argv)`` is the CLI. Each input's default is written once, in
``PlanInputs`` (the flags take theirs from it); where an input is a run-config key, its
default is that key's.

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
from typing import Optional, Sequence

from sap_ds.config.methods import METHOD_SECTIONS, SapConfig
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
    tokens_per_step: int  # global task tokens per optimizer step
    tokens_per_s: float
    flops_per_step_per_gpu: float
    comm_bytes_per_step_per_gpu: float


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
    gpu_memory_sft: dict[str, float]  # item -> bytes per GPU
    gpu_memory_sap: dict[str, float]
    gpu_memory_lisa: dict[str, float]  # SFT's plus the anchor (safety_mix: SFT's exactly)
    gpu_total_sft: float
    gpu_total_sap: float
    gpu_total_lisa: float
    cpu_memory_per_node_sft: float
    cpu_memory_per_node_sap: float
    cpu_memory_per_node_lisa: float
    gpu_capacity: int
    fits_sft: bool
    fits_sap: bool
    fits_lisa: bool
    sft: StepEstimate
    sap: StepEstimate
    sap_over_sft_throughput: float
    assumptions: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def check_inputs(inp: PlanInputs) -> None:
    """Every input that can be checked without the model; PlanError names the flag."""
    if inp.nodes <= 0:
        raise PlanError(f"--nodes must be a positive integer (got {inp.nodes})")
    if inp.gpus_per_node <= 0:
        raise PlanError(f"--gpus-per-node must be a positive integer (got {inp.gpus_per_node})")
    for name in ("seq_len", "micro_batch", "grad_accum", "lora_r", "safety_every", "safety_seq_len", "safety_batch"):
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


def task_pass(m: ModelSpec, inp: PlanInputs) -> dict[str, int]:
    """Activations (``activation_bytes``) and fp32 logits of one task micro-batch: the
    forward/backward peak every method has."""
    return {
        "activations (task micro-batch)": activation_bytes(m, inp.micro_batch, inp.seq_len, inp.activation_checkpointing,
                                                           **_lora_shapes(inp)),
        "logits fp32 (micro_batch*seq*vocab*4)": logits_bytes(m, inp.micro_batch, inp.seq_len),
    }


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
    forward/backward peak counts (the callers subtract it)."""
    return 4 * min(inp.sub_group_size, n.trainable / world) if inp.offload == "none" else 0


def sft_memory(m: ModelSpec, inp: PlanInputs, n: Parameters, world: int) -> tuple[dict[str, float], float]:
    """SFT's per-GPU bytes (model states, ZeRO-3 working set, task pass, optimizer-step copy)
    and CPU bytes per rank: the base every other column adds to."""
    mem, cpu_rank = model_states(inp, n, world)
    task = task_pass(m, inp)
    mem.update(zero3_working_set(inp, n))
    mem.update(task)
    mem[STEP_COPY] = max(0, optimizer_step_copy(inp, n, world) - sum(task.values()))
    return mem, cpu_rank


def sap_memory(m: ModelSpec, inp: PlanInputs, n: Parameters, world: int, sft: dict[str, float],
               cpu_rank: float) -> tuple[dict[str, float], float]:
    """SFT's plus SAP's buffers: the safety pass (2 sequences per pair of ``safety_seq_len``
    tokens; its peak is the larger of the two passes, not their sum), the fp32 safety
    direction (4 B per trainable parameter over the world, on the CPU with the master under
    offload, where the perturb/restore twins' chunk of temporaries joins it) and the probe
    (value, Adam m and v per probed layer)."""
    mem = dict(sft)
    task = sum(task_pass(m, inp).values())
    safety = activation_bytes(m, 2 * inp.safety_batch, inp.safety_seq_len, inp.activation_checkpointing,
                              **_lora_shapes(inp)) + logits_bytes(m, 2 * inp.safety_batch, inp.safety_seq_len)
    extra = max(0, safety - task)
    mem["safety pass activations+logits beyond the task pass"] = extra
    mem[STEP_COPY] = max(0, optimizer_step_copy(inp, n, world) - task - extra)
    direction = _div(4 * n.trainable, world)
    if inp.offload == "none":
        mem["SAP direction buffer (fp32, 4 B/trainable / world)"] = direction
    else:
        mem["SAP direction buffer (on CPU with the master)"] = 0
        mem[OFFLOAD_TWIN] = 0
        cpu_rank = cpu_rank + direction + offload_twin_transient(inp, n, world)
    mem["SAP probe (layers*hidden*4 B * 3: value, Adam m, v)"] = len(inp.probe_layers) * m.hidden_size * 4 * 3
    return mem, cpu_rank


def offload_twin_transient(inp: PlanInputs, n: Parameters, world: int) -> float:
    """CPU bytes per rank the offload twins hold while perturbing or restoring: one chunk's
    temporaries, or one sub-group's where the rank's sub-group is smaller than a chunk."""
    return OFFLOAD_TWIN_BYTES_PER_ELEMENT * min(OFFLOAD_TWIN_CHUNK, inp.sub_group_size, n.trainable / world)


def lisa_memory(inp: PlanInputs, n: Parameters, world: int, sft: dict[str, float],
                cpu_rank: float) -> tuple[dict[str, float], float]:
    """SFT's plus Lisa's anchor: one fp32 copy per flat group, shaped like the master shard
    (sap_ds/methods/lisa.py), on the CPU with the master under offload."""
    mem = dict(sft)
    anchor = _div(4 * n.trainable, world)
    if inp.offload == "none":
        mem["Lisa anchor (fp32, 4 B/trainable / world)"] = anchor
        return mem, cpu_rank
    mem["Lisa anchor (on CPU with the master)"] = 0
    return mem, cpu_rank + anchor


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


def _passes_per_forward(inp: PlanInputs) -> tuple[int, int]:
    """(backward, recompute) cost in forwards: a backward is 2 forwards under full
    fine-tuning (activation and weight gradients), 1 under LoRA (no weight gradients for the
    frozen weights); activation checkpointing recomputes 1 forward."""
    return (1 if inp.lora else 2), (1 if inp.activation_checkpointing else 0)


def task_tokens_per_gpu(inp: PlanInputs) -> int:
    """Task tokens per GPU per optimizer step."""
    return inp.micro_batch * inp.seq_len * inp.grad_accum


def sft_flops(m: ModelSpec, inp: PlanInputs, n: Parameters) -> float:
    """Per-GPU FLOPs of an SFT step: forward (``forward_flops_per_token``, LoRA's matmuls
    included), backward and recompute on the task tokens."""
    bwd, ckpt = _passes_per_forward(inp)
    return task_tokens_per_gpu(inp) * forward_flops_per_token(m, inp.seq_len, n.lora) * (1 + bwd + ckpt)


def sap_flops(m: ModelSpec, inp: PlanInputs, n: Parameters, probe: ProbeSchedule) -> float:
    """SFT's, plus the safety pass (forward, backward, recompute on the safety batch, every
    ``safety_every`` steps) and the probe passes (a forward, and a backward without weight
    gradients down to the lowest probe layer, with its recompute, on ``probe_fraction`` of
    the steps and ``probe.micro_batches`` of the micro-batches)."""
    bwd, ckpt = _passes_per_forward(inp)
    f_task = forward_flops_per_token(m, inp.seq_len, n.lora)
    f_safe = forward_flops_per_token(m, inp.safety_seq_len, n.lora)
    safety = (2 * inp.safety_batch * inp.safety_seq_len) * f_safe * (1 + bwd + ckpt) / inp.safety_every
    probing = probe.passes * task_tokens_per_gpu(inp) * f_task * (1 + probe.fraction_above * (1 + ckpt)) * \
        inp.probe_fraction * probe.micro_batches / inp.grad_accum
    return sft_flops(m, inp, n) + safety + probing


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


def sft_comm_bytes(inp: PlanInputs, n: Parameters, world: int) -> float:
    """Per-GPU bytes an SFT step moves: per micro-batch, 2 all-gathers of the parameters
    (forward, backward) and 1 reduce-scatter of the gradients."""
    gather, reduce_scatter = _ring(n, world)
    return inp.grad_accum * (2 * gather + reduce_scatter)


def sap_comm_bytes(inp: PlanInputs, n: Parameters, world: int, probe: ProbeSchedule) -> float:
    """SFT's, plus the safety pass's (2 gathers + 1 reduce-scatter, every ``safety_every``
    steps) and the probe passes' (a forward's gather and a backward's above the lowest probe
    layer, per probed micro-batch)."""
    gather, reduce_scatter = _ring(n, world)
    return sft_comm_bytes(inp, n, world) + (2 * gather + reduce_scatter) / inp.safety_every + \
        probe.passes * probe.micro_batches * inp.probe_fraction * gather * (1 + probe.fraction_above)


def step_estimate(inp: PlanInputs, gpu: GpuSpec, world: int, bandwidth: Link, flops: float,
                  comm_bytes: float) -> StepEstimate:
    """Step time: compute (FLOPs at ``mfu`` of the bf16 dense peak) plus the communication
    not hidden behind it (``overlap``); the fully-overlapped bound too; global task tokens/s."""
    compute = flops / (gpu.bf16_tflops * 1e12 * inp.mfu)
    comm = comm_bytes / bandwidth.bytes_per_s if world > 1 else 0.0
    step = compute + (1 - inp.overlap) * comm
    tokens = task_tokens_per_gpu(inp) * world
    return StepEstimate(compute, comm, step, max(compute, comm), tokens, tokens / step, flops, comm_bytes)


def assumptions(m: ModelSpec, inp: PlanInputs, gpu: GpuSpec, world: int, n: Parameters, probe: ProbeSchedule,
                bandwidth: Link) -> list[str]:
    """What the estimate assumes, in the order of the steps above (printed under the table)."""
    bwd, _ = _passes_per_forward(inp)
    sb, ssl = inp.safety_batch, inp.safety_seq_len
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
        f"SAP: safety pass on {sb} pair(s) = {2 * sb} sequences x {ssl} tokens (peak is the max of task and safety pass, "
        "not the sum); direction buffer fp32 4 B/trainable/world; probe len(layers)*hidden*4 B*3"
        + ("" if inp.offload == "none" else f"; under offload, perturb/restore temporaries on CPU: "
           f"{OFFLOAD_TWIN_BYTES_PER_ELEMENT} B * min({OFFLOAD_TWIN_CHUNK:,}-element chunk, sub-group) per rank"),
        f"usable GPU memory: {gpu.memory_bytes / GIB:.1f} GiB ({gpu.name}) - {inp.reserve_gib:g} GiB reserve "
        "(CUDA context, NCCL, fragmentation)",
        f"FLOPs: forward = 2*(matmul weights incl. lm_head) + 4*layers*seq*q_dim per token (attention, non-causal count); "
        f"backward = {bwd}x forward ({'LoRA: activation grads only' if inp.lora else 'full FT: activation + weight grads'})"
        + ("; checkpointing recomputes 1 forward" if inp.activation_checkpointing else ""),
        f"SAP FLOPs per step: + safety pass (fwd+bwd on {2 * sb}x{ssl} tokens per GPU, every {inp.safety_every} step(s)) "
        f"+ {probe.passes} probe pass(es) ({inp.probe_timing}) on {probe.micro_batches} of {inp.grad_accum} task "
        f"micro-batch(es) x {inp.probe_fraction:g} (forward + backward without weight grads down to layer "
        f"{probe.lowest_layer}: {probe.fraction_above:.3f} of the layers)",
        f"compute time = FLOPs / ({gpu.bf16_tflops:g} TFLOP/s bf16 dense * MFU {inp.mfu:g})",
        "ZeRO-3 comm per micro-batch: 2 all-gathers of all params (forward, backward) + 1 reduce-scatter of the trainable "
        "grads, each 2 B * N * (world-1)/world per GPU; SAP adds 2 gathers + 1 reduce-scatter (safety pass) and "
        "1 + (fraction above the lowest probe layer) gathers per probe pass",
        f"bandwidth: {bandwidth.note}",
        "Lisa: SFT's step (an alignment step trains on an alignment batch of the task batch's size instead; the "
        "proximal term is element-wise on the local shards, no collective) + the anchor, fp32 4 B/trainable/world",
        f"step time = compute + {1 - inp.overlap:g} * comm (overlap {inp.overlap:g}); the fully-overlapped bound "
        "max(compute, comm) is shown too",
    ]
    if note := METHOD_SECTIONS[inp.method].plan_note:  # where the method's column is another's (safety_mix: SFT's)
        lines.append(note)
    return lines


def plan(inp: PlanInputs) -> PlanResult:
    """The whole estimate: the steps above, composed. Raises PlanError on bad input."""
    check_inputs(inp)
    m, gpu, world = resolve_model(inp.model), GPUS[inp.gpu], inp.nodes * inp.gpus_per_node
    if not inp.probe_layers or any(not 0 <= l < m.num_hidden_layers for l in inp.probe_layers):
        raise PlanError(f"--probe-layers {list(inp.probe_layers)}: each must be in [0, {m.num_hidden_layers - 1}]")
    n, probe, bandwidth = parameters(m, inp), probe_schedule(m, inp), link(inp, gpu, world)
    sft_mem, sft_cpu = sft_memory(m, inp, n, world)
    sap_mem, sap_cpu = sap_memory(m, inp, n, world, sft_mem, sft_cpu)
    lisa_mem, lisa_cpu = lisa_memory(inp, n, world, sft_mem, sft_cpu)
    columns = {"sft": sft_mem, "sap": sap_mem, "lisa": lisa_mem}
    totals = {column: float(sum(mem.values())) for column, mem in columns.items()}
    usable = gpu.memory_bytes - inp.reserve_gib * GIB
    sft = step_estimate(inp, gpu, world, bandwidth, sft_flops(m, inp, n), sft_comm_bytes(inp, n, world))
    sap = step_estimate(inp, gpu, world, bandwidth, sap_flops(m, inp, n, probe), sap_comm_bytes(inp, n, world, probe))
    return PlanResult(
        inputs=inp, model=m, gpu=gpu, world_size=world, total_params=n.total, trainable_params=n.trainable,
        lora_params=n.lora, largest_layer_params=n.largest_layer,
        gpu_memory_sft=sft_mem, gpu_memory_sap=sap_mem, gpu_memory_lisa=lisa_mem, gpu_total_sft=totals["sft"],
        gpu_total_sap=totals["sap"], gpu_total_lisa=totals["lisa"], cpu_memory_per_node_sft=sft_cpu * inp.gpus_per_node,
        cpu_memory_per_node_sap=sap_cpu * inp.gpus_per_node, cpu_memory_per_node_lisa=lisa_cpu * inp.gpus_per_node,
        gpu_capacity=gpu.memory_bytes, fits_sft=totals["sft"] <= usable, fits_sap=totals["sap"] <= usable,
        fits_lisa=totals["lisa"] <= usable, sft=sft, sap=sap,
        sap_over_sft_throughput=sap.tokens_per_s / sft.tokens_per_s,
        assumptions=assumptions(m, inp, gpu, world, n, probe, bandwidth),
    )


def headline_column(inp: PlanInputs) -> str:
    """The column of the headline method (``--method``): "sft", "sap" or "lisa", as its
    section says (``MethodSection.plan_column``)."""
    return METHOD_SECTIONS[inp.method].plan_column


def headline_total(r: PlanResult) -> float:
    """Per-GPU bytes of the headline method (``--method``): its column's."""
    return {"sft": r.gpu_total_sft, "sap": r.gpu_total_sap, "lisa": r.gpu_total_lisa}[headline_column(r.inputs)]


def headline_fits(r: PlanResult) -> bool:
    return headline_total(r) <= r.gpu_capacity - r.inputs.reserve_gib * GIB


def _headline_cpu(r: PlanResult) -> float:
    return {"sft": r.cpu_memory_per_node_sft, "sap": r.cpu_memory_per_node_sap,
            "lisa": r.cpu_memory_per_node_lisa}[headline_column(r.inputs)]


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
    micro-batch (with checkpointing; gradient accumulation raised to keep the batch), for SAP
    the largest smaller safety batch, the fewest nodes, and the smallest larger GPU."""
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
    if headline_column(inp) == "sap" and (found := _largest_fitting(inp, "safety_batch", inp.safety_batch)) is not None:
        value, r = found
        options.append(FitOption(("--safety-batch", str(value)), headline_total(r),
                                 f"sap.safety_batch_size={value}: fewer safety pairs per GPU per step (a noisier "
                                 "safety direction)"))
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
    if not options:
        return (f"No single change makes it fit (tried: offload, LoRA, activation checkpointing, a smaller micro-batch"
                f"{' or safety batch' if headline_column(i) == 'sap' else ''}, up to {MAX_NODES} nodes, a larger GPU): "
                "shorten "
                "--seq-len, or combine changes (e.g. --lora --offload optimizer)")
    flags = [" ".join(o.flags) for o in options]
    width = max(map(len, flags))
    lines = [f"It fits with any one of these changes (each planned again with it alone; {i.method.upper()} per GPU, "
             f"{usable:.1f} GiB usable):"]
    lines += [f"  {text:<{width}}  {o.gpu_total / GIB:7.1f} GiB  {o.note}" for text, o in zip(flags, options)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GIB:9.2f} GiB"


def format_table(r: PlanResult) -> str:
    i = r.inputs
    lines = [
        f"sap-ds plan: {r.model.name} on {i.nodes} node(s) x {i.gpus_per_node} {r.gpu.name} "
        f"(world {r.world_size}), {'LoRA r=' + str(i.lora_r) if i.lora else 'full FT'}, offload {i.offload}, "
        f"seq {i.seq_len}, micro-batch {i.micro_batch}, grad-accum {i.grad_accum}, "
        f"checkpointing {'on' if i.activation_checkpointing else 'off'}",
        f"params: total {r.total_params:,}  trainable {r.trainable_params:,}"
        + (f"  (LoRA {r.lora_params:,})" if i.lora else "") + f"  largest module {r.largest_layer_params:,}",
        "",
        f"{'per-GPU memory':<82} {'SFT':>13} {'SAP':>13} {'Lisa':>13}",
    ]
    cell = lambda table, key: _gib(table[key]) if key in table else "-"  # noqa: E731
    for key in dict.fromkeys([*r.gpu_memory_sap, *r.gpu_memory_lisa]):
        lines.append(f"  {key:<80} {cell(r.gpu_memory_sft, key):>13} {cell(r.gpu_memory_sap, key):>13} "
                     f"{cell(r.gpu_memory_lisa, key):>13}")
    cap = f"{r.gpu_capacity / GIB:.1f} GiB - {i.reserve_gib:g} reserve"
    yes = lambda fits: "yes" if fits else "NO"  # noqa: E731
    lines.append(f"  {'TOTAL per GPU (capacity ' + cap + ')':<80} {_gib(r.gpu_total_sft):>13} {_gib(r.gpu_total_sap):>13} "
                 f"{_gib(r.gpu_total_lisa):>13}")
    lines.append(f"  {'fits':<80} {yes(r.fits_sft):>13} {yes(r.fits_sap):>13} {yes(r.fits_lisa):>13}")
    lines.append(f"  {'CPU memory per node (offloaded states)':<80} {_gib(r.cpu_memory_per_node_sft):>13} "
                 f"{_gib(r.cpu_memory_per_node_sap):>13} {_gib(r.cpu_memory_per_node_lisa):>13}")
    lines += ["", f"{'step estimate':<40} {'SFT':>14} {'SAP':>14}"]
    rows = [
        ("compute per step (s)", lambda s: f"{s.compute_s:14.3f}"),
        ("ZeRO-3 comm per step (s)", lambda s: f"{s.comm_s:14.3f}"),
        ("step time (s)", lambda s: f"{s.step_s:14.3f}"),
        ("step time, comm fully overlapped (s)", lambda s: f"{s.step_s_full_overlap:14.3f}"),
        ("task tokens per step (global)", lambda s: f"{s.tokens_per_step:14,}"),
        ("task tokens/s (global)", lambda s: f"{s.tokens_per_s:14,.0f}"),
        ("TFLOP per step per GPU", lambda s: f"{s.flops_per_step_per_gpu / 1e12:14.1f}"),
        ("comm GB per step per GPU", lambda s: f"{s.comm_bytes_per_step_per_gpu / 1e9:14.1f}"),
    ]
    for name, fmt in rows:
        lines.append(f"  {name:<38} {fmt(r.sft)} {fmt(r.sap)}")
    lines.append(f"  {'SAP/SFT throughput':<38} {'':>14} {r.sap_over_sft_throughput:14.3f}")
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
    p.add_argument("--method", default=_default("method"), help=f"{' | '.join(METHODS)}: the headline (SFT, SAP and "
                   "Lisa are always shown; safety_mix is SFT's column)")
    p.add_argument("--lora", action="store_true", default=_default("lora"),
                   help="LoRA instead of full fine-tuning (lora.enabled)")
    p.add_argument("--lora-r", type=int, default=_default("lora_r"), help="LoRA rank (lora.r)")
    p.add_argument("--lora-targets", default=_default("lora_targets"), help="comma-separated module names LoRA adapts "
                   "(lora.target_modules)")
    p.add_argument("--lora-dropout", type=float, default=_default("lora_dropout"), help="LoRA dropout probability, 0 "
                   "to 1 (lora.dropout; above 0 it keeps the dropped inputs for backward)")
    p.add_argument("--seq-len", type=int, default=_default("seq_len"), help="tokens per task sequence (data.max_length)")
    p.add_argument("--micro-batch", type=int, default=_default("micro_batch"), help="task sequences per GPU per "
                   "forward/backward (train.micro_batch_size)")
    p.add_argument("--grad-accum", type=int, default=_default("grad_accum"), help="micro-batches per optimizer step "
                   "(train.grad_accum)")
    p.add_argument("--safety-seq-len", type=int, default=_default("safety_seq_len"), help="tokens per safety sequence "
                   "(data.safety_max_length)")
    p.add_argument("--safety-batch", type=int, default=_default("safety_batch"),
                   help="safety pairs per GPU per safety pass, 2 sequences each (sap.safety_batch_size)")
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
        text = json.dumps({**dataclasses.asdict(result), "fit_options": [dataclasses.asdict(o) for o in options]}, indent=2)
    else:
        text = format_table(result) + ("" if headline_fits(result) else "\n\n" + format_fit_options(result, options))
    try:
        print(text)
    except BrokenPipeError:  # `sap-ds plan ... | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
