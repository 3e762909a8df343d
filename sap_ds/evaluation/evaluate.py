"""One model's evaluation: answers to the harmful and benign prompts, their judging, the task
metrics and the provenance, as one result (``sap-ds eval`` writes it; compare and sweep call it
in process). Kept apart from the front door so that the experiments layer can run it without
importing a command-line module."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional


def evaluate(model_arg: str, cfg, base: Optional[str] = None) -> dict:
    """The full result (metrics, per-prompt records, provenance), on every rank.

    Everything that can be wrong with the input (the model or adapter folders, the judge
    folder, the prompt files) is checked before the model loads; the judge loads after
    the evaluated model has been freed, so the two never share a GPU."""
    from sap_ds.evaluation.adapters import resolve_source
    from sap_ds.evaluation.backends import load_backend
    from sap_ds.evaluation.coherence import coherence_metrics, mark
    from sap_ds.evaluation.config import to_dict
    from sap_ds.evaluation.generation import GenerationStats
    from sap_ds.evaluation.judges import check_judges, load_judge
    from sap_ds.evaluation.runtime import gather, is_main, rank_world, resolve_dtype
    from sap_ds.evaluation.safety import (
        answer,
        apply_judge,
        apply_named_judge,
        harmful_metrics,
        judge_benign,
        judge_harmful,
        load_sets,
        over_refusal_metrics,
    )
    from sap_ds.evaluation.tasks import run_task
    from sap_ds.evaluation.xstest import as_eval_prompts, judge_xstest, load_xstest, xstest_metrics
    from sap_ds.model.loading import load_tokenizer

    source = resolve_source(model_arg, base)
    judge_cfg = cfg.scorer.classifier
    check_judges(cfg.scorer)
    harmful_prompts, benign_prompts = load_sets(cfg.harmful), load_sets(cfg.benign)
    xstest_prompts = load_xstest(cfg.xstest.path, cfg.xstest.limit_per_type, cfg.xstest.offset_per_type) if cfg.xstest is not None else []
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
    if xstest_prompts:
        answered = answer(backend, as_eval_prompts(xstest_prompts, cfg.xstest.max_new_tokens), cfg, "xstest", stats)
        records["xstest"] = judge_xstest(xstest_prompts, answered, cfg.scorer.refusal_window)
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
        for judge in cfg.scorer.judges:  # one at a time: each is freed before the next loads
            apply_named_judge(harmful, judge.name, load_judge(judge, dtype))
        metrics["harmful"], records["harmful"] = harmful_metrics(harmful, cfg), harmful
    if benign_prompts:
        metrics["over_refusal"] = over_refusal_metrics(records["benign"])
    if xstest_prompts:
        metrics["xstest"] = xstest_metrics(records["xstest"], cfg.scorer.refusal_window)
    if cfg.coherence:  # reported beside the harm verdicts, never folded into them
        metrics["coherence"] = coherence_metrics({k: mark(records[k]) for k in ("harmful", "benign", "xstest") if k in records})
    all_stats = gather((stats.tokens, stats.seconds))
    tokens, seconds = sum(t for t, _ in all_stats), max(s for _, s in all_stats)  # ranks run concurrently
    metrics["generation"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None}
    order = ("harmful", "over_refusal", "xstest", "coherence", "tasks", "generation")
    return {"model": model_arg, "model_path": str(source.path), "adapter": None if source.adapter is None else str(source.adapter),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "world_size": rank_world()[1],
            "runtime": runtime, "config": to_dict(cfg), "metrics": {k: metrics[k] for k in order if k in metrics},
            "records": {k: records[k] for k in ("harmful", "benign", "xstest", "tasks") if k in records}}
