"""Vaccine (Huang, Hu, Liu, "Vaccine: Perturbation-aware Alignment for Large Language Models
against Harmful Fine-tuning Attack", NeurIPS 2024), after the authors'
``VaccineTrainer.training_step`` in ``trainer.py`` of github.com/git-disl/Vaccine (commit
8937f68; docs/alignment_defences.md, "Vaccine", lists every
difference).

An alignment-stage defence: the run's own data is the alignment data
(configs/vaccine_align.yaml), and each micro-batch is trained at the worst-case
perturbation of its attention outputs within a ball of radius rho:

1. ``activation_grad``: forward at the current weights; g_l = d loss / d a_l for the output
   a_l of every decoder block's attention module (``vaccine.modules: attention``, the
   authors' ``LlamaAttention`` outputs; or the whole block's output, ``decoder_layer``),
   taken with ``torch.autograd.grad`` w.r.t. those activations only: no weight gradient is
   computed, and nothing reaches DeepSpeed's gradient buffers (the authors' first backward
   also computes the weight gradients, then throws them away with ``model.zero_grad()``).
2. eps_l = rho * g_l / (||g|| + 1e-7), ||g|| the norm over all layers jointly, per rank and
   per micro-batch (the authors' norm covers their one device's micro-batch).
3. ``main``: the trainer's main pass, with a_l + eps_l in the forward (eps a constant: the
   backward through the addition is the identity, as the authors' ``output[0].data = ...``).

The stored g_l keep the working dtype (one activation-sized tensor per layer, what the
authors keep); the addition is done in fp32 and cast once. With ``train.grad_accum`` > 1,
step 1 for micro-batch m+1 runs right after micro-batch m's backward (``after_backward``),
so only one micro-batch's eps is held at a time. Non-finite activation gradients give
eps = 0 for that micro-batch (``vaccine/perturb_ok`` 0 in the log, warned once): its step
is the plain alignment gradient, never NaN from the perturbation.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from sap_ds.errors import ProbeError
from sap_ds.methods.base import ExtraPasses, Method
from sap_ds.model.losses import forward_logits, task_loss
from sap_ds.parallel.collectives import all_reduce_sum
from sap_ds.parallel.distributed import is_main
from sap_ds.sap import resolution
from sap_ds.sap.probe import find_decoder_layers
from sap_ds.sap.step import bypass_engine_grad_scaling, restore_rng_state, rng_state

log = logging.getLogger("sap_ds")

NORM_EPS = 1e-7  # the authors' ``scale = self.args.rho / (grad_norm + 1e-7)`` (trainer.py:149)
PHASES = ("activation_grad", "main")
# A decoder block's attention module, by attribute name (first match wins): Llama, Mistral, Qwen2,
# Gemma, OPT ("self_attn"), GPT-2 ("attn"), GPT-NeoX ("attention"), Falcon ("self_attention").
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def perturbed_modules(model: nn.Module, which: str) -> list[nn.Module]:
    """The modules whose outputs Vaccine perturbs, bottom to top: each decoder block's
    attention module (``attention``, the authors' ``get_leaf_modules_with_grad``,
    trainer.py:36-50) or each block (``decoder_layer``)."""
    blocks = find_decoder_layers(model)
    if which == "decoder_layer":
        return list(blocks)
    found = []
    for i, block in enumerate(blocks):
        module = next((getattr(block, n) for n in ATTENTION_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
        if module is None:
            raise ProbeError(f"vaccine.modules 'attention': decoder block {i} ({type(block).__name__}) has none of the "
                             f"attention attributes {', '.join(ATTENTION_NAMES)}; set vaccine.modules to "
                             "'decoder_layer' (the block outputs)")
        found.append(module)
    return found


class _Hooks:
    """Forward hooks on the perturbed modules. ``mode``: None (pass-through), "capture"
    (keep each output, made differentiable if nothing trainable lies below it, for
    ``autograd.grad``) or "perturb" (add ``scale * grads[i]`` in fp32, cast once)."""

    def __init__(self, modules: list[nn.Module]):
        self.mode: str | None = None
        self.captured: list[torch.Tensor | None] = [None] * len(modules)
        self.grads: list[torch.Tensor] = []
        self.scale: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int):
        def vaccine_hook(module, inputs, output):
            if self.mode is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            if self.mode == "capture":
                if not hidden.requires_grad:
                    # Nothing trainable below (LoRA on upper modules only): d loss / d a is still
                    # defined and the authors' hook would see it had they had a graph here (their
                    # code fails on it: the 0 placeholder of trainer.py:105 has no .norm()).
                    hidden = hidden.detach().requires_grad_(True)
                self.captured[index] = hidden
            else:  # perturb: a + eps, eps a constant (trainer.py:118, ``output[0].data = output[0] + perturbation``)
                hidden = (hidden + self.scale * self.grads[index].float()).to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return vaccine_hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class VaccineMethod(Method):
    name = "vaccine"
    phases = PHASES

    def __init__(self, cfg):
        super().__init__(cfg)
        self.hooks: _Hooks | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self._warned = False

    def setup(self, trainer) -> None:
        self.hooks = _Hooks(perturbed_modules(trainer.engine.module, self.cfg.vaccine.modules))

    # ------------------------------------------------------------------ the passes

    def activation_gradient(self, trainer, batch: dict, grad_accum: int) -> list[torch.Tensor]:
        """Step 1 on ``batch``: forward with the capture hooks, then d loss / d a_l of every
        perturbed module (trainer.py:59-77 and the hook at L93-95, which stores
        ``grad_output[0] / gradient_accumulation_steps``). Returns the gradients (working
        dtype) and records the pass's loss."""
        loss, _, grads = self._first_pass(trainer, batch, grad_accum)
        self.stats["loss_unperturbed"] = loss
        return grads

    def _first_pass(self, trainer, batch: dict, grad_accum: int):
        """(loss, captured outputs detached, their gradients of loss / grad_accum). The gradient
        entering the logits bypasses DeepSpeed's division by the accumulation steps
        (``bypass_engine_grad_scaling``, as SAP's probe pass), so the 1/grad_accum is the
        authors' and nothing else."""
        h = self.hooks
        h.mode, h.captured = "capture", [None] * len(h.captured)
        try:
            logits = bypass_engine_grad_scaling(forward_logits(trainer.engine, batch))
            loss = task_loss(logits, batch["labels"])
            acts = list(h.captured)
            grads = torch.autograd.grad(loss / grad_accum, acts, allow_unused=True)
        finally:
            h.mode, h.captured = None, [None] * len(h.captured)
        grads = [torch.zeros_like(a) if g is None else g.detach() for a, g in zip(acts, grads)]
        return loss.detach().float(), [a.detach() for a in acts], grads

    def set_perturbation(self, grads: list[torch.Tensor]) -> None:
        """eps_l = rho * g_l / (||g|| + 1e-7) with ||g|| over all layers jointly
        (``_grad_norm``, trainer.py:168-181; the scale at L146-151), kept as the gradients
        and one fp32 scale; 0 when ||g|| is not finite (its non-finite elements zeroed)."""
        g2 = torch.zeros((), dtype=torch.float32, device=grads[0].device)
        for g in grads:
            g2 += g.float().square().sum()
        norm = g2.sqrt()
        ok = torch.isfinite(norm)
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        scale = torch.where(ok, self.cfg.vaccine.rho / (norm + NORM_EPS), torch.zeros_like(norm))
        self.hooks.grads, self.hooks.scale = grads, scale
        self.stats.update({"activation_grad_norm": norm, "perturb_ok": ok.float()})

    def step(self, trainer, step: int, micro_batches: list[dict]) -> list[float]:
        n, timer, h = len(micro_batches), trainer.timer, self.hooks

        def next_perturbation(m: int) -> None:
            """After micro-batch m's perturbed backward, step 1 for micro-batch m + 1."""
            if m + 1 < n:
                h.mode = None
                with timer("activation_grad"):
                    self.set_perturbation(self.activation_gradient(trainer, micro_batches[m + 1], n))
                h.mode = "perturb"

        with timer("activation_grad"):
            self.set_perturbation(self.activation_gradient(trainer, micro_batches[0], n))
            # The autograd.grad backward ran DeepSpeed's backward epilogue, so the main pass's first
            # backward would count as a second micro-step and add to the stale gradient partitions
            # of the last step instead of replacing them: zero them (``drop_grads``; measured: 3 % of
            # scale off the reference after 2 steps without it). Later micro-batches add anyway.
            trainer.shards.drop_grads()
        h.mode = "perturb"
        try:
            with timer("main"):
                return trainer.main_pass(micro_batches, after_backward=next_perturbation)
        finally:
            h.mode, h.grads, h.scale = None, [], None

    # ------------------------------------------------------------------ the check before step 1

    def preflight(self, trainer) -> None:
        """Whether the working dtype holds the perturbation (``vaccine.resolution_check``): on
        step 1's first micro-batch, the realised ``cast(a + eps) - a`` against the intended eps
        over all layers and ranks must have its norm within 10 % and a cosine of at least 0.99
        (SAP's thresholds, ``sap_ds/sap/resolution.py``), or the second pass trains at a point
        that is not the intended one. ConfigError on every rank alike, naming vaccine.rho and
        the smallest rho that passes on this batch. Leaves the RNG as it found it."""
        c = self.cfg.vaccine
        if c.resolution_check == "off":
            return
        rng = rng_state()
        try:
            _, acts, grads = self._first_pass(trainer, trainer.task_micro_batches(0)[0], 1)
        finally:
            restore_rng_state(rng)
        self.set_perturbation(grads)
        scale = self.hooks.scale
        self.hooks.grads, self.hooks.scale = [], None
        numel = all_reduce_sum(torch.tensor([float(sum(a.numel() for a in acts))], dtype=torch.float64,
                                            device=scale.device))[0].item()

        def fidelity(multiplier: float) -> resolution.Fidelity:
            sums = torch.zeros(4, dtype=torch.float64, device=scale.device)
            for a, g in zip(acts, grads):
                intended = scale * multiplier * g.float()
                realised = (a + intended).to(a.dtype).float() - a.float()
                sums += torch.stack([realised.square().sum(), intended.square().sum(), (realised * intended).sum(),
                                     (realised != 0).sum().float()]).double()
            return resolution.fidelity_from_sums(all_reduce_sum(sums), int(numel))

        measured = fidelity(1.0)
        if measured.ok:
            return
        best = resolution.smallest_passing_multiplier(fidelity, ceiling=1e6)
        advice = ("no vaccine.rho up to 1e6 times this one meets it" if best is None else
                  f"the smallest vaccine.rho that meets it on this batch is about {resolution.round_up(c.rho * best):.2g}")
        resolution.refuse_or_warn(
            f"vaccine.rho {c.rho:g}: the {self.cfg.model.dtype} activations do not hold Vaccine's perturbation on step "
            f"1's first micro-batch ({measured.describe().replace('weights', 'activation elements')}; the check wants "
            f"the realised norm within {resolution.RATIO_TOLERANCE:.0%} of the intended and a cosine of at least "
            f"{resolution.COSINE_MIN}): {advice}. Raise vaccine.rho, train in fp32, or set vaccine.resolution_check to "
            "'warn' or 'off'", c)

    # ------------------------------------------------------------------ what the tools read

    def extra_passes(self, trainer, step: int) -> ExtraPasses:
        """Step 1: a forward and an activation-only backward over the task batch, down to the
        lowest perturbed module (block 0): SAP's probe pass with the probe at layer 0."""
        return ExtraPasses(probe=1.0, probe_passes=1.0, lowest_probe_layer=0)

    def nominal_passes(self) -> ExtraPasses:
        return ExtraPasses(probe=1.0, probe_passes=1.0, lowest_probe_layer=0)

    def log_stats(self, trainer) -> dict:
        """The last micro-batch's unperturbed loss, ||g|| over its layers (this rank) and
        whether its eps was applied; warns once when a logged step's was not."""
        if not self.stats:
            return {}
        keys = list(self.stats)
        values = torch.stack([self.stats[k].detach().reshape(()).double().cpu() for k in keys]).tolist()
        record = {f"vaccine/{k}": v for k, v in zip(keys, values)}
        if record.get("vaccine/perturb_ok", 1.0) == 0.0 and not self._warned:
            self._warned = True
            if is_main():
                log.warning("step %d: Vaccine's activation gradients were not finite on rank 0's last micro-batch: it "
                            "trained without the perturbation (vaccine/perturb_ok in metrics.jsonl; warned once)",
                            trainer.step)
        return record

    def bench_settings(self, trainer) -> dict:
        return {"rho": self.cfg.vaccine.rho, "modules": self.cfg.vaccine.modules}

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()

