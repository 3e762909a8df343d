"""Steps 1-3 of the GPU check: versions and capabilities, the compiled kernels against their
PyTorch twins, and the kernels' bandwidth (``python -m sap_ds_kernels.bench``).

On CPU (``--cpu``) the same functions run with the Triton interpreter (TRITON_INTERPRET=1,
set by scripts/gpu_check.sh before triton is imported) and CPU sizes.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from sap_ds.gpu_check.report import Step

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "triton", "transformers", "peft", "deepspeed", "datasets", "pydantic")
BIG = 2**31 + 17  # one element past the int32 offset range: the kernels' int64 offsets matter
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------- step 1


def versions_step(step: Step, cpu: bool, out: Path) -> None:
    from sap_ds.dependencies import COMMAND_PACKAGES, problems

    step.figure("python", sys.version.split()[0])
    install_log = out / "install.log"  # written by scripts/gpu_check.sh
    if install_log.is_file():
        step.figure("wheel install", install_log.read_text(encoding="utf-8", errors="replace").strip()[-600:])
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    step.figure("versions", found)
    issues = problems(COMMAND_PACKAGES["train"])
    step.check("every package sap-ds train needs is installed and at or above its floor (sap_ds/dependencies.py)",
               not issues, issues or None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        step.figure("device", {"name": props.name, "capability": f"{props.major}.{props.minor}",
                               "memory_GiB": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
                               "cuda": torch.version.cuda})
        step.check("CUDA device with bf16 support (capability >= 8.0)", props.major >= 8, f"{props.major}.{props.minor}")
    else:
        step.figure("device", {"name": "cpu", "threads": torch.get_num_threads()})
        step.check("CUDA device present", cpu, "none (--cpu: the CPU steps only)")
    _triton_capabilities(step, cpu)


def _triton_capabilities(step: Step, cpu: bool) -> None:
    """The Triton features the kernels use (kernels/sap_ds_kernels/_triton.py, perturb.py)."""
    from sap_ds_kernels._triton import import_triton, interpreter_enabled

    try:
        triton, tl = import_triton()
    except Exception as exc:  # noqa: BLE001
        step.check("triton imports", False, f"{type(exc).__name__}: {exc}")
        return
    step.check("triton imports", True, triton.__version__)
    step.figure("triton_knobs", hasattr(triton, "knobs"))
    step.check("tl.uint32 / tl.uint16 / tl.int16 bit casts exist (bf16 round-to-nearest-even by hand)",
               all(hasattr(tl, t) for t in ("uint32", "uint16", "int16", "int64")))
    from triton.runtime.interpreter import InterpretedFunction  # noqa: F401 - checked_kernel needs it

    step.check("interpreter mode matches the run (TRITON_INTERPRET)", interpreter_enabled() == cpu,
               {"interpreter": interpreter_enabled(), "cpu_mode": cpu})
    if not cpu:
        from triton.backends.nvidia.compiler import CUDAOptions

        step.check("CUDA backend takes enable_fp_fusion (the perturb kernel turns FMA contraction off)",
                   "enable_fp_fusion" in getattr(CUDAOptions, "__dataclass_fields__", {}))


# --------------------------------------------------------------------------- step 2


def _bits_mismatch(got: torch.Tensor, want: torch.Tensor) -> int:
    """Elements whose bit patterns differ; NaN matches NaN (the kernels write the canonical
    quiet NaN, torch's own casts do not always)."""
    nan = torch.isnan(want)
    if not torch.equal(torch.isnan(got), nan):
        return int((torch.isnan(got) != nan).sum())
    return int(((got.view(BITS[got.dtype]) != want.view(BITS[want.dtype])) & ~nan).sum())


def _inputs(n: int, dev: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=dev).manual_seed(seed)
    master = torch.randn(n, generator=g, device=dev) * 0.02
    direction = torch.randn(n, generator=g, device=dev)
    return master, direction


def _cast_cases(step: Step, label: str, master, direction, scale, dev, unaligned_out: bool = False) -> None:
    """perturb and restore into bf16 and fp32 outputs, kernel vs twin, bit for bit."""
    from sap_ds_kernels.perturb import perturb_from_master_torch, perturb_from_master_triton
    from sap_ds_kernels.restore import restore_from_master_torch, restore_from_master_triton

    n = master.numel()
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        if unaligned_out:  # one element into a buffer: not 16-byte aligned
            got = torch.empty(n + 1, dtype=dtype, device=dev)[1:]
        else:
            got = torch.empty_like(master, dtype=dtype)
        want = torch.empty_like(master, dtype=dtype)
        perturb_from_master_triton(master, direction, scale, got)
        perturb_from_master_torch(master, direction, scale, want)
        bad = _bits_mismatch(got, want)
        step.check(f"{label}: perturb -> {name} bit-exact", bad == 0, f"{bad} of {master.numel()} differ")
        restore_from_master_triton(master, got)
        restore_from_master_torch(master, want)
        bad = _bits_mismatch(got, want)
        step.check(f"{label}: restore -> {name} bit-exact", bad == 0, f"{bad} of {master.numel()} differ")
        del got, want


def _sumsq_case(step: Step, label: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    from sap_ds_kernels.sumsq import sumsq_triton

    got = sumsq_triton(a, b).double().cpu()
    chunk = 2**26  # the fp64 reference in pieces: a whole fp64 copy of a 2^31 shard is 17 GB
    ref = torch.zeros(2, dtype=torch.float64)
    for start in range(0, a.numel(), chunk):
        ref += torch.stack([a[start:start + chunk].double().pow(2).sum(), b[start:start + chunk].double().pow(2).sum()]).cpu()
    err = ((got - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
    step.check(f"{label}: sumsq vs fp64 (relative error <= {tol:g})", err <= tol, f"{err:.2e}")


def kernels_step(step: Step, cpu: bool) -> None:
    dev = device()
    sizes = [1, 4095, 1_000_003]
    for n in sizes:
        master, direction = _inputs(n, dev, seed=n)
        scale = torch.tensor(1e-3, device=dev)
        _cast_cases(step, f"n={n:,}", master, direction, scale, dev)
        _sumsq_case(step, f"n={n:,} fp32", direction, master, 1e-5)
        _sumsq_case(step, f"n={n:,} bf16", direction.bfloat16(), master.bfloat16(), 1e-5)
    # An unaligned view: one element in, so the data pointer is not 16-byte aligned.
    base_m, base_d = _inputs(100_001, dev, seed=7)
    _cast_cases(step, "unaligned view", base_m[1:], base_d[1:], torch.tensor(1e-3, device=dev), dev, unaligned_out=True)
    _sumsq_case(step, "unaligned view", base_d[1:], base_m[1:], 1e-5)
    _special_values(step, dev)
    _big_case(step, dev, cpu)


def _special_values(step: Step, dev) -> None:
    from sap_ds_kernels.perturb import perturb_from_master_torch, perturb_from_master_triton
    from sap_ds_kernels.restore import restore_from_master_triton
    from sap_ds_kernels.sumsq import sumsq_triton

    master, direction = _inputs(5000, dev, seed=3)
    master[::7] = float("nan")
    master[1::7] = float("inf")
    master[2::7] = -float("inf")
    master[3::7] = 3.4e38  # past bf16's largest finite value (3.3895e38) and its rounding half-way point: inf
    master[4::7] = -3.4e38
    _cast_cases(step, "NaN/inf/overflow", master, direction, torch.tensor(1e-3, device=dev), dev)
    got = sumsq_triton(torch.tensor([1.0, float("inf")], device=dev), torch.tensor([float("nan"), 2.0], device=dev))
    step.check("sumsq: inf -> inf, NaN -> NaN", bool(torch.isinf(got[0]) and torch.isnan(got[1])), got.tolist())
    clean, _ = _inputs(5000, dev, seed=4)
    zero_scale, restored = torch.empty_like(clean, dtype=torch.bfloat16), torch.empty_like(clean, dtype=torch.bfloat16)
    perturb_from_master_triton(clean, direction, torch.zeros((), device=dev), zero_scale)
    restore_from_master_triton(clean, restored)
    bad = _bits_mismatch(zero_scale, restored)
    step.check("scale 0: perturb equals restore, bit for bit", bad == 0, f"{bad} differ")
    twin = torch.empty_like(zero_scale)
    perturb_from_master_torch(clean, direction, torch.zeros((), device=dev), twin)
    step.check("scale 0: twin agrees", _bits_mismatch(zero_scale, twin) == 0)


def _big_case(step: Step, dev, cpu: bool) -> None:
    """More than 2**31 elements, where 32-bit offsets would wrap (GPU, memory permitting)."""
    if cpu:
        step.figure("above_2^31", "not run on CPU (the interpreter would take minutes)")
        return
    need = BIG * (4 + 4 + 2 + 2) + 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        step.figure("above_2^31", f"skipped: needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
        return
    from sap_ds_kernels.perturb import perturb_from_master_torch, perturb_from_master_triton
    from sap_ds_kernels.restore import restore_from_master_triton

    master = torch.empty(BIG, device=dev).normal_(0, 0.02)
    direction = torch.empty(BIG, device=dev).normal_()
    got, want = torch.empty(BIG, dtype=torch.bfloat16, device=dev), torch.empty(BIG, dtype=torch.bfloat16, device=dev)
    scale = torch.tensor(1e-3, device=dev)
    perturb_from_master_triton(master, direction, scale, got)
    perturb_from_master_torch(master, direction, scale, want)
    tail = slice(BIG - 2**20, BIG)  # the last elements sit past 2**31
    step.check(f"n={BIG:,}: perturb -> bf16 bit-exact (all, and the last 2^20)",
               _bits_mismatch(got, want) == 0 and _bits_mismatch(got[tail], want[tail]) == 0)
    restore_from_master_triton(master, got)
    want.copy_(master)
    step.check(f"n={BIG:,}: restore -> bf16 bit-exact", _bits_mismatch(got, want) == 0)
    del got, want
    _sumsq_case(step, f"n={BIG:,} fp32", direction, master, 1e-4)
    step.figure("above_2^31", f"ran: {BIG:,} elements")
    del master, direction
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- step 3

GPU_SIZES = "16M,64M,256M,1B"
# Judged rows: shards of at least LARGE_BYTES (below it, launch latency and the L2 cache blur
# the bandwidth). Each fused kernel must reach PEAK_FRACTION_TARGET of the card's peak memory
# bandwidth (sap_ds_kernels/bench.py PEAK_TBPS) and SPEEDUP_FRACTION_OF_BOUND of its traffic
# bound over the unfused sequence: what physics allows, not a round number (issue 31, item 1).
PEAK_FRACTION_TARGET, SPEEDUP_FRACTION_OF_BOUND, LARGE_BYTES = 0.85, 0.9, 64 * 2**20
# Bytes per element the unfused sequences of kernels/sap_ds_kernels/bench.py move over the fused kernel's
# (bf16 out): the speedup an ideal fused kernel can show over an unfused one at the same
# bandwidth. sumsq: pow (r4 w4) + sum (r4) per tensor = 12 vs 4; perturb: mul (r4 w4), add_
# (r8 w4), copy_ (r4 w2) = 26 vs 10; restore: .to (r4 w2) + copy_ (r2 w2) = 10 vs 6.
# tests/test_gpu_check_targets.py counts them again from the aten ops the sequences run.
TRAFFIC_BOUND = {"sumsq": 3.0, "perturb": 2.6, "restore": 10 / 6}
SPEEDUP_TARGET = {kernel: SPEEDUP_FRACTION_OF_BOUND * bound for kernel, bound in TRAFFIC_BOUND.items()}


def bandwidth_step(step: Step, cpu: bool, out: Path) -> None:
    """Run ``python -m sap_ds_kernels.bench`` as its users do and read its JSON record."""
    record_path = out / "kernels_bench.json"
    sizes = "256K" if cpu else GPU_SIZES
    import sap_ds_kernels

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the bench times compiled kernels (on CPU: the twins)
    # the folder this process took sap_ds_kernels from (in a checkout without an install: kernels/), so the
    # bench times the same kernels steps 1-2 checked
    kernels_parent = str(Path(sap_ds_kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [kernels_parent, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "sap_ds_kernels.bench", "--sizes", sizes, "--out-json", str(record_path)]
    if cpu:
        cmd += ["--repeats", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300 if not cpu else 120)
    step.check("python -m sap_ds_kernels.bench exits 0", proc.returncode == 0,
               proc.stderr[-800:] if proc.returncode else None)
    if proc.returncode:
        return
    record = json.loads(record_path.read_text())
    rows = [{"kernel": r["kernel"], "numel": r["numel"], "MB": round(r["bytes_moved"] / 2**20), "GB/s": round(r["GBps"], 1),
             "peak": r["peak_fraction"], "unfused GB/s": round(r["unfused_GBps"], 1), "speedup": round(r["speedup"], 2),
             "traffic bound": round(TRAFFIC_BOUND[r["kernel"]], 2)}
            for r in record["rows"]]
    step.figure("device", record["device"])
    step.figure("peak_bandwidth_TBps", record["peak_bandwidth_TBps"])
    step.figure("rows", rows)
    step.check("a row per kernel and size", len(rows) == 3 * len(sizes.split(",")), len(rows))
    if cpu:
        step.note("CPU: sap_ds_kernels.bench times the PyTorch twins; the bandwidth targets apply on GPU only")
        return
    judge_bandwidth(step, record)


def judge_bandwidth(step: Step, record: dict) -> None:
    """The targets, on every row of at least LARGE_BYTES of a GPU bench record: achieved
    bandwidth against the card's peak (a card whose peak is not known is a failing check that
    names it), speedup against SPEEDUP_FRACTION_OF_BOUND of the kernel's traffic bound."""
    large = [r for r in record["rows"] if r["bytes_moved"] >= LARGE_BYTES]
    kernels = sorted({r["kernel"] for r in large})
    step.check(f"every kernel has a row of >= {LARGE_BYTES // 2**20} MiB (the sizes the memory allowed)",
               kernels == sorted(TRAFFIC_BOUND), kernels)
    peak = record["peak_bandwidth_TBps"]
    if peak is None:
        step.check(f"peak bandwidth of '{record['device']}' known (add it to kernels/sap_ds_kernels/bench.py PEAK_TBPS): "
                   f"without it the >= {PEAK_FRACTION_TARGET:.0%} of peak target cannot be judged", False)
    for r in large:
        label = f"{r['kernel']} n={r['numel']:,}"
        if peak is not None:
            step.check(f"{label}: >= {PEAK_FRACTION_TARGET:.0%} of peak bandwidth ({peak:g} TB/s)",
                       r["peak_fraction"] >= PEAK_FRACTION_TARGET, f"{r['peak_fraction']:.1%}")
        bound = TRAFFIC_BOUND[r["kernel"]]
        step.check(f"{label}: speedup over the unfused sequence >= {SPEEDUP_FRACTION_OF_BOUND:g} x its traffic bound "
                   f"{bound:.2f}x = {SPEEDUP_TARGET[r['kernel']]:.2f}x", r["speedup"] >= SPEEDUP_TARGET[r["kernel"]],
                   f"{r['speedup']:.2f}x ({r['speedup'] / bound:.0%} of the bound)")
