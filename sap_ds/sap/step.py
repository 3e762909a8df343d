"""One Safety-Aware Probing step on ZeRO-3 shards (docs/algorithm.md: "One step", "The
phases on ZeRO-3 shards").

Each phase is one function; ``sap_step`` runs them in order:

1. ``safety_direction``: g = grad_W L_safe(W), averaged over ranks; drop the gradients
   (the probe off, or with ``sap.probe_in_safety`` the current V added as a constant).
2. ``perturb``:          W' = W + rho * ||W|| / ||g|| * g, written into the working shards.
3. ``probe_gradient``:   gV = -grad_V L(W', V), probe only, no weight gradients.
4. ``restore``:          W from the fp32 master, bit for bit (no weight copy).
5. the main pass (the trainer's, shared with SFT) at W with the probe active;
   ``update_probe``:    gV += grad_V L(W, V); all-reduce-mean; V <- 0 (paper mode); AdamW.

That is ``sap.probe_timing: next_step`` (the authors' code). ``same_step`` (the paper's
Algorithm 1) zeroes V first, adds a second probe pass at W after the restore
(gV += grad_V L(W, V)), updates V from that, and only then runs the main pass, with the
new V. ``sap_ds/sap/probe_update.py``: the update itself (AdamW or a plain gradient step).

Everything rank-dependent (norms, direction scale, V) is identical to a single-process
run of the same global batch, up to floating-point reduction order.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import sap_ds_kernels
import torch

from sap_ds.config.methods import SapConfig
from sap_ds.model.losses import forward_logits, safety_loss, task_loss
from sap_ds.parallel.collectives import all_reduce_mean, all_reduce_sum
from sap_ds.parallel.zero3 import Zero3Shards
from sap_ds.sap import resolution
from sap_ds.sap.probe import Probe
from sap_ds.sap.probe_update import make_optimizer, rescale_probe, update_probe
from sap_ds.timing import PhaseTimer

# The phases a SAP step times (sap_ds.timing.PhaseTimer): the trainer logs them as time/<phase>, the bench
# reports them; the last is the trainer's main pass, shared with SFT.
PHASES = ("safety", "perturb", "probe", "restore", "main")

log = logging.getLogger("sap_ds")


@dataclass
class SapState:
    """Everything SAP keeps between steps (all of it goes into checkpoints, the direction only
    where a later step reuses it: ``SapMethod.direction_reused``)."""

    probe: Probe
    probe_optimizer: torch.optim.Optimizer | None  # None under probe_update: gradient (no state)
    direction: list  # per-group fp32 buffers, pre-scaled per tensor in per_tensor mode
    scale: torch.Tensor  # 0-dim fp32: rho * ||W|| / ||g|| (1 in per_tensor mode, 0 if no direction)
    backup: list | None = None  # fp32 runs only: the master is the working shard, so keep W
    direction_step: int | None = None  # the step whose safety batch gave the current direction
    seed: int = 0  # run seed: the random-direction ablation draws from (seed, step, rank)
    stats: dict = field(default_factory=dict)  # 0-dim device tensors (or bools): read only when logged
    ran: dict = field(default_factory=dict)  # the last step's extra passes: {"safety": bool, "probe": bool, "probe_passes": int}


def stats_as_floats(state: SapState) -> dict:
    """The step's statistics (``state.stats``) and the probe's norm as plain numbers, with
    one device-to-host transfer for all of them (the trainer calls it on logged steps)."""
    tensors = {k: v for k, v in state.stats.items() if torch.is_tensor(v)}
    tensors["probe_norm"] = state.probe.vectors.detach().norm()
    device = tensors["probe_norm"].device
    values = torch.stack([v.detach().reshape(()).double().to(device) for v in tensors.values()]).tolist()
    out = {k: v for k, v in state.stats.items() if not torch.is_tensor(v)}
    out.update(zip(tensors, values))
    return out


def make_state(engine, shards: Zero3Shards, cfg: SapConfig, hidden_size: int, seed: int = 0) -> SapState:
    device = shards.groups[0].master.device if shards.groups else torch.device("cpu")
    probe_device = next(engine.module.parameters()).device
    probe = Probe(engine.module, cfg.probe_layers, hidden_size, probe_device)
    probe.enabled = cfg.probe_enabled
    if cfg.probe_init == "random":
        probe.init_random(cfg.probe_init_norm, seed)
    optimizer = make_optimizer(probe, cfg)
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
    boundary flag makes an offloaded optimizer copy it where the gradient views read it.
    ``scale_wrt_gas=False``: the safety loss is one batch, not a micro-batch of an
    accumulated step (its scale would not matter anyway: only g / ||g|| is used). The
    gradients are then dropped: SAP never steps on the safety loss.

    No host synchronisation: the norms, the scale and the statistics stay on the device
    (a zero or non-finite gradient gives scale 0, and non-finite direction elements are
    zeroed, so that case perturbs nothing, with no NaN written into the weights).
    """
    if cfg.direction == "random":
        loss = _random_direction(shards, state, step)
    else:
        engine.set_gradient_accumulation_boundary(True)
        # sap.probe_in_safety false: L_safe(W), the probe off. true: the model as it stands, the
        # current V added as a constant, as in the authors' code (SAPcode/train.py:47-48: V's
        # requires_grad is switched off, V itself stays in the forward as the down_proj bias).
        state.probe.enabled = cfg.probe_enabled and cfg.probe_in_safety
        state.probe.frozen = True
        try:
            loss = safety_loss(forward_logits(engine, batch), batch["labels"], cfg.safety_loss, cfg.temperature)
        finally:
            state.probe.enabled = cfg.probe_enabled
            state.probe.frozen = False
        engine.backward(loss, scale_wrt_gas=False)
        shards.copy_local_grads(state.direction)
        shards.drop_grads()
        engine.set_gradient_accumulation_boundary(None)

    if cfg.perturb_norm == "global":
        sums = torch.stack([sap_ds_kernels.sumsq(d, g.master, backend=cfg.kernels)
                            for d, g in zip(state.direction, shards.groups)]).sum(0)
        g2, w2 = all_reduce_sum(sums.to(torch.float64)).unbind()
        scale, ok = direction_scale(g2, w2, cfg.rho)
    else:
        g2, w2, ok = _scale_per_tensor(shards, state, cfg)
        scale = torch.ones_like(g2)
    for d in state.direction:
        torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
    state.scale.copy_(torch.where(ok, scale, torch.zeros_like(scale)))
    state.direction_step = step
    nan = torch.full_like(g2, float("nan"))
    state.stats = {
        "safety_loss": loss.detach().float(),
        "safety_grad_norm": torch.where(torch.isfinite(g2), g2.clamp_min(0).sqrt(), nan),
        "weight_norm": torch.where(torch.isfinite(w2), w2.clamp_min(0).sqrt(), nan),
        "direction_ok": ok,
    }


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
    """Scale each tensor's direction by rho * ||W_t|| / ||g_t|| (norms over all ranks):
    segment sums over the flat buffers, one all-reduce for all tensors, one scaling pass
    (``sap_ds/parallel/segments.py``). Returns the total g2, w2 and whether every tensor's norms
    are finite (a zero-gradient tensor is fine, just not perturbed)."""
    sums = all_reduce_sum(shards.segments.sumsq(state.direction, [g.master for g in shards.groups]))
    g2, w2 = sums[:-1, 0], sums[:-1, 1]  # the last row is the padding
    factors, _ = direction_scale(g2, w2, cfg.rho)
    shards.segments.scale_(state.direction, torch.cat([factors, factors.new_zeros(1)]).float())
    ok = (torch.isfinite(g2) & torch.isfinite(w2)).all()
    return g2.sum(), w2.sum(), ok


