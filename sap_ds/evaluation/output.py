"""The eval report: one JSON file (everything, per prompt) and a markdown summary,
both written atomically (temporary file, then rename), so a reader never sees half a
file and a run that fails leaves the previous report as it was."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from sap_ds.files import atomic_write_text

JSON_NAME, MARKDOWN_NAME = "eval.json", "eval.md"


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    m = result["metrics"]
    runtime = result.get("runtime") or {}
    where = f" · backend {runtime['backend']}, {runtime['dtype']}" if runtime else ""
    adapter = f" (adapter on `{result['model_path']}`)" if result.get("adapter") else ""
    lines = [f"# Evaluation of `{result['model']}`{adapter}", "",
             f"{result['date']} · {result['world_size']} rank(s){where}", ""]
    if "harmful" in m or "over_refusal" in m:
        lines += safety_lines(m.get("harmful"), m.get("over_refusal"))
    if "xstest" in m:
        lines += xstest_lines(m["xstest"])
    if "coherence" in m:
        lines += coherence_lines(m["coherence"])
    if m.get("tasks"):
        lines += ["## Tasks", "", "| task | examples | metric | value |", "|---|---|---|---|"]
        for name, t in m["tasks"].items():
            key = "loss" if "loss" in t else "accuracy"
            lines.append(f"| {name} | {t['n']} | {'test loss' if key == 'loss' else 'accuracy (%)'} | {fmt(t[key], 4 if key == 'loss' else 2)} |")
        lines.append("")
    g = m["generation"]
    lines += [f"Generation: {g['tokens']} tokens in {fmt(g['seconds'], 1)} s, {fmt(g['tokens_per_s'], 1)} tokens/s.", ""]
    return "\n".join(lines)


def safety_lines(h: Optional[dict], o: Optional[dict]) -> list[str]:
    """Harmful score and over-refusal side by side: the headline line, then one table of
    the prompt sets (harmful sets first, then benign)."""
    lines = ["## Safety: harmful score and over-refusal", "",
             "Harmful score: % of answers to harmful prompts judged harmful (lower is safer). Over-refusal: % of "
             "benign prompts refused, by the refusal matcher (lower is more helpful).", ""]
    headline = []
    if h is not None:
        judge = (f", classifier {fmt(h['harmful_score_classifier'])}" + (f", {h['classifier_unparsed']} unparsed verdict(s)"
                 if h.get("classifier_unparsed") else "")) if h.get("harmful_score_classifier") is not None else ""
        headline.append(f"harmful score **{fmt(h['harmful_score'])}** ({h['scorer']}) on {h['n']} prompts (refusal "
                        f"matcher {fmt(h['harmful_score_refusal'])}{judge}, degenerate {fmt(h['degenerate_rate'])} %)")
    if o is not None:
        headline.append(f"over-refusal **{fmt(o['over_refusal_rate'])}** on {o['n']} benign prompts "
                        f"(degenerate {fmt(o['degenerate_rate'])} %)")
    text = "; ".join(headline)
    lines += [text[:1].upper() + text[1:] + ".", "",
              "| prompt set | kind | prompts | harmful score | refusal matcher | over-refusal |", "|---|---|---|---|---|---|"]
    for name, s in (h or {}).get("sets", {}).items():
        lines.append(f"| {name} | harmful | {s['n']} | {fmt(s['harmful_score'])} | {fmt(s['harmful_score_refusal'])} | - |")
    for name, s in (o or {}).get("sets", {}).items():
        lines.append(f"| {name} | benign | {s['n']} | - | - | {fmt(s['over_refusal_rate'])} |")
    lines.append("")
    if h is not None and h.get("judges"):
        lines += judges_lines(h)
    return lines


def judges_lines(h: dict) -> list[str]:
    """One column per judge of ``scorer.judges`` (harmful score, %), never averaged: judges
    disagree on the same answers, and the disagreement is part of the result."""
    judges = h["judges"]
    names = list(judges)
    lines = ["Harmful score by judge (each judge its own column, on the same answers):", "",
             "| prompt set | prompts | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for set_name, s in h["sets"].items():
        lines.append(f"| {set_name} | {s['n']} | " + " | ".join(fmt(judges[j]["sets"][set_name]) for j in names) + " |")
    lines.append(f"| all | {h['n']} | " + " | ".join(fmt(judges[j]["harmful_score"]) for j in names) + " |")
    unparsed = [f"{j} {judges[j]['unparsed']}" for j in names if judges[j]["unparsed"]]
    if unparsed:
        lines.append("")
        lines.append("Unparsed verdicts (counted as each judge's `unparsed` setting says): " + ", ".join(unparsed) + ".")
    lines.append("")
    return lines


def xstest_lines(x: dict) -> list[str]:
    """XSTest's two measures by the authors' rule and by the refusal matcher, side by side
    (the per-type figures are in eval.json: ``metrics.xstest.types``)."""
    return ["## XSTest: over-refusal and unsafe compliance", "",
            f"XSTest (Röttger et al. 2024): {x['n_safe']} safe prompts worded like harmful ones and {x['n_unsafe']} unsafe "
            "contrast prompts, judged by the XSTest authors' string-match rule (the answer's opening words) and by the "
            f"refusal matcher (first {x['refusal_window'] or 'all'} characters); per type in eval.json.", "",
            "| measure | prompts | XSTest rule | refusal matcher |", "|---|---|---|---|",
            f"| over-refusal: safe prompts refused (%) | {x['n_safe']} | {fmt(x['over_refusal_rate_xstest_rule'])} | "
            f"{fmt(x['over_refusal_rate_refusal_matcher'])} |",
            f"| unsafe compliance: unsafe prompts not refused (%) | {x['n_unsafe']} | "
            f"{fmt(x['unsafe_compliance_rate_xstest_rule'])} | {fmt(x['unsafe_compliance_rate_refusal_matcher'])} |", ""]


def coherence_lines(c: dict) -> list[str]:
    """The share of empty, degenerate and off-language answers per group, the harmful score
    over all answers and over the coherent ones, and a warning when most answers of a group
    are incoherent: a broken model must not read as safe (or as helpful)."""
    lines = ["## Coherence: empty, degenerate and off-language answers", "",
             "Counted beside the harm and refusal verdicts, not folded into them (sap_ds/evaluation/coherence.py).", "",
             "| answers | n | empty (%) | degenerate (%) | off-language (%) | coherent (%) |", "|---|---|---|---|---|---|"]
    for group, g in c.items():
        lines.append(f"| {group} | {g['n']} | {fmt(g['empty_rate'])} | {fmt(g['degenerate_rate'])} | "
                     f"{fmt(g['off_language_rate'])} | {fmt(g['coherent_rate'])} |")
    lines.append("")
    h = c.get("harmful")
    if h is not None:
        coherent = (f"{fmt(h['harmful_score_coherent'])} over the {h['n_coherent']} coherent ones" if h["n_coherent"]
                    else "n/a over the coherent ones: no answer is coherent, so no harmful score here says the model is safe")
        lines += [f"Harmful score {fmt(h['harmful_score'])} over all {h['n']} harmful answers, {coherent}.", ""]
    for group, g in c.items():
        if g["incoherent_rate"] is not None and g["incoherent_rate"] >= 50.0:
            lines += [f"**Warning: {fmt(g['incoherent_rate'])} % of the {group} answers are incoherent: the figures of "
                      f"this report describe a broken model, not a safe or a helpful one.**", ""]
    return lines


def write_report(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / JSON_NAME, json.dumps(result, indent=1, ensure_ascii=False))
    atomic_write_text(out_dir / MARKDOWN_NAME, markdown(result))
    return out_dir / JSON_NAME
