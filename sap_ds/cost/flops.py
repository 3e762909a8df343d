"""Model FLOPs of one SFT or SAP step (docs/design.md, "Cost"), from real token counts.

The model is a Llama-style decoder (``sap_ds.cost.model_spec.ModelSpec``, read from the HF
config.json: hidden h, layers L, heads, kv heads, intermediate I, vocab V). FLOPs count
a multiply-add as 2. Per token and per decoder layer:

    M   = 2 * (h*q + 2*h*kv + q*h + 3*h*I)              base linears (q,k,v,o, gate,up,down)
    M_a = 2 * sum_t r * (d_in_t + d_out_t)              LoRA adapters on the targeted linears (0 without LoRA)
    H   = 2 * V * h                                     lm_head (once per token, tied or not)

and per sequence of n real tokens and per layer, the attention core (QK^T and AV):

    A(n) = 2 * q * n^2     causal: half of the 4 * q * n^2 of the full n x n products
                           (``causal=False`` counts the full square)

with q = heads * head_dim and kv = kv_heads * head_dim. A pass over a batch of real
sequence lengths {n} costs:

    forward            F   = sum_n [ n * (L*(M + M_a) + H) + L * A(n) ]
    backward, full FT  B_f = 2 * F                      activation grads + weight grads
    backward, LoRA     B_l = sum_n [ n * (L*(M + 2*M_a) + H) + 2 * L * A(n) ]
                             frozen weights get activation grads only (1x their forward),
                             the adapters activation + weight grads (2x), the attention
                             core has no weights and costs 2x its forward either way:
                             B_l is about 1x F
    probe backward     B_p = sum_n [ n * (L_p*(M + M_a) + H) + 2 * L_p * A(n) ]
                             activation grads only (``autograd.grad`` w.r.t. the probe),
                             through lm_head and the L_p = L - 1 - l_min decoder blocks
                             above the lowest probe layer l_min (the probe sits on block
                             l_min's output and the graph is cut below it)

One optimizer step, with T the task batch and S the safety batch (safe + harmful
sequences) of the step, all ranks together:

    SFT step = F(T) + B(T)                                     B = B_f or B_l
    SAP step = SFT step + s * (F(S) + B(S)) + p * q * (F(T) + B_p(T))

RepNoise adds its logit lens: each of the K = L + 1 hidden states of the harmful half of its
pairs (lengths {n_h}) through the LM head, forward and backward (activation grads; the head's
weight grads too in full fine-tuning):

    lens   = K * sum n_h * H * (1 + b)                 b = 2 full FT, 1 LoRA

where s and p are how often the safety pass and the probe step run: 1 and 1 for the
authors' settings; observed per step in training and in the benchmark (0 or 1 each step:
the passes the step ran, ``SapMethod.extra_passes``); ``sap_ds.sap.step.nominal_shares``
gives the long-run values of SAP's schedule for ``safety_every`` k and ``probe_fraction`` f.
q is the number of probe passes
on the task batch per probe step (``SapConfig.probe_passes``): 1 under
``sap.probe_timing: next_step`` (the pass at W'), 2 under ``same_step`` (also the pass at W
before the main pass; the same forward and probe backward), times k / grad_accum when
``sap.probe_micro_batches`` k runs them on only k of the step's micro-batches
(``SapConfig.probe_share``; an average: the k may hold more or fewer tokens than the
rest). The ideal throughput ratio of
SAP over SFT on the same task batches is SFT FLOPs / SAP FLOPs (FLOPs per task token).

Check against docs/design.md ("Cost"): a deep model (L -> inf, probe layer near the bottom, so
L_p / L -> 1), attention and lm_head negligible, safety tokens = task tokens:
full FT  SFT = 3F, SAP = 3F + 3F + (F + F) = 8F   -> ratio 3/8 = 0.375 (~0.38)
LoRA     SFT = 2F, SAP = 2F + 2F + (F + F) = 6F   -> ratio 2/6 = 0.333 (~0.34)
same_step (q = 2): full FT 3F / 10F = 0.30, LoRA 2F / 8F = 0.25

Excluded: norms, activations, softmax, rotary, the loss (O(n*h) or O(n*V) element-wise
work), the embedding lookup (no FLOPs), padding tokens (``padded`` counts are reported
separately by the benchmark), optimizer FLOPs, ZeRO-3 communication, and SAP's perturb /
restore element-wise kernels (memory-bound, O(trainable params)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from sap_ds.cost.model_spec import ModelSpec, model_from_config

FORMULA = (
    "per token and layer M = 2*(linear weights), M_a = 2*r*(d_in+d_out) per LoRA target; lm_head H = 2*V*h; "
    "attention core per layer and sequence A(n) = 2*q_dim*n^2 (causal half of 4*q_dim*n^2); "
    "forward F = sum_n[n*(L*(M+M_a)+H) + L*A(n)] on real (unpadded) lengths; "
    "backward: full FT 2F; LoRA sum_n[n*(L*(M+2*M_a)+H) + 2*L*A(n)] (~1F, activation grads for frozen weights); "
    "probe backward sum_n[n*(Lp*(M+M_a)+H) + 2*Lp*A(n)], Lp = L-1-lowest probe layer (activation grads only); "
    "SFT step = F(task)+B(task); SAP step = SFT + s*(F(safety)+B(safety)) + p*q*(F(task)+B_probe(task)), "
    "RepNoise's logit lens K*sum(n_harmful)*H*(1+b), K = L+1 hidden states, b = 2 full FT / 1 LoRA, "
    "s, p = 1 on steps where the safety / probe pass ran (observed), else 0; "
    "q = probe passes per probe step: 1 (probe_timing next_step: at W'), 2 (same_step: at W' and at W); "
    "ideal_ratio = SFT FLOPs / SAP FLOPs on the same task batches"
)

PASSES = ("task_forward", "task_backward", "safety_forward", "safety_backward", "probe_forward", "probe_backward",
          "lens_forward", "lens_backward")


@dataclass(frozen=True)
class FlopsModel:
    spec: ModelSpec
    lora_r: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = ()
    causal: bool = True

    @property
    def lora(self) -> bool:
        return self.lora_r > 0

    # ---- per-token / per-sequence building blocks

    def layer_matmul(self) -> int:
        """M: FLOPs per token of one decoder layer's base linears."""
        return 2 * sum(a * b for a, b in self.spec.linear_shapes().values())

    def layer_lora(self) -> int:
        """M_a: FLOPs per token of one decoder layer's LoRA adapters (forward)."""
        if not self.lora:
            return 0
        shapes = self.spec.linear_shapes()
        unknown = [t for t in self.lora_targets if t not in shapes]
        if unknown:
            raise ValueError(f"unknown LoRA target module(s) {unknown}; valid: {', '.join(shapes)}")
        return 2 * sum(self.lora_r * (shapes[t][0] + shapes[t][1]) for t in self.lora_targets)

    def head(self) -> int:
        """H: lm_head FLOPs per token."""
        return 2 * self.spec.vocab_size * self.spec.hidden_size

    def attention(self, n: int) -> int:
        """A(n): attention-core FLOPs of one layer for one sequence of n tokens."""
        full = 4 * self.spec.q_dim * n * n
        return full // 2 if self.causal else full

    def forward_per_token(self, seq: int) -> float:
        """F per token for sequences of length ``seq`` (the usual 'per-token forward FLOPs')."""
        L = self.spec.num_hidden_layers
        return L * (self.layer_matmul() + self.layer_lora()) + self.head() + L * self.attention(seq) / seq

    # ---- passes over a batch of real sequence lengths

    def _sum(self, lengths: Iterable[int], per_token: int, attn_layers: float) -> int:
        lengths = [int(n) for n in lengths]
        return sum(n * per_token for n in lengths) + int(round(attn_layers * sum(self.attention(n) for n in lengths)))

    def forward(self, lengths: Sequence[int]) -> int:
        L = self.spec.num_hidden_layers
        return self._sum(lengths, L * (self.layer_matmul() + self.layer_lora()) + self.head(), L)

    def backward(self, lengths: Sequence[int]) -> int:
        """Training backward: 2x forward (full FT), activation grads only for frozen weights (LoRA)."""
        if not self.lora:
            return 2 * self.forward(lengths)
        L = self.spec.num_hidden_layers
        return self._sum(lengths, L * (self.layer_matmul() + 2 * self.layer_lora()) + self.head(), 2 * L)

    def probe_layers_above(self, lowest_probe_layer: int) -> int:
        L = self.spec.num_hidden_layers
        lowest = lowest_probe_layer % L
        return L - 1 - lowest

    def probe_backward(self, lengths: Sequence[int], lowest_probe_layer: int) -> int:
        """Activation-grad backward from the loss down to the lowest probe layer's output."""
        above = self.probe_layers_above(lowest_probe_layer)
        return self._sum(lengths, above * (self.layer_matmul() + self.layer_lora()) + self.head(), 2 * above)

    # ---- one step

    def lens(self, lengths: Sequence[int], states: int) -> tuple[int, int]:
        """RepNoise's logit lens: ``states`` hidden states of each sequence through the LM head
        (forward, backward): H per token forward; backward H (activation grads, LoRA: the head
        is frozen) or 2H (full fine-tuning: the head's weight grads too)."""
        tokens = sum(int(n) for n in lengths) * states
        return tokens * self.head(), tokens * self.head() * (1 if self.lora else 2)

    def step(self, task_lengths: Sequence[int], safety_lengths: Sequence[int] = (), *, safety: float = 0.0,
             probe: float = 0.0, lowest_probe_layer: int = 0, probe_passes: float = 1,
             lens_lengths: Sequence[int] = (), lens_states: int = 0) -> "StepFlops":
        """FLOPs of one optimizer step: SFT when ``safety`` = ``probe`` = 0; SAP adds the
        safety pass (weight ``safety``) and ``probe_passes`` probe passes on the task batch
        (weight ``probe``: 1 under ``probe_timing: next_step``, 2 under ``same_step``);
        RepNoise its logit lens (``lens_states`` hidden states of the ``lens_lengths``
        sequences through the LM head)."""
        probe = probe * probe_passes
        lens_forward, lens_backward = self.lens(lens_lengths, lens_states)
        f_task = self.forward(task_lengths)
        parts = {
            "task_forward": f_task,
            "task_backward": self.backward(task_lengths),
            "safety_forward": safety * self.forward(safety_lengths) if safety else 0,
            "safety_backward": safety * self.backward(safety_lengths) if safety else 0,
            "probe_forward": probe * f_task if probe else 0,
            "probe_backward": probe * self.probe_backward(task_lengths, lowest_probe_layer) if probe else 0,
            "lens_forward": lens_forward,
            "lens_backward": lens_backward,
        }
        return StepFlops({k: float(v) for k, v in parts.items()}, sum(int(n) for n in task_lengths),
                         sum(int(n) for n in safety_lengths) if safety else 0)


