"""The two safety numbers of every eval: the harmful score on harmful requests, and the
over-refusal rate on benign ones.

Harmful score = % of answers to harmful prompts judged harmful (refusal matcher, or a
moderation judge). Over-refusal = % of answers to benign prompts that are refusals, by
the refusal matcher. Why the refusal matcher and not the judge: over-refusal asks
whether the model *declined*, and a harm judge answers another question (a refusal of a
benign request is "safe" to it). The two are reported side by side so that a defence
that makes the model refuse everything (harmful score 0, over-refusal 100) shows it.
"""
from __future__ import annotations

from sap_ds.evaluation.prompts import load_prompts
from sap_ds.evaluation.scorers import is_degenerate, is_refusal, refusal_verdict


def percent(rows: list[dict], key: str) -> float:
    return 100.0 * sum(bool(r[key]) for r in rows) / len(rows)


def by_set(records: list[dict]) -> dict[str, list[dict]]:
    names = list(dict.fromkeys(r["set"] for r in records))
    return {n: [r for r in records if r["set"] == n] for n in names}


def load_sets(sources) -> list:
    """Every prompt of the sets, read before the model loads (a bad file fails first)."""
    return [p for source in sources for p in load_prompts(source)]


def answer(backend, prompts, cfg, desc: str, stats) -> list[dict]:
    """One record per prompt: set, origin, prompt and the model's answer. Sets that share
    a ``max_new_tokens`` are generated together (so several sets share batches, as one)."""
    from sap_ds.evaluation.generation import chat_prompts

    texts = chat_prompts(backend.tokenizer, [p.prompt for p in prompts], cfg.generation.system_prompt)
    answers: list = [None] * len(prompts)
    for limit in dict.fromkeys(p.max_new_tokens for p in prompts):
        group = [i for i, p in enumerate(prompts) if p.max_new_tokens == limit]
        generated = backend.generate([texts[i] for i in group], cfg.generation, seed=cfg.seed, max_new_tokens=limit,
                                     desc=desc, stats=stats)
        for i, a in zip(group, generated):
            answers[i] = a
    return [{"set": p.set_name, "origin": p.origin, "prompt": p.prompt, "response": a.text} for p, a in zip(prompts, answers)]


# --------------------------------------------------------------------------- harmful


def judge_harmful(records: list[dict], cfg) -> list[dict]:
    """The refusal matcher's verdict on each answer (in place, returned)."""
    for record in records:
        verdict = refusal_verdict(record["response"], cfg.scorer.refusal_window)
        record.update(refusal=verdict.refusal, degenerate=verdict.degenerate, harmful_refusal=verdict.harmful,
                      harmful=verdict.harmful)
    return records


def apply_judge(records: list[dict], judge, headline: bool) -> None:
    """A moderation judge's verdicts, added to each record; with ``headline`` (scorer.kind
    classifier) they decide ``harmful``."""
    for record, v in zip(records, judge([r["prompt"] for r in records], [r["response"] for r in records])):
        record["classifier"] = {"harmful": v.harmful, "score": v.score, "raw": v.raw, "parsed": v.parsed}
        if headline:
            record["harmful"] = v.harmful


def apply_named_judge(records: list[dict], name: str, judge) -> None:
    """One judge of ``scorer.judges``: its verdicts go to ``record["judges"][name]`` and
    nowhere else (its own column: judges are compared, never averaged or blended)."""
    for record, v in zip(records, judge([r["prompt"] for r in records], [r["response"] for r in records])):
        verdict = {"harmful": v.harmful, "score": v.score, "raw": v.raw, "parsed": v.parsed}
        if v.categories is not None:
            verdict["categories"] = v.categories
        record.setdefault("judges", {})[name] = verdict


def judges_metrics(records: list[dict], judge_configs) -> dict:
    """Per judge of ``scorer.judges``: its harmful score overall and per set, and how many
    of its verdicts it wrote that its patterns could not read."""
    out = {}
    for judge in judge_configs:
        verdicts = [r["judges"][judge.name] for r in records]
        out[judge.name] = {
            "kind": judge.kind, "preset": judge.preset, "n": len(verdicts), "harmful_score": percent(verdicts, "harmful"),
            "unparsed": sum(not v["parsed"] for v in verdicts),
            "sets": {n: percent([r["judges"][judge.name] for r in rows], "harmful") for n, rows in by_set(records).items()},
        }
    return out


def harmful_metrics(records: list[dict], cfg) -> dict:
    for record in records:
        record["verdict"] = "harmful" if record["harmful"] else "safe"
    judged = [r["classifier"] for r in records if "classifier" in r]
    metrics = {
        "scorer": cfg.scorer.kind, "n": len(records), "harmful_score": percent(records, "harmful"),
        "harmful_score_refusal": percent(records, "harmful_refusal"),
        "harmful_score_classifier": percent(judged, "harmful") if judged else None,
        "classifier_unparsed": sum(not j["parsed"] for j in judged) if judged else None,
        "refusal_rate": percent(records, "refusal"), "degenerate_rate": percent(records, "degenerate"),
        "sets": {n: {"n": len(rows), "harmful_score": percent(rows, "harmful"),
                     "harmful_score_refusal": percent(rows, "harmful_refusal")} for n, rows in by_set(records).items()},
    }
    if cfg.scorer.judges:  # only when configured: the reports of configs without judges stay as they were
        metrics["judges"] = judges_metrics(records, cfg.scorer.judges)
    return metrics


# --------------------------------------------------------------------------- benign


def judge_benign(records: list[dict], window: int) -> list[dict]:
    """Refused or not (the refusal matcher's markers in the first ``window`` characters),
    and degenerate or not (reported beside: a broken model does not refuse, but it does
    not help either)."""
    for record in records:
        record.update(refusal=is_refusal(record["response"], window), degenerate=is_degenerate(record["response"]))
    return records


def over_refusal_metrics(records: list[dict]) -> dict:
    return {
        "scorer": "refusal", "n": len(records), "over_refusal_rate": percent(records, "refusal"),
        "degenerate_rate": percent(records, "degenerate"),
        "sets": {n: {"n": len(rows), "over_refusal_rate": percent(rows, "refusal")} for n, rows in by_set(records).items()},
    }
