"""``sap-ds bench``: throughput of vanilla SFT, SAP variants and the other methods, back to back, in one launch.

    sap-ds bench --config configs/bench_cpu.yaml --out runs/bench_cpu/bench.json
    deepspeed --num_gpus 8 sap_ds/bench.py --config C --out F.json [--warmup N] [--steps N]
    python -m sap_ds.bench --config C --out F.json [--variants sft,paper] [key=value ...]

The config is a run config (the same file train.py takes) with an optional ``bench:``
section (warm-up and timed steps, the variants and their dotted overrides; without it:
every method's own, ``MethodSection.bench_variants``: sft, paper, fast, lisa and
safety_mix). ``key=value`` arguments override the base config for every variant. Each variant builds a fresh Trainer on the same model, data and DeepSpeed
config, runs W warm-up and N timed optimizer steps, and is torn down (a second
``deepspeed.initialize`` in the same process works: checked by the tests, and the SFT
losses of a re-built engine reproduce bit for bit).

Written: ``--out`` (JSON, atomically) and the same path with ``.png`` (tokens/s per
variant with the ratio to SFT and the ideal ratio, and the per-phase time split);
per-variant trainer metrics under ``<out stem>_runs/<variant>/``. FLOPs: ``sap_ds.cost.flops``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Optional

if not __package__: sys.path.insert(0, str(Path(__file__).absolute().parents[1]))  # noqa: E701 - run by path

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from sap_ds.cost.hardware import job_peak_flops  # noqa: E402,F401
from sap_ds.entry import run_command  # noqa: E402

log = logging.getLogger("sap_ds")
REPO = Path(__file__).resolve().parents[1]
SCHEMA = "sap-ds-bench/1"



class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    overrides: list[str] = Field(default_factory=list, description="dotted key=value overrides of the base config")


def _default_variants() -> list[Variant]:
    """Every method's variants (``MethodSection.bench_variants``), in the registry's order. A
    method whose step is SFT's on other batches (safety_mix) is measured, not assumed, like
    every other."""
    from sap_ds.config.methods import METHOD_SECTIONS

    return [Variant(name=name, overrides=overrides) for section in METHOD_SECTIONS.values()
            for name, overrides in section.bench_variants().items()]


class BenchSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    warmup_steps: int = Field(2, ge=0)
    timed_steps: int = Field(8, gt=0)
    cpu_gemm_size: int = Field(1024, gt=0, description="CPU peak: best fp32 (model dtype) GEMM of this size")
    rounds: int = Field(1, gt=0, description="run the whole variant list this many times, pooling the timed steps")
    variants: list[Variant] = Field(default_factory=_default_variants)


# --------------------------------------------------------------------------- config


def load_bench_config(path: str, overrides: list[str]):
    """(bench section, base RunConfig, base tree): the file minus ``bench:`` is a run config."""
    from pydantic import ValidationError

    from sap_ds.config.reading import read_config_file
    from sap_ds.config.run import RunConfig, build_config
    from sap_ds.errors import ConfigError

    tree = read_config_file(path, schema=RunConfig)
    section = tree.pop("bench", None) or {}
    try:
        bench = BenchSection.model_validate(section)
    except ValidationError as exc:
        problems = "; ".join(f"bench.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: invalid bench section: {problems}") from None
    names = [v.name for v in bench.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: bench.variants has duplicate names: {names}")
    base = build_config(tree, overrides, source=path)
    for v in bench.variants:  # fail before any rank starts, naming the variant
        try:
            build_config(tree, overrides + v.overrides, source=f"{path} (variant '{v.name}')")
        except ConfigError as exc:
            raise ConfigError(str(exc)) from None
    return bench, base, tree


# --------------------------------------------------------------------------- machine


def git_commit() -> tuple[Optional[str], Optional[bool]]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain"],
                                cwd=REPO, capture_output=True, text=True, timeout=30)
        if commit.returncode != 0:
            return None, None
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(world: int) -> dict:
    import torch

    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "world_size": world,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count(),
                    cuda=torch.version.cuda)
    else:
        info.update(device="cpu", gpu=None, gpu_count=0)
    return info


def versions() -> dict:
    import deepspeed
    import torch
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}


def peak_flops(dtype: str, gemm_size: int) -> dict:
    """Peak FLOP/s of the job: GPU table x ranks, or the measured CPU GEMM summed over ranks."""
    return job_peak_flops(dtype, _world(), gemm_size)


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets this process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory() -> tuple[int, str]:
    """(bytes, what): CUDA max allocated, or the process's peak RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    try:
        for line in open("/proc/self/status", encoding="utf-8"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak_rss (VmHWM, reset per variant)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss (ru_maxrss, process lifetime)"


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- one variant


def warmup_for(cfg, warmup_steps: int) -> int:
    """Warm-up steps for a variant: at least ``warmup_steps``, and through the first step
    that runs every pass of its method (``Method.min_warmup_steps``: SAP's first probe step),
    so that first-use costs (buffers, allocator growth) are never timed."""
    from sap_ds.methods import build_method

    return max(warmup_steps, build_method(cfg).min_warmup_steps())


def measure_variant(tree: dict, overrides: list[str], variant: Variant, bench: BenchSection, rank: int, world: int,
                    runs_dir: Path) -> Optional[dict]:
    """Build the variant's Trainer, run W + N steps, tear it down. Rank 0 gets the raw
    record of every rank (step times, phase times, batch lengths, peak memory); others None."""
    import torch

    from sap_ds.config.run import build_config
    from sap_ds.cost import flops as flops_mod
    from sap_ds.data import sequence_lengths
    from sap_ds.parallel.distributed import barrier
    from sap_ds.training.trainer import Trainer

    cfg = build_config(tree, overrides + variant.overrides, source=variant.name)
    W, N = warmup_for(cfg, bench.warmup_steps), bench.timed_steps
    cfg = build_config(tree, overrides + variant.overrides + [
        f"train.max_steps={W + N}", f"output_dir={runs_dir / variant.name}", "train.resume=never", f"run_name={variant.name}"])
    load_before = os.getloadavg()
    gc.collect()
    reset_peak_memory()
    barrier()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, rank, world)
    init_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    step_times, phases, finite, extras = [], [], [], []
    for step in range(W + N):
        barrier()
        start = time.perf_counter()
        trainer.train_step(step)
        sync()
        step_times.append(time.perf_counter() - start)
        phases.append(trainer.timer.pop())
        extras.append(trainer.method.extra_passes(trainer, step))  # the passes it ran (SAP's), for the FLOPs
        finite.append(bool(trainer._last_step_finite))
        if rank == 0:
            log.info("bench: %s: %s step %d/%d: %.3f s", variant.name, "warm-up" if step < W else "timed",
                     step + 1 - (0 if step < W else W), W if step < W else N, step_times[-1])
    mem, mem_kind = peak_memory()

    # What each timed step computed, from the batches the trainer used (all ranks' shares):
    # real tokens per example (a packed row holds several) and the padded size of the batches.
    mine = []
    for step in range(W, W + N):
        task = trainer.method.trained_micro_batches(trainer, step)  # Lisa: an alignment step's batches
        task_len = [n for b in task for n in sequence_lengths(b)]
        padded = sum(int(b["input_ids"].numel()) for b in task)
        mine.append({"task": task_len, "padded": padded, "trains_on": trainer.method.trains_on(step),
                     "global_tokens": sum(trainer.method.trained_lengths(trainer, step))})
    gathered = _gather({"steps": mine, "times": step_times, "phases": phases, "mem": mem})
    fm = flops_mod.from_run_config(cfg, trainer.model_path)
    nominal, settings = trainer.method.nominal_passes(), trainer.method.bench_settings(trainer)

    # Tear down so the next variant's deepspeed.initialize starts clean.
    engine_ref = weakref.ref(trainer.engine)
    trainer.close()
    del trainer
    gc.collect()
    released = engine_ref() is None
    if not released and rank == 0:
        log.warning("bench: the '%s' engine is still referenced after teardown; later variants share memory with it",
                    variant.name)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    barrier()
    if rank != 0:
        return None
    return {"cfg": cfg, "fm": fm, "extras": extras, "nominal": nominal, "method_settings": settings,
            "gathered": gathered, "released": released, "finite": finite, "init_s": init_s, "mem_kind": mem_kind, "load_avg_1m": [load_before[0], os.getloadavg()[0]], "W": W, "N": N}


