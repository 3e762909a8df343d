"""Entry point: ``sap-ds eval --model FOLDER --config EVAL_YAML [--base BASE] [--out DIR] [key=value ...]``.

Generates answers to held-out harmful prompts and scores them (harmful score), answers
benign prompts (over-refusal rate) and computes task metrics, for one local model or
LoRA adapter folder. Runs as one process, or data parallel under ``deepspeed --num_gpus N
sap_ds/eval.py ...`` / ``torchrun`` when the model fits one device (each rank holds the
whole model and answers its share of the prompts); a model that does not fit is split
over the node's GPUs by vLLM or transformers' device_map, in one process (the eval
config's ``backend``). Writes ``eval.json`` and ``eval.md`` to ``--out`` (default
``runs/eval/<model path>``). Exit codes as ``sap-ds train``: 0 done, 2 bad configuration
or input, 1 other errors. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if not __package__: sys.path.insert(0, str(Path(__file__).absolute().parents[1]))  # noqa: E701 - run by path

from sap_ds.entry import run_command  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sap-ds eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face folder, a LoRA adapter folder, or "
                        "'embedded' / 'tiny-random'")
    parser.add_argument("--base", default=None, help="an adapter's base model folder (default: base_model_name_or_path "
                        "in its adapter_config.json)")
    parser.add_argument("--config", required=True, help="eval config (YAML or JSON), e.g. configs/eval/demo.yaml")
    parser.add_argument("--out", default=None, help="output folder (default: runs/eval/<model path>)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. generation.max_new_tokens=32")
    return parser.parse_args(argv)


def default_out(model: str) -> Path:
    return Path("runs/eval") / (re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")) or "model")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: evaluate_and_report(args), version_floors="eval")


def evaluate_and_report(args) -> int:
    from sap_ds.evaluation.config import load_eval_config

    cfg = load_eval_config(args.config, args.overrides)  # validate before loading anything heavy
    from sap_ds.evaluation.output import markdown, write_report
    from sap_ds.evaluation.runtime import init_from_env, is_main
    from sap_ds.parallel.distributed import shutdown_distributed

    init_from_env()
    from sap_ds.evaluation.evaluate import evaluate

    result = evaluate(args.model, cfg, args.base)
    main_rank = is_main()  # before the groups go: without one, every process would count as rank 0
    shutdown_distributed()
    if main_rank:
        path = write_report(result, Path(args.out) if args.out else default_out(args.model))
        print(markdown(result), flush=True)
        print(f"sap-ds eval: wrote {path} and {path.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