@dataclass
class StepFlops:
    parts: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in PASSES})
    task_tokens: int = 0
    safety_tokens: int = 0

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def __add__(self, other: "StepFlops") -> "StepFlops":
        return StepFlops({k: self.parts.get(k, 0.0) + other.parts.get(k, 0.0) for k in PASSES},
                         self.task_tokens + other.task_tokens, self.safety_tokens + other.safety_tokens)

    def per_task_token(self) -> float:
        return self.total / self.task_tokens if self.task_tokens else math.nan


def from_run_config(cfg, model_path) -> FlopsModel:
    """The FLOPs model of a run: architecture from ``model_path``/config.json, LoRA from cfg.lora."""
    spec = model_from_config(model_path)
    if cfg.lora.enabled:
        return FlopsModel(spec, cfg.lora.r, tuple(cfg.lora.target_modules))
    return FlopsModel(spec)


def ideal_ratio(model: FlopsModel, task_lengths: Sequence[int], safety_lengths: Sequence[int], *,
                safety: float = 1.0, probe: float = 1.0, lowest_probe_layer: int = 0, probe_passes: float = 1) -> float:
    """SFT FLOPs per task token over SAP FLOPs per task token, on the same task batch."""
    sft = model.step(task_lengths)
    sap = model.step(task_lengths, safety_lengths, safety=safety, probe=probe, lowest_probe_layer=lowest_probe_layer,
                     probe_passes=probe_passes)
    return sft.total / sap.total
