"""Is a defence's row of the table different from a reference row, beyond what the choice of
prompts explains? A paired bootstrap over prompts of the difference between the two rows,
read from the runs' per-prompt records (``eval.json``).

Per-prompt outcomes (``outcomes``), each metric in the unit of its table column:

* harmful score: 0/1 per harmful prompt, the headline scorer's verdict (``harmful``), in %;
* over-refusal: 0/1 per XSTest safe prompt, refused by the XSTest authors' rule, in %
  (without an XSTest section: per benign prompt, refused by the refusal matcher);
* task quality: per example, correct or not (accuracy tasks, in %), or the summed
  response cross-entropy and its token count (test loss: the metric is sum / sum, the
  token-weighted loss of the table, not a mean of per-example losses).

A metric is ``scale * sum(values) / sum(weights)`` over a set of prompts (weights 1 for
the 0/1 outcomes), so that the point estimate below is exactly the difference of the
table's columns over the seeds both rows have.

The statistic: for each seed both rows ran, the row's metric minus the reference's on the
same prompts; then the mean over those seeds. Its interval: ``REPLICATES`` = 2000
replicates, each drawing the prompts' indices with replacement once and using the same
indices for every seed and both rows (a prompt's outcome under the defence stays paired
with its outcome under the reference, and a hard prompt counts in every seed alike), the
95 % percentile interval of the replicates' statistic. The generator is
``numpy.random.default_rng(BOOTSTRAP_SEED)``, fresh for every (row, reference, metric),
so a report comes out the same every time it is written.

What the interval is: uncertainty from the finite set of prompts, with the trained models
held fixed; the seeds enter only through their mean (with 1-3 seeds, a bootstrap over
seeds would say nothing). "distinguishable" is said only when the interval excludes 0;
otherwise the report says "interval includes 0", which is not a claim that the rows are
the same. Two rows that evaluated different prompts (another eval config, another set)
are not compared: the entry says why instead of giving a number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from sap_ds.experiments.columns import HARMFUL_SCORE, OVER_REFUSAL, XSTEST_OVER_REFUSAL

REPLICATES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 95.0
DISTINGUISHABLE, INCLUDES_ZERO = "distinguishable", "interval includes 0"


@dataclass(frozen=True)
class Outcomes:
    """One metric of one eval, per prompt: the metric is ``scale * sum(values) / sum(weights)``."""

    prompts: tuple[str, ...]
    values: np.ndarray
    weights: np.ndarray
    scale: float

    @classmethod
    def binary(cls, prompts: list[str], hits: list) -> "Outcomes":
        """A % of prompts: 1 where ``hits`` is true."""
        return cls(tuple(prompts), np.asarray([float(bool(h)) for h in hits]), np.ones(len(hits)), 100.0)


def outcomes(result: dict) -> dict[str, Outcomes]:
    """The per-prompt outcomes of an eval result (``eval.json``) by table column; a metric
    whose records the result lacks (not configured, or an eval.json written before
    per-example test losses were recorded) is absent."""
    records = result.get("records") or {}
    out: dict[str, Outcomes] = {}
    harmful = records.get("harmful") or []
    if harmful:
        out[HARMFUL_SCORE] = Outcomes.binary([r["prompt"] for r in harmful], [r["harmful"] for r in harmful])
    safe = [r for r in records.get("xstest") or [] if r["label"] == "safe"]
    benign = records.get("benign") or []
    if safe:
        out[XSTEST_OVER_REFUSAL] = Outcomes.binary([r["prompt"] for r in safe], [r["refusal_xstest_rule"] for r in safe])
    elif benign:
        out[OVER_REFUSAL] = Outcomes.binary([r["prompt"] for r in benign], [r["refusal"] for r in benign])
    for label, rows in (records.get("tasks") or {}).items():
        if rows and all("correct" in r for r in rows):
            out[f"{label} acc (%)"] = Outcomes.binary([r["prompt"] for r in rows], [r["correct"] for r in rows])
        elif rows and all("nll" in r for r in rows):
            out[f"{label} loss"] = Outcomes(tuple(r["prompt"] for r in rows), np.asarray([r["nll"] for r in rows], float),
                                            np.asarray([r["tokens"] for r in rows], float), 1.0)
    return out


def _mismatch(metric: str, name_a: str, a: Outcomes, name_b: str, b: Outcomes) -> Optional[str]:
    """Why two outcome sets are not the same prompts (None when they are)."""
    if a.prompts == b.prompts:
        return None
    if len(a.prompts) != len(b.prompts):
        return f"{metric}: {name_a} has {len(a.prompts)} prompts, {name_b} {len(b.prompts)}"
    i = next(i for i, (x, y) in enumerate(zip(a.prompts, b.prompts)) if x != y)
    return f"{metric}: prompt {i + 1} differs: {name_a} {a.prompts[i][:60]!r}, {name_b} {b.prompts[i][:60]!r}"


def paired_difference(row: dict[int, Outcomes], reference: dict[int, Outcomes],
                      replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED) -> dict:
    """The mean over common seeds of (row - reference) and its paired bootstrap interval
    (module docstring). ``row`` and ``reference``: per seed, the same metric's outcomes on
    the same prompts (checked by the caller, ``compare_rows``)."""
    seeds = sorted(set(row) & set(reference))
    n = len(row[seeds[0]].prompts)
    index = np.random.default_rng(seed).integers(0, n, size=(replicates, n))
    point, stats = 0.0, np.zeros(replicates)
    for s in seeds:
        for outcome, sign in ((row[s], 1.0), (reference[s], -1.0)):
            point += sign * outcome.scale * outcome.values.sum() / outcome.weights.sum()
            stats += sign * outcome.scale * outcome.values[index].sum(axis=1) / outcome.weights[index].sum(axis=1)
    point, stats = point / len(seeds), stats / len(seeds)
    low, high = (float(v) for v in np.percentile(stats, [(100 - LEVEL) / 2, (100 + LEVEL) / 2]))
    verdict = DISTINGUISHABLE if low > 0 or high < 0 else INCLUDES_ZERO
    return {"difference": float(point), "low": low, "high": high, "level": LEVEL, "verdict": verdict,
            "seeds": seeds, "n_prompts": n, "replicates": replicates}


def compare_rows(row_name: str, row: dict[int, dict], ref_name: str, reference: dict[int, dict]) -> dict:
    """Every metric both rows have per-prompt outcomes for, row minus reference.

    ``row``/``reference``: seed -> that run's per-prompt outcomes (``outcomes``). Only the
    seeds both rows have count. A metric whose prompts differ between any two of those
    runs is refused (``refused``: why), one missing from some run is skipped
    (``skipped``: why); neither raises, so one odd metric leaves the others standing."""
    seeds = sorted(set(row) & set(reference))
    entry: dict = {"row": row_name, "reference": ref_name, "seeds": seeds, "metrics": {}, "skipped": {}, "refused": {}}
    if not seeds:
        entry["error"] = (f"no seed in common ({row_name}: {sorted(row) or 'none'}, {ref_name}: "
                          f"{sorted(reference) or 'none'}): nothing to pair")
        return entry
    names = list(dict.fromkeys(m for s in seeds for m in [*row[s], *reference[s]]))
    for metric in names:
        runs = [(f"{row_name} seed {s}", row[s].get(metric)) for s in seeds] + \
               [(f"{ref_name} seed {s}", reference[s].get(metric)) for s in seeds]
        missing = [name for name, o in runs if o is None]
        if missing:
            entry["skipped"][metric] = f"no per-prompt records in {', '.join(missing)}"
            continue
        first_name, first = runs[0]
        why = next((w for name, o in runs[1:] if (w := _mismatch(metric, first_name, first, name, o))), None)
        if why:
            entry["refused"][metric] = f"different prompts, not compared: {why}"
            continue
        entry["metrics"][metric] = paired_difference({s: row[s][metric] for s in seeds},
                                                     {s: reference[s][metric] for s in seeds})
    return entry


class EvalReader:
    """Per-prompt outcomes of ``eval.json`` files, each file read once (a report compares
    many rows with the same reference). A file that is missing or not an eval.json gives
    no outcomes (its metrics are then skipped) and a line in ``problems``: the report is
    written at the end of a long comparison and must not be lost to one bad file."""

    def __init__(self):
        self._cache: dict[Path, dict[str, Outcomes]] = {}
        self.problems: dict[Path, str] = {}

    def __call__(self, path: Path) -> dict[str, Outcomes]:
        path = Path(path)
        if path not in self._cache:
            try:
                self._cache[path] = outcomes(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                self._cache[path] = {}
                self.problems[path] = f"{path}: not read ({type(exc).__name__}: {exc})"
        return self._cache[path]


def paired_rows(groups: dict[str, dict[int, Path]], pairs: list[tuple[str, str, str]]) -> list[dict]:
    """One entry per (row, reference, kind) of ``pairs`` (kind: "reference" or "matched
    reference"); ``groups``: row name -> seed -> that run's eval.json. Rows compared with
    themselves, and pairs naming a row that has no runs, are left out."""
    read = EvalReader()
    entries = []
    for row, ref, kind in pairs:
        if row == ref or row not in groups or ref not in groups:
            continue
        entry = compare_rows(row, {s: read(p) for s, p in groups[row].items()},
                             ref, {s: read(p) for s, p in groups[ref].items()})
        problems = [read.problems[p] for g in (row, ref) for p in groups[g].values() if p in read.problems]
        entries.append({"kind": kind, **entry, **({"problems": problems} if problems else {})})
    return entries


def _cell(result: Optional[dict], digits: int) -> str:
    if result is None:
        return "-"
    d, lo, hi = result["difference"], result["low"], result["high"]
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {result['verdict']}"


def markdown(entries: list[dict], what: str = "model", incoherent: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The paired table's lines (empty without entries): per row and reference, each
    metric's difference with its 95 % interval and the verdict; refusals and skips below.
    Rows (or references) named in ``incoherent`` (mostly incoherent answers) are marked: a
    broken model's lower harmful score is no safety, however distinguishable."""
    if not entries:
        return []
    names = list(dict.fromkeys(m for e in entries for m in e["metrics"]))
    lines = ["", f"Paired differences, {what} minus reference, on the same prompts and seeds: mean over the seeds both "
             f"rows ran, [{LEVEL:.0f} % bootstrap interval over prompts, {REPLICATES} replicates]; "
             f"\"{DISTINGUISHABLE}\" only when the interval excludes 0. Below 0: lower than the reference (better for "
             "harmful score, over-refusal and loss; worse for accuracy).", "",
             f"| {what} | reference | seeds | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 3)]
    notes = []
    for e in entries:
        mark = lambda name: name + (" (mostly incoherent: see the warning)" if name in incoherent else "")  # noqa: E731
        ref = mark(e["reference"]) + {"matched reference": " (matched)", "same-start reference": " (same start)",
                                      "first start": " (first start)"}.get(e["kind"], "")
        cells = [_cell(e["metrics"].get(n), 4 if n.endswith("loss") else 2) for n in names]
        lines.append(f"| {mark(e['row'])} | {ref} | {', '.join(map(str, e['seeds'])) or '-'} | " + " | ".join(cells) + " |")
        if e.get("error"):
            notes.append(f"{e['row']} vs {e['reference']}: {e['error']}")
        notes += [f"{e['row']} vs {e['reference']}: {why}" for why in e["refused"].values()]
        notes += [f"{e['row']} vs {e['reference']}: {m} skipped: {why}" for m, why in e["skipped"].items()]
        notes += e.get("problems", [])
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return lines
