"""``sap-ds bench``: throughput of vanilla SFT, SAP variants and the other methods, back to back, in one launch.

    sap-ds bench --config configs/bench_cpu.yaml --out runs/bench_cpu/bench.json
    deepspeed --num_gpus 8 sap_ds/bench.py --config C --out F.json [--warmup N] [--steps N]
    python -m sap_ds.bench --config C --out F.json [--variants sft,paper] [key=value ...]

The config is a run config (the same file train.py takes) with an optional ``bench:``
section (warm-up and timed steps, the variants and their dotted overrides; without it:
every method's own, ``MethodSection.bench_variants``: sft, paper, fast, lisa and
safety_mix). ``key=value`` arguments override the base config for every variant. Each variant builds a fresh Trainer on the same model, data and DeepSpeed
config, runs W warm-up and N timed optimizer steps, and is torn down (a second
``deepspeed.initialize`` in the same process works: checked by the tests, and the SFT
losses of a re-built engine reproduce bit for bit).

Written: ``--out`` (JSON, atomically) and the same path with ``.png`` (tokens/s per
variant with the ratio to SFT and the ideal ratio, and the per-phase time split);
per-variant trainer metrics under ``<out stem>_runs/<variant>/``. FLOPs: ``sap_ds.cost.flops``.

This module is the front door (flags, the launch, errors): what is measured and how is
``sap_ds.experiments.bench_runs``, the record and its chart ``sap_ds.experiments.bench_report``,
the machine ``sap_ds.cost.hardware``.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

if not __package__: sys.path.insert(0, str(Path(__file__).absolute().parents[1]))  # noqa: E701 - run by path

from sap_ds.entry import run_command  # noqa: E402
from sap_ds.experiments.bench_runs import BenchSection, load_bench_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sap-ds bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config with an optional bench: section, e.g. configs/bench_cpu.yaml")
    parser.add_argument("--out", required=True, help="JSON output; the chart goes next to it as .png")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default: bench.warmup_steps)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: bench.timed_steps)")
    parser.add_argument("--rounds", type=int, default=None, help="repeat the variant list (default: bench.rounds)")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variant names, in this order")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base config (all variants)")
    return parser.parse_args(argv)


def select(bench: BenchSection, args) -> BenchSection:
    from sap_ds.errors import ConfigError

    update = {}
    if args.warmup is not None:
        if args.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0 (got {args.warmup})")
        update["warmup_steps"] = args.warmup
    if args.steps is not None:
        if args.steps <= 0:
            raise ConfigError(f"--steps must be > 0 (got {args.steps})")
        update["timed_steps"] = args.steps
    if args.rounds is not None:
        if args.rounds <= 0:
            raise ConfigError(f"--rounds must be > 0 (got {args.rounds})")
        update["rounds"] = args.rounds
    if args.variants:
        by_name = {v.name: v for v in bench.variants}
        wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown or not wanted:
            raise ConfigError(f"--variants: unknown {unknown}; the config defines: {', '.join(by_name)}")
        update["variants"] = [by_name[n] for n in wanted]
    return bench.model_copy(update=update)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: bench_and_report(args, argv), version_floors="bench", console_log=True)


def bench_and_report(args, argv) -> int:
    bench, base, tree = load_bench_config(args.config, args.overrides)
    bench = select(bench, args)
    from sap_ds.train import fail_fast

    fail_fast(base)
    from sap_ds.experiments import bench_report, bench_runs
    from sap_ds.parallel.distributed import process_groups

    out = Path(args.out)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with process_groups(base.distributed) as (rank, _, world):  # measure holds the last collective
        measured = bench_runs.measure(tree, list(args.overrides), base, bench, rank, world, out.parent / f"{out.stem}_runs")
    if measured is None:  # not rank 0
        return 0
    peak, records = measured
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(["sap-ds bench", *argv])
    result = bench_report.bench_result(records, date=date, world=world, command=command, peak=peak, bench=bench,
                                       base=base)
    bench_report.write_result(result, out, chart=not args.no_plot)
    print("\n== sap-ds bench ==\n" + bench_report.format_table(result), flush=True)
    print(f"written: {out}" + ("" if args.no_plot else f", {out.with_suffix('.png')}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
