"""The answers a model gives most often, per model of a compare or sweep folder.

    python scripts/answer_openings.py runs/sweeps/standard_table [--set harmful] [--words 5] [--top 3]

A string judge reads only what its rules list (docs/evaluation.md, "What none of these
columns catches"): a model that answers every harmful prompt with the same five words, or
refuses in words no rule lists, gets a harmful score that says nothing of what it writes.
This prints, for every model whose ``eval.json`` is under the folder (a sweep's or compare's
``<point>/seed*/eval``, its start stages' ``start/<name>/eval`` and the start model's
``eval/start``; the seeds of a point pooled), how many answers of one set there are and
the most frequent openings (the first ``--words`` words, case and punctuation folded) with
their share, and the share of answers that are nothing but one of those openings (a
"bare" answer: the opening is the whole answer, no content behind it). Read-only; the
answers come from ``eval.json``'s records as ``sap-ds eval`` wrote them.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

_WORD = re.compile(r"[\w']+")


def opening(text: str, words: int) -> str:
    return " ".join(_WORD.findall(text.lower().replace("\u2019", "'"))[:words])


def model_name(eval_json: Path, root: Path) -> str:
    """The row a file belongs to: a point (its seeds pooled), a start stage, or the start model."""
    parts = eval_json.relative_to(root).parts
    if parts[:2] == ("eval", "start"):
        return "start model"
    if parts[0] == "start" and len(parts) > 2:
        return f"start model {parts[1]}"
    seeds = [i for i, p in enumerate(parts) if re.fullmatch(r"seed\d+", p)]
    return "/".join(parts[: seeds[-1]]) if seeds else "/".join(parts[:-2])


def collect(root: Path, which: str) -> dict[str, list[str]]:
    """{model: its answers of set ``which``} over every eval.json under ``root`` (attack runs
    and re-evaluations in other folders than ``eval`` are left out: one file per model and seed)."""
    answers: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("eval.json")):
        if path.parent.name != "eval" and path.parent.parent.name != "eval":
            continue
        if "attack" in path.relative_to(root).parts:
            continue
        records = json.loads(path.read_text(encoding="utf-8")).get("records", {})
        if which not in records:
            raise SystemExit(f"{path}: no '{which}' records (sets there: {', '.join(records) or 'none'})")
        answers[model_name(path, root)] += [r.get("response", "") for r in records[which]]
    return answers


def summarise(answers: list[str], words: int, top: int) -> tuple[list[tuple[str, float]], float]:
    """The ``top`` most frequent openings with their share, and the share of bare answers
    (the whole answer is one of those openings)."""
    counts = Counter(opening(a, words) for a in answers)
    common = counts.most_common(top)
    frequent = {o for o, n in common if n > 1}
    bare = sum(1 for a in answers if opening(a, words + 1) in frequent)
    return [(o, n / len(answers)) for o, n in common], bare / len(answers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a compare or sweep out_dir")
    parser.add_argument("--set", default="harmful", help="the records' set: harmful, benign, xstest (default harmful)")
    parser.add_argument("--words", type=int, default=5, help="words of an answer's opening (default 5)")
    parser.add_argument("--top", type=int, default=3, help="openings shown per model (default 3)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"{args.folder}: not a folder", file=sys.stderr)
        return 2
    answers = collect(args.folder, args.set)
    if not answers:
        print(f"{args.folder}: no eval/eval.json below it", file=sys.stderr)
        return 2
    print(f"| model | answers | bare (%) | most frequent openings ({args.words} words, share) |")
    print("|---|---|---|---|")
    for model, texts in answers.items():
        common, bare = summarise(texts, args.words, args.top)
        shown = "; ".join(f'"{o}" {100 * share:.0f} %' for o, share in common)
        print(f"| {model} | {len(texts)} | {100 * bare:.1f} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
