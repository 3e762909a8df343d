"""Can the working shards hold the perturbation? (docs/algorithm.md, "Precision of the perturbation")

The probe pass computes at ``cast(W + d)``, ``d = rho * ||W|| / ||g|| * g``. In bf16 an
element changes only where ``d`` reaches half an ulp of ``W`` (about ``2**-9 |W|``): at
the authors' ``rho = 2e-5`` and weights ~ N(0, 0.02) about 1.6 % of the elements change,
the realised perturbation ``r = cast(W + d) - cast(W)`` has 13x the intended norm and a
cosine of 0.08 with it, and the probe then measures rounding noise. This module turns
the sums the perturb kernel takes alongside its store (``sap_ds_kernels.perturb_from_master(...,
stats=)``) into three figures, logged on every probe step:

- ``perturb_realized_ratio`` = ||r|| / ||d||,
- ``perturb_cosine`` = <r, d> / (||r|| ||d||),
- ``perturb_changed_fraction`` = share of the trainable elements that changed,

and runs the check before step 1 (``sap.resolution_check``): realised norm within
``RATIO_TOLERANCE`` of the intended one and cosine at least ``COSINE_MIN``, or the run
stops (``error``, the default) or warns (``warn``) naming ``sap.rho``, the measured
figures and the smallest rho that passes, found by bisection on the same shards.

The probe gradient has the same problem one level up: ``gV = grad_V L(W) - grad_V L(W')``
is the difference of two sums computed from working-dtype activations, each known to about
the dtype's unit roundoff ``u`` (bf16: ``2**-8``) of its size. Held weights do not make gV
resolved (LoRA with B = 0 holds any perturbation, yet at rho 2e-5 its two terms agree to
1e-4). Before step 1, in a working dtype narrower than fp32, the same check measures

- ``probe_signal_ratio`` = ||gV|| / (u * max ||grad_V L||) on the first step's probed
  micro-batches: how many roundings of its terms gV is worth (about 1 when it is noise),

and stops or warns as above when it is below ``PROBE_SIGNAL_MIN``, naming the rho that
would reach it if gV grows linearly with rho (a lower bound where gV is noise).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import sap_ds_kernels
import torch

from sap_ds.errors import ConfigError
from sap_ds.parallel.collectives import all_reduce_sum

log = logging.getLogger("sap_ds")

RATIO_TOLERANCE = 0.10  # |realised norm / intended norm - 1| at most this
COSINE_MIN = 0.99  # cosine between realised and intended perturbation at least this
# ||gV|| at least this many roundings of its terms. Measured against an fp32 replica on the tiny
# Llama (docs/algorithm.md, "Precision of the probe gradient"): the noise in gV is 0.5-1.2 u of
# its terms, so 10 keeps gV's cosine with the fp32 replica >= 0.99; at 2.5-5 it was 0.90-0.996.
PROBE_SIGNAL_MIN = 10.0
RHO_CEILING = 1.0  # a perturbation as large as the weights: nothing above it is searched
BISECTION_STEPS = 10


@dataclass(frozen=True)
class Fidelity:
    """How faithfully the working shards hold an intended perturbation."""

    ratio: float  # ||realised|| / ||intended||
    cosine: float  # cosine(realised, intended)
    changed_fraction: float  # share of elements whose working value changed

    @property
    def intended_zero(self) -> bool:
        return math.isnan(self.ratio)

    @property
    def ok(self) -> bool:
        """Within tolerance, or nothing to perturb (rho 0, zero gradient)."""
        return self.intended_zero or (abs(self.ratio - 1.0) <= RATIO_TOLERANCE and self.cosine >= COSINE_MIN)

    def describe(self) -> str:
        return (f"realised/intended norm {self.ratio:.3g}, cosine {self.cosine:.3g}, "
                f"{100 * self.changed_fraction:.3g} % of the weights changed")


def fidelity_tensors(sums: torch.Tensor, numel: int) -> dict[str, torch.Tensor]:
    """The three figures as 0-dim device tensors (no host read) from the summed
    ``[sum r*r, sum d*d, sum r*d, count(r != 0)]``; NaN ratio and cosine when d = 0."""
    rr, dd, rd, changed = sums.double().unbind()
    nan = torch.full_like(dd, float("nan"))
    some = dd > 0
    ratio = torch.where(some, (rr / dd.clamp_min(1e-300)).sqrt(), nan)
    cosine = torch.where(some & (rr > 0), rd / (rr * dd).clamp_min(1e-300).sqrt(), torch.where(some, torch.zeros_like(dd), nan))
    return {"perturb_realized_ratio": ratio, "perturb_cosine": cosine, "perturb_changed_fraction": changed / max(numel, 1)}


def fidelity_from_sums(sums: torch.Tensor, numel: int) -> Fidelity:
    values = torch.stack(list(fidelity_tensors(sums, numel).values())).tolist()
    return Fidelity(*values)


def perturbation_fidelity(weights, direction, rho: float, dtype: torch.dtype = torch.bfloat16,
                          backend: str = "torch") -> Fidelity:
    """The fidelity of ``d = rho * ||W|| / ||g|| * g`` held in ``dtype``, on one process.

    ``weights`` and ``direction``: one fp32 tensor each, or equal-length lists of them (the
    shards of a model; the norms are global over all of them, as ``perturb_norm: global``).
    Nothing is written. Stable interface for scripts (the GPU check's bf16 table)."""
    ws = [weights] if torch.is_tensor(weights) else list(weights)
    gs = [direction] if torch.is_tensor(direction) else list(direction)
    if len(ws) != len(gs):
        raise ValueError(f"weights and direction must pair up: {len(ws)} tensors against {len(gs)}")
    ws = [w.detach().reshape(-1).float().contiguous() for w in ws]
    gs = [g.detach().reshape(-1).float().contiguous() for g in gs]
    w2 = sum(w.double().square().sum() for w in ws)
    g2 = sum(g.double().square().sum() for g in gs)
    scale = (rho * w2.sqrt() / g2.sqrt()).float() if g2 > 0 else torch.zeros((), device=ws[0].device)
    sums = sum(sap_ds_kernels.perturbation_stats(w, g, scale.to(w.device), dtype, backend=backend).to(ws[0].device)
               for w, g in zip(ws, gs))
    return fidelity_from_sums(sums, sum(w.numel() for w in ws))


def shard_fidelity(shards, state, multiplier: float = 1.0, backend: str = "auto") -> Fidelity:
    """The fidelity, over all ranks, of the current direction at ``multiplier`` times the
    current scale, computed from this rank's shards (nothing written, one all-reduce)."""
    sums = None
    for i, g in enumerate(shards.groups):
        source = g.master  # before the perturbation the master (or fp32 working shard) is W
        part = sap_ds_kernels.perturbation_stats(source, state.direction[i], state.scale * multiplier, g.lp.dtype,
                                                 backend=backend)
        sums = part if sums is None else sums + part.to(sums.device)
    if sums is None:
        sums = torch.zeros(sap_ds_kernels.N_STATS, dtype=torch.float64)
    return fidelity_from_sums(all_reduce_sum(sums), shards.trainable_numel)


def smallest_passing_multiplier(evaluate, ceiling: float, steps: int = BISECTION_STEPS) -> float | None:
    """Smallest m in (1, ceiling] with ``evaluate(m).ok``, to within ``4 ** (1 / 2**steps)``
    (fidelity rises with the radius: first a search by factors of 4, then bisection in log
    space); None when even ``ceiling`` fails."""
    lo, hi = 1.0, 4.0
    while not evaluate(min(hi, ceiling)).ok:
        if hi >= ceiling:
            return None
        lo, hi = hi, hi * 4
    hi = min(hi, ceiling)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if evaluate(mid).ok:
            hi = mid
        else:
            lo = mid
    return hi


def round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (a radius to put in a config)."""
    if x <= 0 or not math.isfinite(x):
        return x
    exponent = math.floor(math.log10(x)) - digits + 1
    return math.ceil(x / 10**exponent - 1e-9) * 10**exponent


def check(shards, state, cfg, dtype_name: str) -> Fidelity:
    """The check before step 1 on the first safety direction: returns the measured
    fidelity if it passes (or ``sap.resolution_check`` is off), else raises ConfigError
    (``error``) or logs a warning (``warn``) naming sap.rho and what to set instead."""
    measured = shard_fidelity(shards, state, 1.0, cfg.kernels)
    if cfg.resolution_check == "off" or measured.ok:
        return measured
    ceiling = RHO_CEILING / cfg.rho
    best = smallest_passing_multiplier(lambda m: shard_fidelity(shards, state, m, cfg.kernels), ceiling)
    if best is None:
        advice = f"no sap.rho up to {RHO_CEILING:g} meets it"
    else:
        advice = f"the smallest sap.rho that meets it on these weights is about {round_up(cfg.rho * best):.2g}"
    message = (
        f"sap.rho={cfg.rho:g} is below what the {dtype_name} working weights can represent: at the first safety "
        f"direction the perturbation the probe pass would see has {measured.describe()} (needed: norm within "
        f"{100 * RATIO_TOLERANCE:.0f} % of the intended one and cosine >= {COSINE_MIN}); {advice}. Set sap.rho to "
        f"that, or train in fp32 (model.dtype=fp32), or set sap.resolution_check=warn to run anyway "
        f"(the probe would measure rounding noise)"
    )
    refuse_or_warn(message, cfg)
    return measured


def refuse_or_warn(message: str, cfg) -> None:
    """What ``sap.resolution_check`` does with a failed check (``off`` never gets here): a
    ConfigError on every rank alike (``error``), or one warning, from rank 0 (``warn``)."""
    if cfg.resolution_check == "error":
        raise ConfigError(message)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.warning("%s", message)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype`` at 1: the relative rounding of one stored value (bf16 2**-8)."""
    return torch.finfo(dtype).eps / 2


def probe_signal_ratio(at_perturbed: torch.Tensor, at_weights: torch.Tensor, dtype: torch.dtype) -> float:
    """``||gV|| / (u * max(||grad_V L(W')||, ||grad_V L(W)||))`` with ``gV = at_perturbed +
    at_weights`` (``at_perturbed`` is -grad_V L(W'), as the probe pass returns it); NaN when
    both terms are zero (nothing to measure)."""
    terms = max(at_perturbed.double().norm().item(), at_weights.double().norm().item())
    if terms == 0:
        return float("nan")
    return (at_perturbed.double() + at_weights.double()).norm().item() / (unit_roundoff(dtype) * terms)


def check_probe_signal(ratio: float, cfg, dtype_name: str) -> None:
    """The probe half of the check before step 1: ConfigError (``sap.resolution_check: error``)
    or a warning (``warn``) when gV is worth fewer than ``PROBE_SIGNAL_MIN`` roundings of its
    terms, naming sap.rho and the radius that would reach it."""
    if cfg.resolution_check == "off" or math.isnan(ratio) or ratio >= PROBE_SIGNAL_MIN:
        return
    if ratio > 0:
        advice = (f"gV grows about linearly with rho: sap.rho of at least about "
                  f"{round_up(cfg.rho * PROBE_SIGNAL_MIN / ratio):.2g} would reach it"
                  f"{' (a loose lower bound: at this ratio gV is mostly noise)' if ratio < 2 else ''}")
    else:
        advice = "gV is exactly zero: the passes do not see the perturbation at all, so no radius can be estimated"
    message = (
        f"sap.rho={cfg.rho:g} gives a probe gradient below what the {dtype_name} passes can resolve: on the first task "
        f"batch gV = grad_V L(W) - grad_V L(W') is {ratio:.3g} times the {dtype_name} rounding of its two terms "
        f"(probe_signal_ratio; needed: >= {PROBE_SIGNAL_MIN:g}), so the probe would learn rounding noise even where "
        f"the weights hold the perturbation. {advice}. Set a larger sap.rho, or train in fp32 (model.dtype=fp32), or "
        f"set sap.resolution_check=warn to run anyway"
    )
    refuse_or_warn(message, cfg)