def summarize(variant: Variant, raws: list[dict], peak: dict) -> dict:
    """One JSON record from a variant's raw measurements (one per round; their timed
    steps are pooled). A step ends when its slowest rank does; phases are rank means."""
    from sap_ds.cost import flops as flops_mod
    from sap_ds.methods import all_phases

    cfg, fm, nominal, W, N = (raws[0][k] for k in ("cfg", "fm", "nominal", "W", "N"))
    times, round_tps, warmup = [], [], []
    phase_sums = {p: 0.0 for p in all_phases()}  # every method's phases: the records line up
    total, sft_equiv = flops_mod.StepFlops(), flops_mod.StepFlops()
    real_tokens = padded_tokens = safety_passes = probe_passes = skipped = 0
    task_step_tokens = other_steps = 0  # Lisa: tokens of the steps that trained on task data; alignment steps
    safety_lengths_all, task_lengths_all = [], []
    for raw in raws:
        gathered = raw["gathered"]
        warmup += [max(g["times"][s] for g in gathered) for s in range(W)]
        skipped += sum(not f for f in raw["finite"][W:])
        round_time = round_tokens = 0
        for i, s in enumerate(range(W, W + N)):
            step_time = max(g["times"][s] for g in gathered)
            times.append(step_time)
            for p in phase_sums:
                phase_sums[p] += statistics.fmean(g["phases"][s].get(p, 0.0) for g in gathered)
            task_len = [n for g in gathered for n in g["steps"][i]["task"]]
            extra = raw["extras"][s]  # the same on every rank: the schedule and the lengths are global
            safety_passes += extra.safety > 0
            probe_passes += extra.probe > 0
            real_tokens += sum(task_len)
            if gathered[0]["steps"][i]["trains_on"] == "task":
                task_step_tokens += sum(task_len)
            else:
                other_steps += 1
            round_tokens += sum(task_len)
            round_time += step_time
            padded_tokens += sum(g["steps"][i]["padded"] for g in gathered)
            if sum(task_len) != gathered[0]["steps"][i]["global_tokens"]:
                log.warning("bench: step %d: %d real tokens in the batches, trainer counts %d", s, sum(task_len),
                            gathered[0]["steps"][i]["global_tokens"])
            total = total + fm.step(task_len, extra.safety_lengths if extra.safety else (), safety=extra.safety,
                                    probe=extra.probe, lowest_probe_layer=extra.lowest_probe_layer,
                                    probe_passes=extra.probe_passes)
            sft_equiv = sft_equiv + fm.step(task_len)
            task_lengths_all += task_len
            safety_lengths_all += extra.safety_lengths
        round_tps.append(round_tokens / round_time)
    steps = len(times)
    wall = sum(times)
    phase_mean = {p: v / steps for p, v in phase_sums.items()}
    flops_per_s = total.total / wall
    settings = {"micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum,
                "max_length": cfg.data.max_length, "packing": cfg.data.packing, **raws[0]["method_settings"]}
    record = {
        "variant": variant.name,
        "method": cfg.method,
        "overrides": variant.overrides,
        "settings": settings,
        "warmup_steps": W,
        "timed_steps": N,
        "rounds": len(raws),
        "tokens_per_s": real_tokens / wall,
        # the tokens of task-data steps only: below tokens_per_s when a method trains some
        # steps on other data (Lisa's alignment steps, counted in steps_on_other_data)
        "task_tokens_per_s": task_step_tokens / wall,
        "steps_on_other_data": other_steps,
        "tokens_per_s_per_round": round_tps,
        "padded_tokens_per_s": padded_tokens / wall,
        "task_tokens_per_step": real_tokens / steps,
        "padded_task_tokens_per_step": padded_tokens / steps,
        "padding_fraction": 1 - real_tokens / padded_tokens if padded_tokens else None,
        "task_examples_per_step": len(task_lengths_all) / steps,
        "step_time_s": {"median": statistics.median(times), "mean": statistics.fmean(times), "per_step": times,
                        "warmup": warmup},
        "phase_time_s": phase_mean,
        "safety_passes": safety_passes,
        "probe_passes": probe_passes,
        "safety_tokens_per_pass": (total.safety_tokens / safety_passes) if safety_passes else None,
        "model_flops_per_step": total.total / steps,
        "model_flops_breakdown": {k: v / steps for k, v in total.parts.items()},
        "model_flops_per_task_token": total.per_task_token(),
        "achieved_flops_per_s": flops_per_s,
        "mfu": flops_per_s / peak["total"] if peak.get("total") else None,
        "peak_mem_bytes": max(g["mem"] for raw in raws for g in raw["gathered"]),
        "peak_mem_bytes_per_rank": [max(raw["gathered"][r]["mem"] for raw in raws) for r in range(len(raws[0]["gathered"]))],
        "peak_mem_kind": raws[0]["mem_kind"],
        "skipped_steps": skipped,
        "engine_released": all(raw["released"] for raw in raws),
        "init_time_s": [raw["init_s"] for raw in raws],
        "load_avg_1m": [raw["load_avg_1m"] for raw in raws],
    }
    if nominal is not None:  # a method whose steps run passes beside SFT's (SAP: Method.nominal_passes)
        record["ideal_ratio"] = sft_equiv.total / total.total
        # Contention-robust proxy: the main phase *is* an SFT step (same batches, forward,
        # backward, optimizer step), timed inside the same steps as the method's other phases.
        record["ratio_vs_main_phase"] = phase_mean["main"] / statistics.fmean(times)
        # Long-run value for these knobs: the timed task batches and the safety batches
        # the trainer draws for them, weighted by the nominal shares.
        record["ideal_ratio_nominal"] = flops_mod.ideal_ratio(
            fm, task_lengths_all, safety_lengths_all, safety=nominal.safety, probe=nominal.probe,
            lowest_probe_layer=nominal.lowest_probe_layer, probe_passes=nominal.probe_passes)
        record["nominal_shares"] = {"safety": nominal.safety, "probe": nominal.probe}
    return record


