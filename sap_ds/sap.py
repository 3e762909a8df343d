"""One Safety-Aware Probing step on ZeRO-3 shards (DESIGN.md sections 1-2).

Each phase is one function; ``sap_step`` runs them in order:

1. ``safety_direction``: g = grad_W L_safe(W), averaged over ranks; drop the gradients.
2. ``perturb``:          W' = W + rho * ||W|| / ||g|| * g, written into the working shards.
3. ``probe_gradient``:   gV = -grad_V L(W', V), probe only, no weight gradients.
4. ``restore``:          W from the fp32 master, bit for bit (no weight copy).
5. the main pass (the trainer's, shared with SFT) at W with the probe active;
   ``update_probe``:    gV += grad_V L(W, V); all-reduce-mean; V <- 0 (paper mode); AdamW.

Everything rank-dependent (norms, direction scale, V) is identical to a single-process
run of the same global batch, up to floating-point reduction order.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import kernels
from sap_ds.config import SapConfig
from sap_ds.losses import forward_logits, safety_loss, task_loss
from sap_ds.probe import Probe
from sap_ds.zero3 import Zero3Shards, all_reduce_mean, all_reduce_sum

PHASES = ("safety", "perturb", "probe", "restore", "main")


class PhaseTimer:
    """Wall time per phase, synchronising the device so GPU work is counted where it runs."""

    def __init__(self):
        self.totals = {name: 0.0 for name in PHASES}

    @contextmanager
    def __call__(self, name: str):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.totals[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {name: 0.0 for name in PHASES}
        return out


@dataclass
class SapState:
    """Everything SAP keeps between steps (all of it goes into checkpoints)."""

    probe: Probe
    probe_optimizer: torch.optim.Optimizer
    direction: list  # per-group fp32 buffers, pre-scaled per tensor in per_tensor mode
    scale: torch.Tensor  # 0-dim fp32: rho * ||W|| / ||g|| (1 in per_tensor mode, 0 if no direction)
    backup: list | None = None  # fp32 runs only: the master is the working shard, so keep W
    direction_step: int | None = None  # the step whose safety batch gave the current direction
    seed: int = 0  # run seed: the random-direction ablation draws from (seed, step, rank)
    stats: dict = field(default_factory=dict)


def make_state(engine, shards: Zero3Shards, cfg: SapConfig, hidden_size: int, seed: int = 0) -> SapState:
    device = shards.groups[0].master.device if shards.groups else torch.device("cpu")
    probe_device = next(engine.module.parameters()).device
    probe = Probe(engine.module, cfg.probe_layers, hidden_size, probe_device)
    probe.enabled = cfg.probe_enabled
    if cfg.probe_init == "random":
        probe.init_random(cfg.probe_init_norm, seed)
    optimizer = torch.optim.AdamW([probe.vectors], lr=cfg.probe_lr, eps=cfg.probe_adam_eps, weight_decay=0.0)
    backup = None
    if any(g.master_aliases_lp for g in shards.groups):
        backup = shards.new_flat_buffers()
    return SapState(probe, optimizer, shards.new_flat_buffers(), torch.zeros((), device=device), backup, seed=seed)


# --------------------------------------------------------------------------- phases


def direction_due(state: SapState, step: int, every: int) -> bool:
    """A new safety direction is due every ``every`` steps, counted from the last one
    computed (a step that skips the probe pass leaves it due for the next one)."""
    return state.direction_step is None or step - state.direction_step >= every


def safety_direction(engine, shards: Zero3Shards, state: SapState, batch: dict, cfg: SapConfig, step: int = 0) -> None:
    """Phase 1: the safety gradient's direction and scale, from the local gradient shards.

    The engine's own backward reduce-scatters the gradient (averaged over ranks); the
    boundary flag makes an offloaded optimizer copy it where ``safe_get_local_grad``
    reads it. The gradients are then dropped: SAP never steps on the safety loss.
    """
    if cfg.direction == "random":
        loss = _random_direction(shards, state, step)
    else:
        engine.set_gradient_accumulation_boundary(True)
        state.probe.enabled = False  # L_safe(W): the probe is not part of the safety signal
        try:
            loss = safety_loss(forward_logits(engine, batch), batch["labels"], cfg.safety_loss, cfg.temperature)
        finally:
            state.probe.enabled = cfg.probe_enabled
        engine.backward(loss, scale_wrt_gas=False)
        shards.copy_local_grads(state.direction)
        shards.drop_grads()
        engine.set_gradient_accumulation_boundary(None)

    if cfg.perturb_norm == "global":
        sums = torch.stack([kernels.sumsq(d, g.master, backend=cfg.kernels) for d, g in zip(state.direction, shards.groups)]).sum(0)
        g2, w2 = all_reduce_sum(sums.to(torch.float64)).unbind()
        scale, ok = direction_scale(g2, w2, cfg.rho)
        state.scale.copy_(scale)
    else:
        g2, w2, ok = _scale_per_tensor(shards, state, cfg)
        state.scale.fill_(1.0)
    state.direction_step = step
    state.stats = {
        "safety_loss": loss.detach().float().item(),
        "safety_grad_norm": math.sqrt(max(g2.item(), 0.0)) if torch.isfinite(g2) else float("nan"),
        "weight_norm": math.sqrt(max(w2.item(), 0.0)) if torch.isfinite(w2) else float("nan"),
        "direction_ok": bool(ok.all().item()) if ok.dim() else bool(ok.item()),
    }
    if not state.stats["direction_ok"]:
        state.scale.zero_()


@torch.no_grad()
def _random_direction(shards: Zero3Shards, state: SapState, step: int) -> torch.Tensor:
    """Ablation ``direction: random``: a standard Gaussian in place of the safety gradient
    (the scale that follows gives it the same norm, rho * ||W||). Padding stays zero."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    gen = torch.Generator(device="cpu").manual_seed(state.seed * 1_000_003 + step * 1009 + rank)
    for d in state.direction:
        d.zero_()
    for gi, _, offset, valid in shards.param_slices():
        if valid:
            noise = torch.randn(valid, generator=gen, dtype=torch.float32)
            state.direction[gi].narrow(0, offset, valid).copy_(noise)
    return torch.tensor(float("nan"))


