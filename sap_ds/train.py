"""Entry point: ``deepspeed sap_ds/train.py --config X [key=value ...]``.

Also runs under ``torchrun``, as ``python -m sap_ds.train`` and as a single ``python
sap_ds/train.py`` process. Exit codes: 0 done (also: already done), 2 bad configuration or
input, 3 stopped by the numerical guard (with a checkpoint), 75 stopped on request
(SIGUSR1, SIGTERM or the stop file; checkpointed, the same command resumes), 1 other
errors. The deepspeed launcher passes a rank's code on; torchrun exits 1 for any failed
rank (its report shows the rank's 75).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if not __package__: sys.path.insert(0, str(Path(__file__).absolute().parents[1]))  # noqa: E701 - run by path

from sap_ds.entry import run_command  # noqa: E402
from sap_ds.errors import EXIT_STOPPED_RESUMABLE, EXIT_TRAINING_STOPPED, TrainingStopped  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sap-ds train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (YAML or JSON), or a shipped config's name "
                        "(demo, 70b/llama2_70b_chat_lora; `sap-ds configs` lists them)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4 method=sap")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    started = time.time()  # a stop file older than this was meant for an earlier run
    args = parse_args(argv)
    return run_command(lambda: train(args, started), version_floors="train", console_log=True)


def train(args, started: float) -> int:
    """The run ``args`` asks for, from its config to its summary: the exit code (0, 3 or 75;
    a user error is raised, for ``run_command`` to report)."""
    from sap_ds.config.run import load_config

    cfg = load_config(args.config, args.overrides)  # validate before any process group exists
    from sap_ds.training.resume import clear_stale_stop_file, finished_run

    check_inputs(cfg)  # first: a mistyped path in a finished run's folder is a missing file, not a config change
    done = finished_run(cfg)  # a finished run: done, or an error if it was trained under another config
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if done is not None:
        if rank0:
            print_done(cfg.output_dir, done)
        return 0
    if rank0:
        clear_stale_stop_file(Path(cfg.output_dir), started)
    fail_fast(cfg)
    from sap_ds.parallel.distributed import process_groups

    with process_groups(cfg.distributed) as (rank, _, world):
        return train_in_groups(cfg, rank, world)


def train_in_groups(cfg, rank: int, world: int) -> int:
    """``train``'s part inside the process groups, which end with it (0, 3 or 75)."""
    from sap_ds.parallel.distributed import barrier, is_main
    from sap_ds.training.trainer import Trainer

    try:
        summary = Trainer(cfg, rank, world).train()
    except TrainingStopped as exc:  # every rank stops at the same step, with its checkpoint written
        print(f"sap-ds: stopped: {exc}", file=sys.stderr, flush=True)
        return EXIT_TRAINING_STOPPED
    if is_main():
        print_done(cfg.output_dir, summary) if summary.get("already_done") else print_summary(summary)
    if summary.get("preempted"):
        # The deepspeed launcher ends every rank once one exits non-zero: all ranks leave together,
        # after rank 0 has written the REQUEUE marker, removed the stop file and printed the above.
        barrier()
        return EXIT_STOPPED_RESUMABLE
    return 0


def fail_fast(cfg) -> None:
    """Checks that need no process group: a bad model path, attention backend or DeepSpeed
    file, or a checkpoint of another run in output_dir, should fail in seconds, before
    ranks start and data loads."""
    from sap_ds.parallel.distributed import prepare_environment

    prepare_environment()
    check_run(cfg, int(os.environ["WORLD_SIZE"]))


def check_run(cfg, world_size: int) -> None:
    """``fail_fast``'s checks themselves, for callers that build Trainers in a process whose
    environment is already set up (tests/support/shipped_configs_runner.py): one list, so a check
    added here reaches every entry point."""
    from sap_ds.methods.safelora import check_export_config as check_safelora_models
    from sap_ds.model.loading import check_attention
    from sap_ds.parallel.ds_config import load_ds_config
    from sap_ds.training.checkpoint import check_resumable
    from sap_ds.training.metrics import check_logging

    check_inputs(cfg)
    check_model_config(cfg)
    check_attention(cfg.model.attn_implementation)
    check_safelora_models(cfg)
    check_logging(cfg)
    load_ds_config(cfg, world_size)
    check_resumable(cfg)


def check_inputs(cfg) -> None:
    """The model folder and every data file exist; else one ConfigError naming each missing
    one with the override that replaces it (configs/70b and the paper config hold
    /path/to/... placeholders for what a user brings)."""
    from sap_ds.config.run import missing_inputs
    from sap_ds.errors import ConfigError, ModelError
    from sap_ds.model.loading import resolve_model_path

    problems = missing_inputs(cfg)
    try:
        resolve_model_path(cfg.model)
    except ModelError as exc:
        problems.insert(0, f"{exc}; or pass model.path=/your/model/folder on the command line")
    if problems:
        raise ConfigError("the config names files that are not here:\n  " + "\n  ".join(problems))


def check_model_config(cfg) -> None:
    """The method's checks against the model's config.json, before the model loads
    (``Method.check_model_config``: SAP's probe layers against the depth, so that a band
    such as '11-20' on a shallower model fails here, a ProbeError)."""
    from sap_ds.methods import build_method
    from sap_ds.model.loading import resolve_model_path

    build_method(cfg).check_model_config(resolve_model_path(cfg.model))


def print_done(output_dir: str, summary: dict) -> None:
    print(f"sap-ds: {output_dir} holds this run, finished at step {summary.get('final_step')} under the same config "
          f"(summary.json); nothing to train or export. To train it again: train.resume=never (overwrites it) "
          f"or a new output_dir.", flush=True)


def print_summary(summary: dict) -> None:
    if summary.get("preempted"):
        print(f"\nsap-ds: stopped at step {summary['step']} on request; checkpoint {summary['checkpoint']}. The same "
              f"command resumes the run (exit code {EXIT_STOPPED_RESUMABLE}: stopped, resumable).", flush=True)
        return
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        ("method", summary["method"]),
        ("steps", summary["final_step"]),
        ("final train loss", fmt(summary["final_train_loss"])),
        ("final eval loss", fmt(summary["final_eval_loss"])),
        ("tokens/s", f"{summary['tokens_per_s']:.1f}" if summary["tokens_per_s"] else "n/a"),
        ("model TFLOP/s, MFU", _throughput(summary)),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("model written to", summary["export_dir"]),
        ("checkpoints", summary["checkpoint_dir"]),
    ]
    width = max(len(k) for k, _ in lines)
    print("\n== sap-ds summary ==", flush=True)
    for key, value in lines:
        print(f"{key:<{width}}  {value}", flush=True)
    print(json.dumps({"summary": summary}), flush=True)


def _throughput(summary: dict) -> str:
    tflops, mfu = summary.get("model_tflops_per_s"), summary.get("mfu")
    if tflops is None:
        return "n/a"
    return f"{tflops:.3g}, " + (f"{100 * mfu:.1f} %" if mfu is not None else f"n/a ({summary.get('mfu_note')})")


if __name__ == "__main__":
    sys.exit(main())