# --------------------------------------------------------------------------- results


def add_ratios(records: list[dict]) -> None:
    """ratio_vs_sft: task tokens/s over the first SFT variant's (a Lisa alignment step
    trains, but not on the user's task); efficiency: measured / ideal."""
    base = next((r for r in records if r["method"] == "sft"), None)
    for r in records:
        r["ratio_vs_sft"] = r["task_tokens_per_s"] / base["task_tokens_per_s"] if base else None
        if r.get("ideal_ratio") is not None and r["ratio_vs_sft"] is not None:
            r["efficiency_vs_ideal"] = r["ratio_vs_sft"] / r["ideal_ratio"]


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
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows)


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sap-ds bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config with an optional bench: section, e.g. configs/bench_cpu.yaml")
    parser.add_argument("--out", required=True, help="JSON output; the chart goes next to it as .png")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default: bench.warmup_steps)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: bench.timed_steps)")
    parser.add_argument("--rounds", type=int, default=None, help="repeat the variant list (default: bench.rounds)")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variant names, in this order")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base config (all variants)")
    return parser.parse_args(argv)


def select(bench: BenchSection, args) -> BenchSection:
    from sap_ds.errors import ConfigError

    update = {}
    if args.warmup is not None:
        if args.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0 (got {args.warmup})")
        update["warmup_steps"] = args.warmup
    if args.steps is not None:
        if args.steps <= 0:
            raise ConfigError(f"--steps must be > 0 (got {args.steps})")
        update["timed_steps"] = args.steps
    if args.rounds is not None:
        if args.rounds <= 0:
            raise ConfigError(f"--rounds must be > 0 (got {args.rounds})")
        update["rounds"] = args.rounds
    if args.variants:
        by_name = {v.name: v for v in bench.variants}
        wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown or not wanted:
            raise ConfigError(f"--variants: unknown {unknown}; the config defines: {', '.join(by_name)}")
        update["variants"] = [by_name[n] for n in wanted]
    return bench.model_copy(update=update)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: bench_and_report(args, argv), version_floors="bench", console_log=True)


