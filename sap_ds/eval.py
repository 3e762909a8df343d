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
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script (deepspeed launcher): make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def evaluate(model_arg: str, cfg, base: Optional[str] = None) -> dict:
    """The full result (metrics, per-prompt records, provenance), on every rank.

    Everything that can be wrong with the input (the model or adapter folders, the judge
    folder, the prompt files) is checked before the model loads; the judge loads after
    the evaluated model has been freed, so the two never share a GPU."""
    from sap_ds.evaluation.adapters import resolve_source
    from sap_ds.evaluation.backends import load_backend
    from sap_ds.evaluation.config import to_dict
    from sap_ds.evaluation.generation import GenerationStats
    from sap_ds.evaluation.judges import check_judge_folder, load_judge
    from sap_ds.evaluation.runtime import gather, is_main, rank_world, resolve_dtype
    from sap_ds.evaluation.safety import (
        answer,
        apply_judge,
        harmful_metrics,
        judge_benign,
        judge_harmful,
        load_sets,
        over_refusal_metrics,
    )
    from sap_ds.evaluation.tasks import run_task
    from sap_ds.model.loading import load_tokenizer

    source = resolve_source(model_arg, base)
    judge_cfg = cfg.scorer.classifier
    if judge_cfg is not None:
        check_judge_folder(judge_cfg)
    harmful_prompts, benign_prompts = load_sets(cfg.harmful), load_sets(cfg.benign)
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(source.tokenizer_path)
    backend, runtime = load_backend(source, tokenizer, cfg, dtype)
    if is_main():
        print(f"sap-ds eval: backend {runtime['backend']} ({runtime['reason']}), {dtype}", flush=True)
    stats = GenerationStats()
    metrics: dict = {}
    records: dict = {}
    harmful = answer(backend, harmful_prompts, cfg, "harmful", stats) if harmful_prompts else None
    if benign_prompts:
        records["benign"] = judge_benign(answer(backend, benign_prompts, cfg, "benign", stats), cfg.scorer.refusal_window)
    metrics["tasks"], records["tasks"] = {}, {}
    for task in cfg.tasks:
        metrics["tasks"][task.label], task_records = run_task(backend, task, cfg.generation, cfg.seed, stats)
        if task_records:
            records["tasks"][task.label] = task_records
    backend.close()
    if harmful is not None:
        judge_harmful(harmful, cfg)
        if judge_cfg is not None:
            apply_judge(harmful, load_judge(judge_cfg, dtype), headline=cfg.scorer.kind == "classifier")
        metrics["harmful"], records["harmful"] = harmful_metrics(harmful, cfg), harmful
    if benign_prompts:
        metrics["over_refusal"] = over_refusal_metrics(records["benign"])
    all_stats = gather((stats.tokens, stats.seconds))
    tokens, seconds = sum(t for t, _ in all_stats), max(s for _, s in all_stats)  # ranks run concurrently
    metrics["generation"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None}
    order = ("harmful", "over_refusal", "tasks", "generation")
    return {"model": model_arg, "model_path": str(source.path), "adapter": None if source.adapter is None else str(source.adapter),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "world_size": rank_world()[1],
            "runtime": runtime, "config": to_dict(cfg), "metrics": {k: metrics[k] for k in order if k in metrics},
            "records": {k: records[k] for k in ("harmful", "benign", "tasks") if k in records}}


def main(argv=None) -> int:
    args = parse_args(argv)
    from sap_ds.dependencies import refuse_old_packages

    if (code := refuse_old_packages("eval")) is not None:  # before anything heavy is imported
        return code
    from sap_ds.errors import USER_ERRORS, report_user_error

    try:
        from sap_ds.evaluation.config import load_eval_config

        cfg = load_eval_config(args.config, args.overrides)  # validate before loading anything heavy
        from sap_ds.evaluation.output import markdown, write_report
        from sap_ds.evaluation.runtime import init_from_env, is_main

        init_from_env()
        result = evaluate(args.model, cfg, args.base)
    except USER_ERRORS as exc:
        return report_user_error(exc)
    if is_main():
        path = write_report(result, Path(args.out) if args.out else default_out(args.model))
        print(markdown(result), flush=True)
        print(f"sap-ds eval: wrote {path} and {path.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
