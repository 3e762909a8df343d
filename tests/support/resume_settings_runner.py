"""``sap-ds train`` under the real launcher, recording the optimizer settings each step used.

    deepspeed --num_gpus 2 tests/support/resume_settings_runner.py --record FILE --config C [key=value ...]

Runs ``sap_ds.train.main`` unchanged (resume included) with every Trainer's optimizers
wrapped: just before each weight step, the ZeRO-3 optimizer's param group (lr, betas, eps,
weight_decay) and its gradient clipping; before each step of SAP's probe AdamW, its lr and
eps. Rank 0 writes the records to FILE as JSON: ``{"weights": [...], "probe": [...]}``,
each entry with the 0-based ``step`` it belongs to. What the steps were given, read from
the optimizers themselves, not from the logs (tests/test_resume.py, changed settings).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout


def instrument(records: dict) -> None:
    """Wrap ``Trainer.__init__`` so that each new Trainer's optimizers record their settings."""
    from sap_ds.training.trainer import Trainer

    original_init = Trainer.__init__

    def recording_init(trainer, *args, **kwargs):
        original_init(trainer, *args, **kwargs)
        zero = trainer.engine.optimizer
        weight_step = zero.step

        def step_weights(*a, **k):
            group = zero.param_groups[0]
            records["weights"].append({"step": trainer.step, "lr": group["lr"], "betas": list(group["betas"]),
                                       "eps": group["eps"], "weight_decay": group["weight_decay"],
                                       "clip_grad": zero.clip_grad})
            return weight_step(*a, **k)

        zero.step = step_weights
        sap_state = getattr(trainer.method, "state", None)  # SapMethod's
        probe_optimizer = sap_state.probe_optimizer if sap_state is not None else None
        if probe_optimizer is not None:
            probe_step = probe_optimizer.step

            def step_probe(*a, **k):
                group = probe_optimizer.param_groups[0]
                records["probe"].append({"step": trainer.step, "lr": group["lr"], "eps": group["eps"]})
                return probe_step(*a, **k)

            probe_optimizer.step = step_probe

    Trainer.__init__ = recording_init


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True, help="JSON file for the recorded settings (rank 0)")
    args, rest = parser.parse_known_args()
    records = {"weights": [], "probe": []}
    instrument(records)
    from sap_ds.train import main as train_main

    code = train_main(rest)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.record, "w", encoding="utf-8") as handle:
            json.dump(records, handle)
    return code


if __name__ == "__main__":
    sys.exit(main())