def bench_and_report(args, argv) -> int:
    bench, base, tree = load_bench_config(args.config, args.overrides)
    bench = select(bench, args)
    from sap_ds.train import fail_fast

    fail_fast(base)
    from sap_ds.parallel.distributed import init_distributed, is_main

    rank, _, world = init_distributed(base.distributed)
    out = Path(args.out)
    runs_dir = out.parent / f"{out.stem}_runs"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    peak = peak_flops(base.model.dtype, bench.cpu_gemm_size)
    raws = {v.name: [] for v in bench.variants}
    for round_ in range(bench.rounds):  # rounds interleave the variants against load drift
        for variant in bench.variants:
            if is_main():
                log.info("bench: round %d/%d, variant '%s' (%s): %d warm-up + %d timed steps", round_ + 1,
                         bench.rounds, variant.name, " ".join(variant.overrides) or "base config",
                         bench.warmup_steps, bench.timed_steps)
            raw = measure_variant(tree, list(args.overrides), variant, bench, rank, world, runs_dir)
            if is_main():
                raws[variant.name].append(raw)
    records = [summarize(v, raws[v.name], peak) for v in bench.variants] if is_main() else []
    if not is_main():
        return 0
    from sap_ds.config.run import config_to_dict
    from sap_ds.cost import flops as flops_mod
    from sap_ds.files import atomic_write_text

    add_ratios(records)
    commit, dirty = git_commit()
    result = {
        "schema": SCHEMA,
        "date_utc": date,
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions(),
        "machine": machine_info(world),
        "world_size": world,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(["sap-ds bench", *argv]),
        "peak_flops_per_s": peak,
        "flops_model": flops_mod.FORMULA,
        "bench": bench.model_dump(mode="json"),
        "config": config_to_dict(base),
        "variants": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    if not args.no_plot:
        plot(result, out.with_suffix(".png"))
    print("\n== sap-ds bench ==\n" + format_table(result), flush=True)
    print(f"written: {out}" + ("" if args.no_plot else f", {out.with_suffix('.png')}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
