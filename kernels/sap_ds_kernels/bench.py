"""Benchmark the fused kernels against the unfused PyTorch sequences.

    python -m sap_ds_kernels.bench [--sizes 1M,16M,...] [--dtype bf16] [--repeats N]
                            [--out-json F] [--out-csv F]

Per kernel and shard size: median time, bytes moved, GB/s, fraction of the device's
peak memory bandwidth, the unfused PyTorch sequence's time and GB/s, and the speedup.
GB/s always uses the fused kernel's minimal traffic (the "effective bandwidth"), so the
unfused sequence's extra temporaries show up as a lower figure:
- sumsq:   reads a and b:           numel * (4 + 4) bytes (fp32 gradient and master shards)
- perturb: reads master, direction; writes out: numel * (4 + 4 + out bytes)
- restore: reads master; writes out:            numel * (4 + out bytes)
On CUDA the fused column is Triton, timed with CUDA events after a warm-up (the first
call compiles), with the L2 cache flushed before each repeat. On CPU Triton does not
run natively, so both columns time PyTorch: the twin and the unfused sequence.
Sizes are element counts with binary suffixes: 1K = 2**10, 1M = 2**20, 1B = 2**30.
"""
import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import statistics
import tempfile
import time

import torch

from .perturb import perturb_from_master_torch, perturb_from_master_triton
from .restore import restore_from_master_torch, restore_from_master_triton
from .sumsq import sumsq_torch, sumsq_triton

GPU_SIZES = "1M,4M,16M,64M,256M,1B"
CPU_SIZES = "1M,4M,16M"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Peak memory bandwidth in TB/s (the vendors' data sheets), matched in order on
# torch.cuda.get_device_name(): the first entry whose key is in the name wins, so a more
# specific name comes before one it contains ("GH200 480GB" before "H200"). A card not
# listed has no peak: the GPU check then says its bandwidth target cannot be judged.
PEAK_TBPS = [
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100 SXM", 3.35),
    ("H100 80GB HBM3", 3.35),
    ("GH200 480GB", 4.0),  # the 96 GB HBM3 Grace Hopper
    ("GH200 144G HBM3e", 4.9),
    ("H200", 4.8),
    ("A100-SXM4-80GB", 2.039),
    ("A100 40GB", 1.555),
    ("A100-SXM4-40GB", 1.555),
    ("A100-PCIE-40GB", 1.555),
]
CPU_NOTE = "CPU: Triton kernels run only on CUDA; timing the PyTorch twins"
L2_FLUSH_BYTES = 256 * 2**20


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "B": 2**30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def peak_tbps(device_name: str):
    return next((tbps for key, tbps in PEAK_TBPS if key in device_name), None)


def unfused_sumsq(a, b):
    return torch.stack([a.float().pow(2).sum(), b.float().pow(2).sum()])


def unfused_perturb(master, direction, scale, out):
    tmp = direction * scale
    tmp.add_(master)
    out.copy_(tmp)


def unfused_restore(master, out):
    out.copy_(master.to(out.dtype))


def cases(n: int, dtype, device, cuda: bool):
    """(kernel, bytes per element, fused call, unfused call, tensor bytes held) per kernel."""
    master = torch.randn(n, device=device)
    direction = torch.randn(n, device=device)
    scale = torch.tensor(1e-3, device=device)
    out = torch.empty(n, dtype=dtype, device=device)
    size = out.element_size()
    fused = {
        "sumsq": sumsq_triton if cuda else sumsq_torch,
        "perturb": perturb_from_master_triton if cuda else perturb_from_master_torch,
        "restore": restore_from_master_triton if cuda else restore_from_master_torch,
    }
    return [
        ("sumsq", 8, lambda: fused["sumsq"](direction, master), lambda: unfused_sumsq(direction, master)),
        ("perturb", 8 + size, lambda: fused["perturb"](master, direction, scale, out),
         lambda: unfused_perturb(master, direction, scale, out)),
        ("restore", 4 + size, lambda: fused["restore"](master, out), lambda: unfused_restore(master, out)),
    ]


def bytes_needed(n: int, dtype) -> int:
    """Peak bytes held: master, direction, out, plus the unfused perturb's fp32 temporary."""
    return n * (4 + 4 + torch.empty(0, dtype=dtype).element_size() + 4)


def _seconds(fn, cuda: bool, flush) -> float:
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    flush.zero_()  # evict the shard from L2 so small sizes are not timed from cache
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def median_seconds(fused, unfused, repeats: int, cuda: bool, flush) -> tuple[float, float]:
    """Medians of both versions, timed alternately so both see the same machine state
    (allocator, caches, other load: on a shared CPU the order alone moved results by 30%)."""
    for _ in range(2):  # warm-up: compiles the Triton kernel, faults pages in
        fused()
        unfused()
    times = [(_seconds(fused, cuda, flush), _seconds(unfused, cuda, flush)) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def environment() -> dict:
    from sap_ds.version import commit  # the one commit reader (``sap-ds --version``'s): "<hash>[+dirty]" or "unknown"

    cuda = torch.cuda.is_available()
    if cuda:
        name = torch.cuda.get_device_name()
    else:
        name = "cpu"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    peak = peak_tbps(name) if cuda else None
    return {
        "device": name,
        "device_type": "cuda" if cuda else "cpu",
        "peak_bandwidth_TBps": peak,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": str(commit()),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
    }


def run(sizes, dtype_name: str, repeats: int, env: dict) -> list[dict]:
    cuda = env["device_type"] == "cuda"
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[dtype_name]
    peak = env["peak_bandwidth_TBps"]
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if cuda else None
    rows = []
    for n in sizes:
        if cuda:
            free, _ = torch.cuda.mem_get_info()
            if bytes_needed(n, dtype) * 1.1 > free:
                print(f"skipping {n:,} elements: needs ~{bytes_needed(n, dtype) / 1e9:.1f} GB, "
                      f"{free / 1e9:.1f} GB free on the device")
                continue
        for kernel, per_element, fused, unfused in cases(n, dtype, device, cuda):
            moved = n * per_element
            t_fused, t_unfused = median_seconds(fused, unfused, repeats, cuda, flush)
            gbps, base_gbps = moved / t_fused / 1e9, moved / t_unfused / 1e9
            rows.append({
                "kernel": kernel,
                "numel": n,
                "out_dtype": dtype_name if kernel != "sumsq" else "fp32 inputs",
                "fused_backend": "triton" if cuda else "torch twin",
                "bytes_per_element": per_element,
                "bytes_moved": moved,
                "median_ms": t_fused * 1e3,
                "GBps": gbps,
                "peak_fraction": gbps / (peak * 1e3) if peak else None,
                "unfused_median_ms": t_unfused * 1e3,
                "unfused_GBps": base_gbps,
                "unfused_peak_fraction": base_gbps / (peak * 1e3) if peak else None,
                "speedup": t_unfused / t_fused,
            })
        if cuda:
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'kernel':<8} {'numel':>13} {'bytes/el':>8} {'fused ms':>9} {'GB/s':>8} {'peak':>6} "
            f"{'unfused ms':>10} {'GB/s':>8} {'peak':>6} {'speedup':>7}")
    lines = [head, "-" * len(head)]
    pct = lambda f: f"{100 * f:5.1f}%" if f is not None else "    - "  # noqa: E731
    for r in rows:
        lines.append(
            f"{r['kernel']:<8} {r['numel']:>13,} {r['bytes_per_element']:>8} {r['median_ms']:>9.3f} "
            f"{r['GBps']:>8.1f} {pct(r['peak_fraction'])} {r['unfused_median_ms']:>10.3f} "
            f"{r['unfused_GBps']:>8.1f} {pct(r['unfused_peak_fraction'])} {r['speedup']:>6.2f}x"
        )
    return "\n".join(lines)


