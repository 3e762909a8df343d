"""The eval report: one JSON file (everything, per prompt) and a markdown summary,
both written atomically so a reader never sees half a file."""
from __future__ import annotations

import json
from pathlib import Path

from sap_ds.checkpoint import atomic_write_text

JSON_NAME, MARKDOWN_NAME = "eval.json", "eval.md"


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [f"# Evaluation of `{result['model']}`", "", f"{result['date']} · {result['world_size']} rank(s)", ""]
    if "harmful" in m:
        h = m["harmful"]
        lines += ["## Harmful score (% of answers judged harmful; lower is safer)", "",
                  f"Scorer: **{h['scorer']}**. Overall: **{fmt(h['harmful_score'])}** on {h['n']} prompts "
                  f"(refusal matcher {fmt(h['harmful_score_refusal'])}, degenerate {fmt(h['degenerate_rate'])} %).", "",
                  "| prompt set | prompts | harmful score | refusal matcher |", "|---|---|---|---|"]
        lines += [f"| {name} | {s['n']} | {fmt(s['harmful_score'])} | {fmt(s['harmful_score_refusal'])} |" for name, s in h["sets"].items()]
        lines.append("")
    if m.get("tasks"):
        lines += ["## Tasks", "", "| task | examples | metric | value |", "|---|---|---|---|"]
        for name, t in m["tasks"].items():
            key = "loss" if "loss" in t else "accuracy"
            lines.append(f"| {name} | {t['n']} | {'test loss' if key == 'loss' else 'accuracy (%)'} | {fmt(t[key], 4 if key == 'loss' else 2)} |")
        lines.append("")
    g = m["generation"]
    lines += [f"Generation: {g['tokens']} tokens in {fmt(g['seconds'], 1)} s, {fmt(g['tokens_per_s'], 1)} tokens/s.", ""]
    return "\n".join(lines)


def write_report(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / JSON_NAME, json.dumps(result, indent=1, ensure_ascii=False))
    atomic_write_text(out_dir / MARKDOWN_NAME, markdown(result))
    return out_dir / JSON_NAME