@torch.no_grad()
def perturb(shards: Zero3Shards, state: SapState, backend: str) -> None:
    """Phase 2: working shards <- cast(master + scale * direction), one launch per group.

    The same launches sum how faithfully the working dtype holds the perturbation; one
    all-reduce of those four numbers gives ``perturb_realized_ratio``, ``perturb_cosine``
    and ``perturb_changed_fraction`` (``sap_ds/sap/resolution.py``), kept on the device."""
    sums = None
    for i, g in enumerate(shards.groups):
        source = g.master
        if g.master_aliases_lp:  # fp32 run: the working shard *is* the master; keep W
            state.backup[i].copy_(g.master)
            source = state.backup[i]
        part = torch.zeros(sap_ds_kernels.N_STATS, dtype=torch.float64, device=source.device)
        sap_ds_kernels.perturb_from_master(source, state.direction[i], state.scale, g.lp, backend=backend, stats=part)
        sums = part if sums is None else sums + part.to(sums.device)
    shards.refresh_gathered()
    if sums is not None:
        state.stats.update(resolution.fidelity_tensors(all_reduce_sum(sums), shards.trainable_numel))


@torch.no_grad()
def restore(shards: Zero3Shards, state: SapState, backend: str) -> None:
    """Phase 4: working shards <- cast(master): bit-exact, since after every optimizer
    step DeepSpeed sets the working shard to exactly that cast."""
    for i, g in enumerate(shards.groups):
        source = state.backup[i] if g.master_aliases_lp else g.master
        sap_ds_kernels.restore_from_master(source, g.lp, backend=backend)
    shards.refresh_gathered()