def write_atomic(path: str, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(f, env: dict, rows: list[dict]) -> None:
    fields = list(env) + list(rows[0]) if rows else list(env)
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({**env, **row})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help=f"comma-separated element counts (default GPU {GPU_SIZES}, CPU {CPU_SIZES})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the parameter shard `out`")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default GPU 20, CPU 5)")
    parser.add_argument("--out-json")
    parser.add_argument("--out-csv")
    args = parser.parse_args(argv)

    env = environment()
    cuda = env["device_type"] == "cuda"
    sizes = [parse_size(s) for s in (args.sizes or (GPU_SIZES if cuda else CPU_SIZES)).split(",")]
    repeats = args.repeats or (20 if cuda else 5)
    peak = env["peak_bandwidth_TBps"]
    print(f"device: {env['device']}  peak bandwidth: {f'{peak} TB/s' if peak else 'unknown'}")
    print(f"date {env['date_utc']}  commit {env['git_commit']}  torch {env['torch_version']}  "
          f"triton {env['triton_version']}")
    if not cuda:
        print(CPU_NOTE)
    rows = run(sizes, args.dtype, repeats, env)
    print(table(rows))

    record = {**env, "note": None if cuda else CPU_NOTE, "out_dtype": args.dtype, "repeats": repeats,
              "bytes_formula": {"sumsq": "numel * (4 + 4)", "perturb": "numel * (4 + 4 + out bytes)",
                                "restore": "numel * (4 + out bytes)"},
              "rows": rows}
    if args.out_json:
        write_atomic(args.out_json, lambda f: json.dump(record, f, indent=2))
    if args.out_csv:
        write_atomic(args.out_csv, lambda f: write_csv(f, env, rows))


if __name__ == "__main__":
    main()