def direction_scale(g2: torch.Tensor, w2: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``rho * ||W|| / ||g||`` from squared norms, and whether it is usable. A zero or
    non-finite gradient norm (or weight norm) gives scale 0: no perturbation, never a
    division by zero or a NaN written into the weights."""
    ok = torch.isfinite(g2) & torch.isfinite(w2) & (g2 > 0)
    return torch.where(ok, rho * w2.sqrt() / g2.clamp_min(1e-300).sqrt(), torch.zeros_like(g2)), ok


def _scale_per_tensor(shards: Zero3Shards, state: SapState, cfg: SapConfig):
    """Scale each tensor's direction by rho * ||W_t|| / ||g_t|| (norms over all ranks)."""
    slices = list(shards.param_slices())
    sums = torch.zeros(len(slices), 2, dtype=torch.float64, device=state.scale.device)
    for i, (gi, p, offset, valid) in enumerate(slices):
        if valid:
            d = state.direction[gi].narrow(0, offset, valid)
            w = shards.groups[gi].master.narrow(0, offset, valid)
            sums[i] = kernels.sumsq(d, w, backend="torch").to(torch.float64)
    all_reduce_sum(sums)
    g2, w2 = sums[:, 0], sums[:, 1]
    factors, _ = direction_scale(g2, w2, cfg.rho)
    ok = torch.isfinite(g2) & torch.isfinite(w2)  # a zero-gradient tensor is fine, just not perturbed
    for (gi, p, offset, valid), factor in zip(slices, factors.float()):
        if valid:
            state.direction[gi].narrow(0, offset, valid).mul_(factor)
    return g2.sum(), w2.sum(), ok


@torch.no_grad()
def perturb(shards: Zero3Shards, state: SapState, backend: str) -> None:
    """Phase 2: working shards <- cast(master + scale * direction), one launch per group."""
    for i, g in enumerate(shards.groups):
        source = g.master
        if g.master_aliases_lp:  # fp32 run: the working shard *is* the master; keep W
            state.backup[i].copy_(g.master)
            source = state.backup[i]
        kernels.perturb_from_master(source, state.direction[i], state.scale, g.lp, backend=backend)
    shards.refresh_gathered()


@torch.no_grad()
def restore(shards: Zero3Shards, state: SapState, backend: str) -> None:
    """Phase 4: working shards <- cast(master): bit-exact, since after every optimizer
    step DeepSpeed sets the working shard to exactly that cast."""
    for i, g in enumerate(shards.groups):
        source = state.backup[i] if g.master_aliases_lp else g.master
        kernels.restore_from_master(source, g.lp, backend=backend)
    shards.refresh_gathered()


def probe_gradient(engine, state: SapState, micro_batches: list[dict]) -> torch.Tensor:
    """Phase 3: -grad_V of the task loss at W', summed over micro-batches (each weighted
    1/n like the engine's gradient accumulation). ``autograd.grad`` w.r.t. the probe
    only: no parameter receives a gradient, and with the graph cut under the lowest probe
    layer no backward runs there."""
    probe = state.probe
    total = torch.zeros_like(probe.vectors)
    probe.cut_below = True
    try:
        for batch in micro_batches:
            loss = task_loss(forward_logits(engine, batch), batch["labels"]) / len(micro_batches)
            (grad,) = torch.autograd.grad(-loss, [probe.vectors])
            total += grad
    finally:
        probe.cut_below = False
    return total


def update_probe(state: SapState, probe_grad: torch.Tensor, cfg: SapConfig, lr_factor: float = 1.0) -> None:
    """Phase 5b: average gV over ranks, reset V (paper mode), one AdamW step on V (at
    ``probe_lr * lr_factor`` with ``probe_lr_schedule: follow``), then ``probe_scale``."""
    vectors = state.probe.vectors
    grad = probe_grad + (vectors.grad if vectors.grad is not None else 0)
    grad = all_reduce_mean(grad.detach().clone())
    state.stats["probe_update_skipped"] = not bool(torch.isfinite(grad).all())
    if state.stats["probe_update_skipped"]:  # same verdict on every rank: grad is all-reduced
        state.probe_optimizer.zero_grad(set_to_none=True)
        return
    if cfg.probe_reset:
        state.probe.reset()
    if cfg.probe_lr_schedule == "follow":
        for group in state.probe_optimizer.param_groups:
            group["lr"] = cfg.probe_lr * lr_factor
    vectors.grad = grad
    state.probe_optimizer.step()
    state.probe_optimizer.zero_grad(set_to_none=True)
    rescale_probe(state, cfg)


def rescale_probe(state: SapState, cfg: SapConfig) -> None:
    """``probe_scale``: each layer's vector to that fraction of the mean hidden-state norm
    the last main pass measured there (averaged over ranks, so V stays identical)."""
    norms = all_reduce_mean(state.probe.hidden_norms.clone())
    state.stats["hidden_norm"] = norms.mean().item()
    if cfg.probe_scale is not None:
        state.probe.rescale(cfg.probe_scale * norms)


# --------------------------------------------------------------------------- the step


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)



