"""Is a defence's model still different from a reference model after both are attacked again?

    python scripts/reattack_paired.py --reference runs/x/p0.1/sft_lr6e-4/seed1/attack \
        runs/x/p0.1/sap/seed1/attack [more attack folders] [--metrics "harmful score,gsm8k_test loss"] [--pool]

``sap-ds attack`` (alone or as the re-attack stage of compare and sweep) reports each model's
bounded worst case, a single number per model with no interval, and the worst points of two
models are often different grid points. This pairs each attack folder's attacked copies with
the reference folder's at the *same* grid point (attack, learning rate, steps; the seeds both
have) and prints the paired difference of every metric with its 95 % bootstrap interval over
prompts (``sap_ds.experiments.paired``, as compare's paired table), plus the two models as
they were before the attack. Read-only: it reads ``attack.json`` for the grid and each point's
``<attack>/lr<lr>_steps<steps>/seed<seed>/eval/eval.json``, found under the attack folder
itself, so a moved folder still reads. A point the reference lacks, or that did not finish,
is listed below the table instead of a number.

``--pool`` adds, per attack (pure_bad, poison_0.5, ...), one row for the mean over that
attack's grid points of the same difference: the points both models finished enter as the
"seeds" of ``paired_difference`` do, so every bootstrap replicate draws one set of prompts
for all of them and the interval is that of the grid's mean (a summary across models and
poisoning ratios; which single point is worst is what the bounded worst case says).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sap_ds.experiments.attack_config import point_dir
from sap_ds.experiments.paired import markdown, paired_rows


def read_attack(folder: Path) -> dict:
    path = folder / "attack.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"reattack_paired: {path}: not an attack report ({exc}); give the --out folder of sap-ds "
                         "attack (a run's <run_dir>/attack)")


def before_eval(folder: Path, report: dict) -> Path:
    """The attacked model's own evaluation: where attack.json says; else, for a folder run
    or read from elsewhere, the attack's own before/ or, for the re-attack stage of compare
    and sweep, the run's eval/ beside the attack folder (the stage reuses it only when it
    was made with the attack's eval config, and evaluates into before/ otherwise)."""
    candidates = [Path(report["before"]["eval"]), folder / "before" / "eval.json", folder.parent / "eval" / "eval.json"]
    return next((c for c in candidates if c.is_file()), candidates[1])


def pooled_name(label: str, attack: str) -> str:
    return f"{label} {attack}, mean of its grid"


def groups_of(label: str, folder: Path) -> tuple[dict[str, dict[int | str, Path]], list[str], list[str]]:
    """Row name -> seed -> eval.json for the model before the attack and each finished grid
    point, and per attack the pooled row (``pooled_name``: "lr <lr> x<steps> seed <seed>" ->
    eval.json over its points); the point names in grid order; why any point is left out."""
    report = read_attack(folder)
    # the model before the attack has no attack seed: "-" pairs the two models and prints as "-"
    groups = {f"{label} before attack": {"-": before_eval(folder, report)}}
    points, missing = [], []
    for run in report["runs"]:
        point = f"{run['attack']} lr {run['lr']:g} x{run['steps']}"
        if run["status"] != "done":
            missing.append(f"{label} {point} seed {run['seed']}: {run['status']}")
            continue
        eval_json = folder / point_dir(run["attack"], run["lr"], run["steps"]) / f"seed{run['seed']}" / "eval" / "eval.json"
        groups.setdefault(f"{label} {point}", {})[run["seed"]] = eval_json
        groups.setdefault(pooled_name(label, run["attack"]), {})[f"lr {run['lr']:g} x{run['steps']} seed {run['seed']}"] = eval_json
        points.append(point)
    return groups, list(dict.fromkeys(points)), missing


def model_label(folder: Path) -> str:
    """A run's name for its attack folder (``<run>/<seed>/attack`` -> ``<run>``), else the folder's own."""
    return folder.parent.parent.name if folder.name == "attack" else folder.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="attack folders to read against the reference")
    parser.add_argument("--reference", required=True, type=Path, help="the reference model's attack folder")
    parser.add_argument("--metrics", help="comma-separated columns to print (default: every one both have)")
    parser.add_argument("--pool", action="store_true",
                        help="add per attack the mean over its grid points of the difference, with its interval")
    args = parser.parse_args(argv)
    ref_label = model_label(args.reference)
    ref_groups, ref_points, notes = groups_of(ref_label, args.reference)
    groups, pairs, pooled_rows = dict(ref_groups), [], set()
    for folder in args.folders:
        label = model_label(folder)
        if label == ref_label:
            label = str(folder)
        row_groups, points, missing = groups_of(label, folder)
        groups.update(row_groups)
        notes += missing
        pairs.append((f"{label} before attack", f"{ref_label} before attack", "reference"))
        for point in points:
            if point in ref_points:
                pairs.append((f"{label} {point}", f"{ref_label} {point}", "reference"))
            else:
                notes.append(f"{label} {point}: the reference has no finished run at this point")
        if args.pool:
            attacks = dict.fromkeys(point.split(" lr ")[0] for point in points)
            pairs += [(pooled_name(label, a), pooled_name(ref_label, a), "reference") for a in attacks]
            pooled_rows.update(pooled_name(label, a) for a in attacks)
    entries = paired_rows(groups, pairs)
    for entry in entries:
        if entry["row"] in pooled_rows:
            # the pooled row's "seeds" are the grid points both models finished
            entry["seeds"] = [f"{len(entry['seeds'])} point{'s' if len(entry['seeds']) != 1 else ''}"]
    if args.metrics:
        wanted = [m.strip() for m in args.metrics.split(",")]
        unknown = [m for m in wanted if not any(m in e["metrics"] for e in entries)]
        if unknown:
            have = sorted({m for e in entries for m in e["metrics"]})
            raise SystemExit(f"reattack_paired: --metrics {', '.join(unknown)}: not a column here (columns: {', '.join(have)})")
        entries = [{**e, "metrics": {m: e["metrics"][m] for m in wanted if m in e["metrics"]}} for e in entries]
    print("\n".join(markdown(entries, what="attacked copy")).lstrip("\n"))
    if notes:
        print("\n" + "\n".join(f"- {n}" for n in notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
