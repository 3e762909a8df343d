"""What ``sap-ds bench`` measures, and how: the variants, and for each a fresh Trainer run for
its warm-up and timed steps, then torn down; the raw times, phases, batches and peak memory
of every rank, summarized into one record per variant (``bench_report`` writes them).

The bench config is a run config with an optional ``bench:`` section (``BenchSection``):
warm-up and timed steps, rounds, the CPU GEMM size of the peak, and the variants with their
dotted overrides; without variants, every method's own (``MethodSection.bench_variants``).

Each variant runs the method's checks before step 1 (``Trainer.preflight``), as a training
run would: SAP's check that the working dtype can hold its perturbation refuses a variant
under ``sap.resolution_check: error``; under ``warn`` the variant is measured and its record
says it is a throughput-only measurement (``throughput_only``: what the check warned), since
the same settings could not train what they claim to.
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import statistics
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from sap_ds.cost import flops as flops_mod

log = logging.getLogger("sap_ds")


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


# --------------------------------------------------------------------------- memory, ranks


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


def _gather(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- all variants


def measure(tree: dict, overrides: list[str], base, bench: BenchSection, rank: int, world: int,
            runs_dir: Path) -> Optional[tuple[dict, list[dict]]]:
    """Collective (every rank calls it). The job's peak FLOP/s, then every variant, round
    after round (rounds interleave the variants against load drift). Rank 0 gets (peak, one
    record per variant, in the bench's order); the others None."""
    from sap_ds.cost.hardware import job_peak_flops
    from sap_ds.parallel.distributed import is_main

    peak = job_peak_flops(base.model.dtype, world, bench.cpu_gemm_size)
    raws = {v.name: [] for v in bench.variants}
    for round_ in range(bench.rounds):
        for variant in bench.variants:
            if is_main():
                log.info("bench: round %d/%d, variant '%s' (%s): %d warm-up + %d timed steps", round_ + 1,
                         bench.rounds, variant.name, " ".join(variant.overrides) or "base config",
                         bench.warmup_steps, bench.timed_steps)
            raw = measure_variant(tree, overrides, variant, bench, rank, world, runs_dir)
            if is_main():
                raws[variant.name].append(raw)
    if not is_main():
        return None
    return peak, [summarize(v, raws[v.name], peak) for v in bench.variants]


# --------------------------------------------------------------------------- one variant


class _Collect(logging.Handler):
    """Keeps the messages of the WARNING and higher records it is handed."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def warnings_logged():
    """The warnings sap-ds logs (logger ``sap_ds``, rank 0's) inside the block."""
    handler = _Collect()
    logger = logging.getLogger("sap_ds")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def run_preflight(trainer, variant: Variant) -> Optional[str]:
    """The method's checks before step 1, as ``Trainer.train`` runs them. A refusal names the
    variant; a warning makes the variant a throughput-only measurement: the returned label
    (None when the checks said nothing)."""
    from sap_ds.errors import ConfigError

    try:
        with warnings_logged() as warned:
            trainer.preflight()
    except ConfigError as exc:
        raise ConfigError(f"bench variant '{variant.name}': {exc}. A bench that measures only throughput may set "
                          "sap.resolution_check=warn: the variant's record is then labelled throughput only") from None
    if not warned:
        return None
    return "throughput only: the check before step 1 warned that these settings cannot train as configured: " + \
        " | ".join(warned)


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
    throughput_only = run_preflight(trainer, variant)  # step 0 then reuses its safety direction, as in training
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
            "gathered": gathered, "released": released, "finite": finite, "init_s": init_s, "mem_kind": mem_kind,
            "load_avg_1m": [load_before[0], os.getloadavg()[0]], "W": W, "N": N, "throughput_only": throughput_only}


@dataclass
class Pooled:
    """A variant's timed steps, pooled over its rounds: what ``summarize`` divides by the wall
    time and the step count."""

    times: list[float] = field(default_factory=list)  # per timed step: its slowest rank's time
    warmup: list[float] = field(default_factory=list)  # the same for the warm-up steps
    round_tokens_per_s: list[float] = field(default_factory=list)
    phase_sums: dict[str, float] = field(default_factory=dict)  # seconds per phase, rank means, summed over steps
    # FLOPs of the steps as they ran (their safety and probe passes), and of SFT's step on the same task batches
    flops: flops_mod.StepFlops = field(default_factory=flops_mod.StepFlops)
    sft_flops: flops_mod.StepFlops = field(default_factory=flops_mod.StepFlops)
    real_tokens: int = 0  # task tokens, padding excluded, all ranks
    padded_tokens: int = 0
    task_step_tokens: int = 0  # of real_tokens, those of the steps that trained on task data
    other_steps: int = 0  # steps that trained on other data (Lisa's alignment steps)
    safety_passes: int = 0
    probe_passes: int = 0
    skipped: int = 0  # steps the numerical guard skipped
    task_lengths: list[int] = field(default_factory=list)
    safety_lengths: list[int] = field(default_factory=list)


def pool_steps(raws: list[dict]) -> Pooled:
    """The timed steps of every round of a variant: a step ends when its slowest rank does,
    its phases are rank means, its FLOPs come from the batches every rank trained on and
    the passes the method ran (``Method.extra_passes``)."""
    from sap_ds.methods import all_phases

    fm, W, N = (raws[0][k] for k in ("fm", "W", "N"))
    pooled = Pooled(phase_sums={p: 0.0 for p in all_phases()})  # every method's phases: the records line up
    for raw in raws:
        gathered = raw["gathered"]
        pooled.warmup += [max(g["times"][s] for g in gathered) for s in range(W)]
        pooled.skipped += sum(not f for f in raw["finite"][W:])
        round_time = round_tokens = 0
        for i, s in enumerate(range(W, W + N)):
            step_time = max(g["times"][s] for g in gathered)
            pooled.times.append(step_time)
            for p in pooled.phase_sums:
                pooled.phase_sums[p] += statistics.fmean(g["phases"][s].get(p, 0.0) for g in gathered)
            task_len = [n for g in gathered for n in g["steps"][i]["task"]]
            extra = raw["extras"][s]  # the same on every rank: the schedule and the lengths are global
            pooled.safety_passes += extra.safety > 0
            pooled.probe_passes += extra.probe > 0
            pooled.real_tokens += sum(task_len)
            if gathered[0]["steps"][i]["trains_on"] == "task":
                pooled.task_step_tokens += sum(task_len)
            else:
                pooled.other_steps += 1
            round_tokens += sum(task_len)
            round_time += step_time
            pooled.padded_tokens += sum(g["steps"][i]["padded"] for g in gathered)
            if sum(task_len) != gathered[0]["steps"][i]["global_tokens"]:
                log.warning("bench: step %d: %d real tokens in the batches, trainer counts %d", s, sum(task_len),
                            gathered[0]["steps"][i]["global_tokens"])
            pooled.flops = pooled.flops + fm.step(task_len, extra.safety_lengths if extra.safety else (),
                                                  safety=extra.safety, probe=extra.probe,
                                                  lowest_probe_layer=extra.lowest_probe_layer,
                                                  probe_passes=extra.probe_passes, lens_lengths=extra.lens_lengths,
                                                  lens_states=extra.lens_states)
            pooled.sft_flops = pooled.sft_flops + fm.step(task_len)
            pooled.task_lengths += task_len
            pooled.safety_lengths += extra.safety_lengths
        pooled.round_tokens_per_s.append(round_tokens / round_time)
    return pooled


def summarize(variant: Variant, raws: list[dict], peak: dict) -> dict:
    """One JSON record from a variant's raw measurements (one per round; their timed
    steps are pooled: ``pool_steps``)."""
    cfg, fm, nominal, W, N = (raws[0][k] for k in ("cfg", "fm", "nominal", "W", "N"))
    pooled = pool_steps(raws)
    times, total, real_tokens, padded_tokens = pooled.times, pooled.flops, pooled.real_tokens, pooled.padded_tokens
    steps = len(times)
    wall = sum(times)
    phase_mean = {p: v / steps for p, v in pooled.phase_sums.items()}
    flops_per_s = total.total / wall
    settings = {"micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum,
                "max_length": cfg.data.max_length, "packing": cfg.data.packing, **raws[0]["method_settings"]}
    record = {
        "variant": variant.name,
        "method": cfg.method,
        "overrides": variant.overrides,
        # None, or why this variant's numbers are a throughput-only measurement (run_preflight)
        "throughput_only": next((raw["throughput_only"] for raw in raws if raw["throughput_only"]), None),
        "settings": settings,
        "warmup_steps": W,
        "timed_steps": N,
        "rounds": len(raws),
        "tokens_per_s": real_tokens / wall,
        # the tokens of task-data steps only: below tokens_per_s when a method trains some
        # steps on other data (Lisa's alignment steps, counted in steps_on_other_data)
        "task_tokens_per_s": pooled.task_step_tokens / wall,
        "steps_on_other_data": pooled.other_steps,
        "tokens_per_s_per_round": pooled.round_tokens_per_s,
        "padded_tokens_per_s": padded_tokens / wall,
        "task_tokens_per_step": real_tokens / steps,
        "padded_task_tokens_per_step": padded_tokens / steps,
        "padding_fraction": 1 - real_tokens / padded_tokens if padded_tokens else None,
        "task_examples_per_step": len(pooled.task_lengths) / steps,
        "step_time_s": {"median": statistics.median(times), "mean": statistics.fmean(times), "per_step": times,
                        "warmup": pooled.warmup},
        "phase_time_s": phase_mean,
        "safety_passes": pooled.safety_passes,
        "probe_passes": pooled.probe_passes,
        "safety_tokens_per_pass": (total.safety_tokens / pooled.safety_passes) if pooled.safety_passes else None,
        "model_flops_per_step": total.total / steps,
        "model_flops_breakdown": {k: v / steps for k, v in total.parts.items()},
        "model_flops_per_task_token": total.per_task_token(),
        "achieved_flops_per_s": flops_per_s,
        "mfu": flops_per_s / peak["total"] if peak.get("total") else None,
        "peak_mem_bytes": max(g["mem"] for raw in raws for g in raw["gathered"]),
        "peak_mem_bytes_per_rank": [max(raw["gathered"][r]["mem"] for raw in raws) for r in range(len(raws[0]["gathered"]))],
        "peak_mem_kind": raws[0]["mem_kind"],
        "skipped_steps": pooled.skipped,
        "engine_released": all(raw["released"] for raw in raws),
        "init_time_s": [raw["init_s"] for raw in raws],
        "load_avg_1m": [raw["load_avg_1m"] for raw in raws],
    }
    if nominal is not None:  # a method whose steps run passes beside SFT's (SAP: Method.nominal_passes)
        record["ideal_ratio"] = pooled.sft_flops.total / total.total
        # Contention-robust proxy: the main phase *is* an SFT step (same batches, forward,
        # backward, optimizer step), timed inside the same steps as the method's other phases.
        record["ratio_vs_main_phase"] = phase_mean["main"] / statistics.fmean(times)
        # Long-run value for these knobs: the timed task batches and the safety batches
        # the trainer draws for them, weighted by the nominal shares.
        record["ideal_ratio_nominal"] = flops_mod.ideal_ratio(
            fm, pooled.task_lengths, pooled.safety_lengths, safety=nominal.safety, probe=nominal.probe,
            lowest_probe_layer=nominal.lowest_probe_layer, probe_passes=nominal.probe_passes)
        record["nominal_shares"] = {"safety": nominal.safety, "probe": nominal.probe}
    return record