def runs_probe(step: int, fraction: float) -> bool:
    """Whether step ``step`` runs the probe pass: evenly spaced, deterministic."""
    return math.floor((step + 1) * fraction) > math.floor(step * fraction)


def sap_step(engine, shards: Zero3Shards, state: SapState, cfg: SapConfig, step: int,
             micro_batches: list[dict], safety_batch: dict | None, main_pass, timer: PhaseTimer,
             lr_factor: float = 1.0) -> list[float]:
    """One optimizer step of SAP. ``main_pass(micro_batches)`` is the trainer's SFT pass
    (forward/backward per micro-batch, then ``engine.step()``); it returns the losses.

    The main pass starts from the RNG state the probe pass started from, so with dropout
    both passes see the same masks and ``L(W, V) - L(W', V)`` measures the perturbation,
    not dropout noise (the authors' script draws fresh masks for each pass)."""
    probing = cfg.probe_enabled and cfg.probe_train and runs_probe(step, cfg.probe_fraction)
    probe_grad = None
    if probing:
        if safety_batch is not None:
            with timer("safety"):
                safety_direction(engine, shards, state, safety_batch, cfg, step)
        with timer("perturb"):
            perturb(shards, state, cfg.kernels)
        rng = _rng_state()  # the main pass replays the probe pass's dropout masks
        with timer("probe"):
            probe_grad = probe_gradient(engine, state, micro_batches)
        with timer("restore"):
            restore(shards, state, cfg.kernels)
    state.probe.vectors.grad = None
    if probing:
        shards.drop_grads()  # the probe pass's backward epilogue must not make the main pass accumulate
        _set_rng_state(rng)
    state.probe.measure = True  # the hidden-state norms probe_scale is relative to
    try:
        with timer("main"):
            losses = main_pass(micro_batches)
    finally:
        state.probe.measure = False
    if probing:
        update_probe(state, probe_grad, cfg, lr_factor)
    else:
        state.probe.vectors.grad = None
        if cfg.probe_enabled and not cfg.probe_train:
            rescale_probe(state, cfg)  # the fixed probe, kept at its size relative to h
    return losses
