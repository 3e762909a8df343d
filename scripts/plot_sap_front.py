"""The speed-safety front of SAP's forms: each sweep point's harmful score (``sap-ds sweep
--report``'s sweep.json) against the throughput its bench variant measured (``sap-ds bench``
JSON), with SFT and any other sweep point named by ``--also`` drawn at SFT's throughput.

    python scripts/plot_sap_front.py --sweep runs/sweeps/defences/sweep.json \
        --bench runs/bench_cpu/sap_forms.json --bench runs/bench_cpu/sap_forms_mid.json \
        --points sap_recommended=recommended,rec_fast_p8_d16,rec_kept_p4_d8,rec_p2_d8,rec_d8 \
        --also safety_mix_0.1 --out docs/results_sap_front.png

Throughput is the bench's in-run ratio (``ratio_vs_main_phase``: the variant's own main
phase, an SFT step on the same batches, over its step time), the figure that does not
depend on how loaded the machine was; the variants of several bench runs can therefore be
drawn together. Points and variants must exist: a missing name is an error, not a gap.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _points(spec: str) -> list[tuple[str, str]]:
    """``point=variant,point`` -> [(point, variant), (point, point)]."""
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, variant = item.partition("=")
        pairs.append((point, variant or point))
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", required=True, help="sweep.json of `sap-ds sweep --report`")
    parser.add_argument("--bench", action="append", required=True, help="a `sap-ds bench` JSON (repeatable)")
    parser.add_argument("--points", required=True, help="sweep point[=bench variant], comma-separated")
    parser.add_argument("--also", default="", help="sweep points drawn at SFT's throughput (1.0), e.g. safety_mix_0.1")
    parser.add_argument("--reference", default="sft", help="the sweep point at throughput 1.0 (default: sft)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    sweep = json.loads(Path(args.sweep).read_text())
    harm_name, task_name = sweep["harm_metric"], sweep["task_metric"]
    rows = {r["point"]: r for r in sweep["rows"]}
    variants = {}
    for path in args.bench:
        for v in json.loads(Path(path).read_text())["variants"]:
            variants.setdefault(v["variant"], v)
    wanted = _points(args.points)
    also = [p for p, _ in _points(args.also)]
    missing = [p for p in [*(p for p, _ in wanted), args.reference, *also] if p not in rows]
    missing_variants = [v for _, v in wanted if v not in variants or variants[v].get("ratio_vs_main_phase") is None]
    if missing or missing_variants:
        print(f"error: not in {args.sweep}: {sorted(set(missing))}; no in-run ratio in the bench JSONs: "
              f"{missing_variants} (variants there: {sorted(variants)})", file=sys.stderr)
        return 2

    def stat(point: str, name: str) -> tuple[float, float]:
        column = rows[point]["columns"].get(name) or {}
        return column.get("mean"), column.get("std") or 0.0

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs, ys = [], []
    for point, variant in wanted:
        x = variants[variant]["ratio_vs_main_phase"]
        y, err = stat(point, harm_name)
        loss, _ = stat(point, task_name)
        ref_loss, _ = stat(args.reference, task_name)
        xs.append(x)
        ys.append(y)
        ax.errorbar(x, y, yerr=err, fmt="o", color="tab:blue", capsize=3)
        ax.annotate(f"{point}\n{100 * (loss / ref_loss - 1):+.1f} % loss", (x, y), textcoords="offset points",
                    xytext=(6, 4), fontsize=7)
    for point in [args.reference, *also]:
        y, err = stat(point, harm_name)
        ax.errorbar(1.0, y, yerr=err, fmt="s", color="tab:gray", capsize=3)
        ax.annotate(point, (1.0, y), textcoords="offset points", xytext=(-8, 4), fontsize=7, ha="right")
    ax.set_xlabel("throughput vs SFT (bench, in-run: main phase / step time)")
    ax.set_ylabel(f"{harm_name} (%, lower is safer)")
    ax.set_xlim(0, 1.08)
    ax.set_ylim(0, max([*ys, stat(args.reference, harm_name)[0]]) * 1.15)
    ax.set_title("SAP's forms: speed against safety (one point per form)", fontsize=9)
    fig.tight_layout()
    from sap_ds.files import atomic_save_figure

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, out, dpi=120)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