def probe_gradient(engine, state: SapState, micro_batches: list[dict], negate: bool = True) -> torch.Tensor:
    """Phase 3: -grad_V of the task loss at W', the mean over the micro-batches (each
    weighted 1/n, as the engine's main pass weights them); ``negate=False``: +grad_V at the
    current weights (``same_step``'s pass at W). ``autograd.grad`` w.r.t. the
    probe only: no parameter receives a gradient, and with the graph cut under the lowest
    probe layer no backward runs there.

    Every forward through the engine hooks its outputs with DeepSpeed's
    ``_backward_prologue_per_tensor`` (deepspeed/runtime/engine.py, registered by
    ``register_output_backward_hooks`` in ``DeepSpeedEngine.forward``), which divides the
    gradient of any backward not started by ``engine.backward`` by
    ``gradient_accumulation_steps()``: the probe pass's would be weighted 1/n^2 against
    the main pass's 1/n, and at rho = 0 they would no longer cancel. The gradient entering
    the logits is therefore handed on exactly as it arrives (``bypass_engine_grad_scaling``)."""
    probe = state.probe
    total = torch.zeros_like(probe.vectors)
    probe.cut_below = True
    try:
        for batch in micro_batches:
            logits = bypass_engine_grad_scaling(forward_logits(engine, batch))
            loss = task_loss(logits, batch["labels"]) / len(micro_batches)
            (grad,) = torch.autograd.grad(-loss if negate else loss, [probe.vectors])
            total += grad
    finally:
        probe.cut_below = False
    return total


