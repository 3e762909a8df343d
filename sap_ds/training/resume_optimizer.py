"""On resume, the run config's optimizer settings, not the checkpoint's (docs/design.md,
"Re-runs and resumes").

DeepSpeed's ``engine.load_checkpoint`` restores the optimizer's param groups (lr, betas,
eps, weight_decay) and the LR scheduler's state (its base lrs and position) with the
Adam moments, on both the same-world and the universal path. A user who lowers
``train.lr`` after a spike and resumes would otherwise keep training with the old values
while config.json says the new ones. ``apply_optimizer_settings`` puts the run config's
values back after the load, keeps the moments and the scheduler's position, and sets the
next step's lr from the new base lr and the new schedule at that position.

The other settings are read from the run config at every step already and need nothing:
the schedule's shape (``lr_schedule``, ``warmup_steps``, ``min_lr_ratio``, the total steps
from ``max_steps``/``epochs``: the trainer's ``lr_lambda`` is built from the run config and
LambdaLR does not save a plain function), gradient clipping (DeepSpeed's optimizer takes
``gradient_clipping`` from the DeepSpeed config at engine set-up; the checkpoint holds no
copy), and a method's own optimizer (SAP's probe AdamW: its lr is set before every step from
``sap.probe_lr``; the checkpoint holds its moments only, so ``sap.probe_adam_eps`` is the
config's), whose keys its section names (``MethodSection.optimizer_keys``).
"""
from __future__ import annotations

from typing import Optional

from sap_ds.config.methods import METHOD_SECTIONS
from sap_ds.config.run import RunConfig, config_to_dict, flatten, unused_method_keys

# The run-config keys that decide how the optimizers step; on resume a change of any of
# them is applied from the next step on (and named in the log line of maybe_resume).
OPTIMIZER_KEYS = ("train.lr", "train.lr_schedule", "train.warmup_steps", "train.min_lr_ratio", "train.max_steps",
                  "train.epochs", "train.weight_decay", "train.adam_betas", "train.adam_eps", "train.grad_clip",
                  *(f"{name}.{key}" for name, section in METHOD_SECTIONS.items() for key in section.optimizer_keys))

# Param-group entries that load_checkpoint restores, and the run-config key each comes from.
GROUP_KEYS = {"weight_decay": "train.weight_decay", "betas": "train.adam_betas", "eps": "train.adam_eps"}


def apply_optimizer_settings(engine, cfg: RunConfig) -> list[str]:
    """After ``engine.load_checkpoint``: the run config's lr, betas, eps and weight decay in
    every param group, its lr as the scheduler's base lr, and the next step's lr recomputed
    from them at the scheduler's restored position. Local to each rank (no collective).
    Returns ``"key old -> new"`` for each setting the checkpoint held differently.

    The position is the number of optimizer steps taken (steps skipped as non-finite do not
    advance the schedule, as in the uninterrupted run), so a changed schedule takes effect
    from the first resumed step, as if it had been the run's from the start."""
    t = cfg.train
    groups = engine.optimizer.param_groups
    scheduler = engine.lr_scheduler
    wanted = {"weight_decay": t.weight_decay, "betas": tuple(t.adam_betas), "eps": t.adam_eps}
    changed = []
    if any(base != t.lr for base in scheduler.base_lrs):
        changed.append(f"train.lr {_show(scheduler.base_lrs[0])} -> {_show(t.lr)}")
    for key, value in wanted.items():
        if _plain(groups[0][key]) != _plain(value):
            changed.append(f"{GROUP_KEYS[key]} {_show(groups[0][key])} -> {_show(value)}")
    scheduler.base_lrs = [t.lr] * len(groups)
    # The lr LambdaLR gives at its restored position (last_epoch: the optimizer steps taken),
    # from the new base lr and the trainer's lr_lambda, which the run config built.
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group.update(wanted, lr=lr, initial_lr=t.lr)  # initial_lr: where LambdaLR takes a base lr from when built
    scheduler._last_lr = list(lrs)  # what get_last_lr() reports (the scheduler's own step sets it likewise)
    return changed


def changed_settings(previous: Optional[dict], cfg: RunConfig, applied: list[str]) -> list[str]:
    """The log line's list: the values the checkpoint held differently (``applied``), then
    the other ``OPTIMIZER_KEYS`` that differ from the earlier config.json (``previous``; the
    schedule, clipping, the probe's), as ``key old -> new``. Keys this method does not read
    (the sap section of an SFT run) are left out."""
    if previous is None:
        return list(applied)
    old, new = flatten(previous), flatten(config_to_dict(cfg))
    unused = unused_method_keys(cfg)
    if cfg.train.max_steps and old.get("train.max_steps"):
        unused.add("train.epochs")  # the total steps came from max_steps before and after
    named = {entry.split(" ", 1)[0] for entry in applied}
    more = [f"{key} {_show(old[key])} -> {_show(new.get(key))}" for key in OPTIMIZER_KEYS
            if key not in named and key not in unused and key in old and _plain(old[key]) != _plain(new.get(key))]
    return [*applied, *more]


def _plain(value):
    """A setting for comparison: config.json holds lists where the optimizer holds tuples."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _show(value) -> str:
    """A setting as the log shows it; lists and tuples alike (config.json has lists)."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else repr(value)
