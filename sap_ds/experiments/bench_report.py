"""``sap-ds bench``'s record, from the measured variants (``bench_runs``): the JSON (schema
``sap-ds-bench/1``: the machine, date, commit, versions, peak FLOP/s, the bench and run
config, one record per variant with its ratio to SFT), its chart and the console table."""
from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "sap-ds-bench/1"


def add_ratios(records: list[dict]) -> None:
    """ratio_vs_sft: task tokens/s over the first SFT variant's (a Lisa alignment step
    trains, but not on the user's task); efficiency: measured / ideal."""
    base = next((r for r in records if r["method"] == "sft"), None)
    for r in records:
        r["ratio_vs_sft"] = r["task_tokens_per_s"] / base["task_tokens_per_s"] if base else None
        if r.get("ideal_ratio") is not None and r["ratio_vs_sft"] is not None:
            r["efficiency_vs_ideal"] = r["ratio_vs_sft"] / r["ideal_ratio"]


def bench_result(records: list[dict], *, date: str, world: int, command: str, peak: dict, bench, base) -> dict:
    """The JSON record of a bench run: where, when and from which commit (``sap_ds.version``,
    the one reader ``sap-ds --version`` uses too) it ran, and the variants' records (their
    ratios added here)."""
    from sap_ds.config.run import config_to_dict
    from sap_ds.cost import flops as flops_mod
    from sap_ds.cost.hardware import machine_info, software_versions
    from sap_ds.version import commit

    add_ratios(records)
    code = commit()
    return {
        "schema": SCHEMA,
        "date_utc": date,
        "git_commit": code.hash,
        "git_dirty": code.dirty,
        "versions": software_versions(),
        "machine": machine_info(world),
        "world_size": world,
        "command": command,
        "peak_flops_per_s": peak,
        "flops_model": flops_mod.FORMULA,
        "bench": bench.model_dump(mode="json"),
        "config": config_to_dict(base),
        "variants": records,
    }


def write_result(result: dict, out: Path, chart: bool = True) -> None:
    """``out`` (JSON, atomically) and, with ``chart``, the same path with ``.png``."""
    from sap_ds.files import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    if chart:
        plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["variants"]
    names = [r["variant"] for r in records]
    x = range(len(records))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(records)), 4.5))
    bars = ax1.bar(x, [r["task_tokens_per_s"] for r in records], color=["#4c72b0" if r["method"] == "sft" else "#dd8452" for r in records])
    for bar, r in zip(bars, records):
        label = ""
        if r.get("ratio_vs_sft") is not None:
            label = f"x{r['ratio_vs_sft']:.2f}"
            if r.get("ideal_ratio"):
                label += f"\n(ideal {r['ideal_ratio']:.2f})"
        if r.get("throughput_only"):
            label += "\nthroughput only"
        ax1.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(x), names, rotation=30, ha="right")
    ax1.set_ylabel("task tokens/s (real, all ranks)")
    ax1.set_title("throughput (ratio vs SFT)")
    ax1.margins(y=0.2)
    bottom = [0.0] * len(records)
    for phase in records[0]["phase_time_s"]:  # the same columns in every record (all_phases)
        values = [r["phase_time_s"][phase] for r in records]
        ax2.bar(x, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax2.set_xticks(list(x), names, rotation=30, ha="right")
    ax2.set_ylabel("s per step (mean)")
    ax2.set_title("phase time per step")
    ax2.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"sap-ds bench: {m.get('gpu') or m['cpu']} x{result['world_size']}, {result['date_utc'][:10]}", fontsize=10)
    fig.tight_layout()
    from sap_ds.files import atomic_save_figure

    atomic_save_figure(fig, path, dpi=110)


def format_table(result: dict) -> str:
    phases = list(result["variants"][0]["phase_time_s"])  # the same columns in every record (all_phases)
    rows = [("variant", "task tokens/s", "pad %", "vs SFT", "in-run", "ideal", "step s (med)", *phases, "MFU",
             "peak mem GiB")]
    for r in result["variants"]:
        p = r["phase_time_s"]
        rows.append((r["variant"], f"{r['task_tokens_per_s']:.1f}",
                     f"{100 * r['padding_fraction']:.1f}" if r.get("padding_fraction") is not None else "-",
                     f"{r['ratio_vs_sft']:.3f}" if r.get("ratio_vs_sft") is not None else "-",
                     f"{r['ratio_vs_main_phase']:.3f}" if r.get("ratio_vs_main_phase") else "-",
                     f"{r['ideal_ratio']:.3f}" if r.get("ideal_ratio") else "-",
                     f"{r['step_time_s']['median']:.3f}", *(f"{p[k]:.3f}" for k in phases),
                     f"{100 * r['mfu']:.2f}%" if r.get("mfu") is not None else "-", f"{r['peak_mem_bytes'] / 2**30:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    # a variant whose check before step 1 warned: its settings cannot train as configured
    lines += [f"{r['variant']}: {r['throughput_only']}" for r in result["variants"] if r.get("throughput_only")]
    return "\n".join(lines)
