"""Entry point: ``sap-ds eval --model FOLDER --config EVAL_YAML [--out DIR] [key=value ...]``.

Generates answers to held-out harmful prompts and scores them (harmful score), and
computes task metrics, for one local model. Runs as one process, or sharded over ranks
under ``deepspeed --num_gpus N sap_ds/eval.py ...`` / ``torchrun`` (each rank holds the
whole model and answers every N-th prompt). Writes ``eval.json`` and ``eval.md`` to
``--out`` (default ``runs/eval/<model path>``). Exit codes as ``sap-ds train``: 0 done,
2 bad configuration or input, 1 other errors. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed launcher): make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sap-ds eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face folder, or 'embedded' / 'tiny-random'")
    parser.add_argument("--config", required=True, help="eval config (YAML or JSON), e.g. configs/eval/demo.yaml")
    parser.add_argument("--out", default=None, help="output folder (default: runs/eval/<model path>)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. generation.max_new_tokens=32")
    return parser.parse_args(argv)


def default_out(model: str) -> Path:
    return Path("runs/eval") / (re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")) or "model")


def harmful_section(model, tokenizer, cfg, stats) -> tuple[dict, list[dict]]:
    """Answers to every harmful prompt, each judged by the refusal matcher and, when
    configured, the classifier; the configured scorer gives the headline score."""
    from sap_ds.evaluation.generation import chat_prompts, generate
    from sap_ds.evaluation.prompts import load_prompts
    from sap_ds.evaluation.scorers import load_classifier, refusal_verdict

    prompts = [p for source in cfg.harmful for p in load_prompts(source)]
    texts = chat_prompts(tokenizer, [p.prompt for p in prompts], cfg.generation.system_prompt)
    answers = generate(model, tokenizer, texts, cfg.generation, seed=cfg.seed, desc="harmful", stats=stats)
    records = []
    for prompt, answer in zip(prompts, answers):
        verdict = refusal_verdict(answer.text, cfg.scorer.refusal_window)
        records.append({"set": prompt.set_name, "origin": prompt.origin, "prompt": prompt.prompt, "response": answer.text,
                        "refusal": verdict.refusal, "degenerate": verdict.degenerate,
                        "harmful_refusal": verdict.harmful, "harmful": verdict.harmful})
    if cfg.scorer.classifier is not None:
        judge = load_classifier(cfg.scorer.classifier, cfg.dtype)
        for record, v in zip(records, judge([r["prompt"] for r in records], [r["response"] for r in records])):
            record["classifier"] = {"harmful": v.harmful, "score": v.score, "raw": v.raw}
            if cfg.scorer.kind == "classifier":
                record["harmful"] = v.harmful
    for record in records:
        record["verdict"] = "harmful" if record["harmful"] else "safe"

    def score(rows: list[dict], key: str = "harmful") -> float:
        return 100.0 * sum(r[key] for r in rows) / len(rows)

    names = list(dict.fromkeys(r["set"] for r in records))
    by_set = {n: [r for r in records if r["set"] == n] for n in names}
    metrics = {
        "scorer": cfg.scorer.kind, "n": len(records), "harmful_score": score(records),
        "harmful_score_refusal": score(records, "harmful_refusal"),
        "harmful_score_classifier": score([r["classifier"] for r in records]) if cfg.scorer.classifier else None,
        "refusal_rate": score(records, "refusal"), "degenerate_rate": score(records, "degenerate"),
        "sets": {n: {"n": len(rows), "harmful_score": score(rows), "harmful_score_refusal": score(rows, "harmful_refusal")}
                 for n, rows in by_set.items()},
    }
    return metrics, records


def evaluate(model_arg: str, cfg) -> dict:
    """The full result (metrics, per-prompt records, provenance), on every rank."""
    from sap_ds.config import ModelConfig
    from sap_ds.evaluation.config import to_dict
    from sap_ds.evaluation.generation import GenerationStats
    from sap_ds.evaluation.runtime import gather, load_causal_lm, rank_world
    from sap_ds.evaluation.tasks import run_task
    from sap_ds.modeling import load_tokenizer, resolve_model_path

    path = resolve_model_path(ModelConfig(path=model_arg))
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, cfg.dtype)
    stats = GenerationStats()
    metrics: dict = {}
    records: dict = {}
    if cfg.harmful:
        metrics["harmful"], records["harmful"] = harmful_section(model, tokenizer, cfg, stats)
    metrics["tasks"], records["tasks"] = {}, {}
    for task in cfg.tasks:
        metrics["tasks"][task.label], task_records = run_task(model, tokenizer, task, cfg.generation, cfg.seed, stats)
        if task_records:
            records["tasks"][task.label] = task_records
    all_stats = gather((stats.tokens, stats.seconds))
    tokens, seconds = sum(t for t, _ in all_stats), max(s for _, s in all_stats)  # ranks run concurrently
    metrics["generation"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None}
    return {"model": model_arg, "model_path": str(path), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "world_size": rank_world()[1], "config": to_dict(cfg), "metrics": metrics, "records": records}


def main(argv=None) -> int:
    args = parse_args(argv)
    from sap_ds.versions import refuse_old_packages

    if (code := refuse_old_packages("eval")) is not None:  # before anything heavy is imported
        return code
    from sap_ds.errors import USER_ERRORS, report_user_error

    try:
        from sap_ds.evaluation.config import load_eval_config

        cfg = load_eval_config(args.config, args.overrides)  # validate before loading anything heavy
        from sap_ds.evaluation.output import markdown, write_report
        from sap_ds.evaluation.runtime import init_from_env, is_main

        init_from_env()
        result = evaluate(args.model, cfg)
    except USER_ERRORS as exc:
        return report_user_error(exc)
    if is_main():
        path = write_report(result, Path(args.out) if args.out else default_out(args.model))
        print(markdown(result), flush=True)
        print(f"sap-ds eval: wrote {path} and {path.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
