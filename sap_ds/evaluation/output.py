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
    return lines


def write_report(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / JSON_NAME, json.dumps(result, indent=1, ensure_ascii=False))
    atomic_write_text(out_dir / MARKDOWN_NAME, markdown(result))
    return out_dir / JSON_NAME
