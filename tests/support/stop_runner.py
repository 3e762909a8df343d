"""``sap-ds train`` stopped by a person at a known step, for the tests of stopping and resuming.

    SAP_DS_TEST_STOP_AFTER=N [deepspeed --num_gpus 2] tests/support/stop_runner.py --config C [key=value ...]

Runs ``sap_ds.train.main`` unchanged, except that rank 0 creates the stop file
(``$SAP_DS_STOP_FILE``, default ``output_dir/STOP``) as soon as it has trained step N, as a
person does with ``touch output_dir/STOP`` during a run. Every rank looks for the file at the
end of each step and all agree through an all-reduce, so the run checkpoints and stops at
step N exactly (a file made before the start would not do: that one is an earlier run's
request, removed as stale when the run starts).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout


def main() -> int:
    after = int(os.environ["SAP_DS_TEST_STOP_AFTER"])
    from sap_ds.train import main as train_main
    from sap_ds.training import resume, trainer

    train_step = trainer.Trainer.train_step

    def train_step_then_stop(self, step: int):
        losses = train_step(self, step)
        if step + 1 == after and self.rank == 0:
            resume.stop_file(self.out).touch()
        return losses

    trainer.Trainer.train_step = train_step_then_stop
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
