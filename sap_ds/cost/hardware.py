"""The machine: its peak FLOP/s, the denominator of MFU, for the trainer and the benchmark;
and what it is (CPU, GPUs, threads, package versions), for the benchmark's record.

GPUs: a table of dense peaks by device name and dtype (vendor data sheets). CPUs have no
such number a user could look up, so it is measured: the best time of a square GEMM in
the run's dtype, on every rank at once (the ranks share the cores), summed over ranks.
That makes CPU MFU "model FLOPs over what this machine's GEMM reached just now": it moves
with the machine's load, and is labelled as measured wherever it is written.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Optional

# Dense peak TFLOP/s by dtype, matched in order on torch.cuda.get_device_name().
# fp32 is the non-tensor-core peak (PyTorch's default: TF32 matmuls are off).
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
]
CPU_GEMM_SIZE = 512  # the trainer's measurement: ~0.1 s; the benchmark measures larger


def gpu_peak_flops(name: str, dtype: str) -> Optional[float]:
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in name:
            return peaks[dtype] * 1e12
    return None


def measure_cpu_peak(dtype: str, size: int, repeats: int = 5) -> float:
    """This rank's best GEMM FLOP/s (size^3, model dtype, current thread count). All ranks
    measure at the same time, so the sum over ranks is the peak of the whole job."""
    import torch

    from sap_ds.model.loading import DTYPES

    if dtype != "fp32":
        size = min(size, 256)  # bf16 GEMMs are very slow on CPUs without AMX
    a = torch.randn(size, size).to(DTYPES[dtype])
    b = torch.randn(size, size).to(DTYPES[dtype])
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def job_peak_flops(dtype: str, world: int, gemm_size: int = CPU_GEMM_SIZE, repeats: int = 5) -> dict:
    """Collective (every rank calls it). Peak FLOP/s of the job: {"total", "per_rank",
    "source"}; total is None for a GPU missing from the table (source says which)."""
    import torch

    from sap_ds.parallel.collectives import all_reduce_sum
    from sap_ds.parallel.distributed import barrier

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        per_rank = gpu_peak_flops(name, dtype)
        source = f"table: {name}, {dtype} dense" if per_rank else \
            f"unknown GPU '{name}': add its peak to sap_ds/cost/hardware.py GPU_PEAK_TFLOPS"
        return {"source": source, "per_rank": per_rank, "total": per_rank * world if per_rank else None}
    barrier()
    mine = measure_cpu_peak(dtype, gemm_size, repeats)
    total = float(all_reduce_sum(torch.tensor([mine], dtype=torch.float64)).item())
    return {"source": f"measured: best {dtype} GEMM {gemm_size}^3 per rank, all ranks at once, "
                      f"{torch.get_num_threads()} thread(s) per rank",
            "per_rank": total / world, "total": total}


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(world: int) -> dict:
    """What a measurement ran on: CPU, cores, OS, Python, ranks and threads, the GPU and its
    count (no hostname)."""
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


def software_versions() -> dict:
    """The versions of the packages a training step runs in, as imported."""
    import deepspeed
    import torch
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