def bypass_engine_grad_scaling(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` behind an identity node whose incoming gradient is recorded; a hook on
    ``logits`` registered after the engine's (tensor hooks run in registration order)
    replaces whatever the engine's hook made of it with that recorded gradient. Explicit
    rather than a compensating factor: it holds whatever the engine's hook does (divide
    by the accumulation steps, or, in other DeepSpeed versions, nothing)."""
    incoming: list[torch.Tensor] = []
    passthrough = logits.view_as(logits)
    passthrough.register_hook(incoming.append)  # returns None: the gradient goes on unchanged
    logits.register_hook(lambda after_engine_hook: incoming.pop())
    return passthrough


# --------------------------------------------------------------------------- the step


class _WSideOfProbed:
    """``sap.probe_micro_batches`` k < n under ``next_step``: gV's W side, grad_V L(W, V),
    must come from the same k micro-batches as the pass at W' (at rho = 0 the two cancel),
    so it is read off the main pass after its k-th backward. Each backward there added
    grad_V L_m / n (the engine scales the loss by 1 / grad_accum): times n / k, the mean
    over the k, as ``probe_gradient`` takes it."""

    def __init__(self, state: SapState, k: int, n: int):
        self.state, self.k, self.n = state, k, n
        self.grad: torch.Tensor | None = None

    def __call__(self, m: int) -> None:
        if m == self.k - 1:
            g = self.state.probe.vectors.grad
            self.grad = None if g is None else g.detach() * (self.n / self.k)


def rng_state():
    """The CPU and CUDA generators' states: a pass that must see the same dropout masks as
    another (SAP's task passes, Booster's pass at W', a check that must leave the run's
    randomness as it found it) saves them before and restores them with ``restore_rng_state``."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def restore_rng_state(state) -> None:
    """Put back what ``rng_state`` saved."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)



def runs_probe(step: int, fraction: float) -> bool:
    """Whether step ``step`` runs the probe pass: evenly spaced, deterministic."""
    return math.floor((step + 1) * fraction) > math.floor(step * fraction)


def nominal_shares(safety_every: int, probe_fraction: float, horizon: int = 10_000) -> tuple[float, float]:
    """Long-run (safety, probe) pass shares per step under this schedule: the probe pass
    runs on the steps where floor((s+1)f) > floor(s f) (``runs_probe``); the safety pass
    runs on a probe step once the direction is ``safety_every`` or more steps old
    (``direction_due``). E.g. k=4, f=0.5: (1/4, 1/2); k=3, f=0.5: (1/4, 1/2). The bench
    weighs its ideal ratio with them (``SapMethod.nominal_passes``)."""
    f, k = float(probe_fraction), int(safety_every)
    last, safety, probe = None, 0, 0
    for s in range(horizon):
        if math.floor((s + 1) * f) > math.floor(s * f):
            probe += 1
            if last is None or s - last >= k:
                safety, last = safety + 1, s
    return safety / horizon, probe / horizon


def preflight(engine, shards: Zero3Shards, state: SapState, cfg: SapConfig, safety_batch: dict | None,
              dtype_name: str, step: int = 0, micro_batches: list[dict] | None = None) -> resolution.Fidelity | None:
    """Before step 1: compute the first safety direction (the one step 0 would compute)
    and check that the working dtype can hold the perturbation it gives
    (``resolution.check``: raises ConfigError under ``sap.resolution_check: error``), then,
    in a working dtype narrower than fp32, that the probe gradient it gives on step
    ``step``'s task ``micro_batches`` stands above the rounding of its terms
    (``probe_signal``, ``resolution.check_probe_signal``).
    Step 0 then reuses that direction; if step 0 runs no probe pass it is left due, so
    the first probing step computes its own. None when no perturbation is ever made."""
    if not (cfg.probe_enabled and cfg.probe_train) or cfg.resolution_check == "off" or safety_batch is None:
        return None
    safety_direction(engine, shards, state, safety_batch, cfg, step)
    measured = resolution.check(shards, state, cfg, dtype_name)
    working = next(engine.module.parameters()).dtype
    signal = None
    if micro_batches and working != torch.float32 and not measured.intended_zero:
        signal = probe_signal(engine, shards, state, cfg, micro_batches[:cfg.probed_micro_batches(len(micro_batches))],
                              working)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            log.info("sap: probe gradient before step 1: probe_signal_ratio %.3g (gV in units of the %s rounding of "
                     "its terms; needed >= %g)", signal, dtype_name, resolution.PROBE_SIGNAL_MIN)
        resolution.check_probe_signal(signal, cfg, dtype_name)
    state.stats.update({k: torch.tensor(v) for k, v in (("perturb_realized_ratio", measured.ratio),
                                                        ("perturb_cosine", measured.cosine),
                                                        ("perturb_changed_fraction", measured.changed_fraction))})
    if signal is not None:
        state.stats["probe_signal_ratio"] = torch.tensor(signal)
    if not runs_probe(step, cfg.probe_fraction):
        state.direction_step = None
    return measured


def probe_signal(engine, shards: Zero3Shards, state: SapState, cfg: SapConfig, micro_batches: list[dict],
                 dtype: torch.dtype) -> float:
    """``resolution.probe_signal_ratio`` of the gV the current direction gives on
    ``micro_batches``: perturb, the probe pass at W', restore, the probe pass at W, each term
    averaged over ranks (so every rank reaches the same verdict). Leaves the weights, the
    gradients, V and the RNG as it found them (step 0 runs as if it had not run)."""
    rng = rng_state()
    perturb(shards, state, cfg.kernels)
    at_perturbed = probe_gradient(engine, state, micro_batches)
    restore(shards, state, cfg.kernels)
    restore_rng_state(rng)
    at_weights = probe_gradient(engine, state, micro_batches, negate=False)
    shards.drop_grads()
    restore_rng_state(rng)
    terms = all_reduce_mean(torch.stack([at_perturbed, at_weights]).detach())
    return resolution.probe_signal_ratio(terms[0], terms[1], dtype)


def sap_step(engine, shards: Zero3Shards, state: SapState, cfg: SapConfig, step: int,
             micro_batches: list[dict], safety_batch: dict | None, main_pass, timer: PhaseTimer,
             lr_factor: float = 1.0) -> list[float]:
    """One optimizer step of SAP. ``main_pass(micro_batches)`` is the trainer's SFT pass
    (forward/backward per micro-batch, then ``engine.step()``); it returns the losses.

    Every task pass of the step (the probe pass at W', under ``same_step`` the probe pass
    at W, the main pass) starts from the same RNG state, so with dropout they all see the
    same masks and ``L(W, V) - L(W', V)`` measures the perturbation, not dropout noise (the
    authors' script and SafeTune draw fresh masks for each pass).

    ``probe_timing: same_step`` (paper Algorithm 1): V is zeroed (``probe_reset``) before
    the probe passes, the second probe pass at W completes gV = grad_V [L(W, V) - L(W', V)]
    on this step's batch, V is updated, and the main pass trains W with that V. Its own V
    gradient is discarded. The pass at W is timed as ``probe`` too (``time/probe`` holds
    both) and counted by the FLOPs model (``ran["probe_passes"]``)."""
    probing = cfg.probe_enabled and cfg.probe_train and runs_probe(step, cfg.probe_fraction)
    same_step = probing and cfg.probe_timing == "same_step"
    n = len(micro_batches)
    k = cfg.probed_micro_batches(n)  # sap.probe_micro_batches: the probe passes see the first k
    probed = micro_batches[:k]
    state.ran = {"probe": probing, "safety": probing and safety_batch is not None,  # the FLOPs the step costs
                 "probe_passes": cfg.probe_share(n) if probing else 0}
    probe_grad = None
    if probing:
        if same_step and cfg.probe_reset:
            state.probe.reset()  # Algorithm 1, line 3: the gradient is taken at V = 0
        if safety_batch is not None:
            with timer("safety"):
                safety_direction(engine, shards, state, safety_batch, cfg, step)
        with timer("perturb"):
            perturb(shards, state, cfg.kernels)
        rng = rng_state()  # every task pass of the step replays the probe pass's dropout masks
        with timer("probe"):
            probe_grad = probe_gradient(engine, state, probed)
        with timer("restore"):
            restore(shards, state, cfg.kernels)
        if same_step:
            restore_rng_state(rng)
            state.probe.measure = True  # the hidden-state norms probe_scale is relative to, at W
            try:
                with timer("probe"):
                    probe_grad = probe_grad + probe_gradient(engine, state, probed, negate=False)
            finally:
                state.probe.measure = False
    state.probe.vectors.grad = None
    if probing:
        shards.drop_grads()  # the probe passes' backward epilogues must not make the main pass accumulate
        if same_step:
            update_probe(state, probe_grad, cfg, lr_factor)  # this step's V, for this step's main pass
        restore_rng_state(rng)
    w_side = _WSideOfProbed(state, k, n) if probing and not same_step and k < n else None
    state.probe.measure = True  # the hidden-state norms probe_scale is relative to
    try:
        with timer("main"):
            losses = main_pass(micro_batches, after_backward=w_side)
    finally:
        state.probe.measure = False
    if w_side is not None:
        state.probe.vectors.grad = w_side.grad  # the probed micro-batches' share only
    if probing and not same_step:
        update_probe(state, probe_grad, cfg, lr_factor)
    else:
        state.probe.vectors.grad = None  # same_step: the main pass's V gradient is not used
        if cfg.probe_enabled and not cfg.probe_train:
            rescale_probe(state, cfg)  # the fixed probe, kept at its size relative to h
    return losses
