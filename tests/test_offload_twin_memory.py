"""The PyTorch twins that run under CPU offload (kernels/sap_ds_kernels/perturb.py, restore.py)
work in chunks: their temporaries are bounded by one chunk, not by the shard (a DeepSpeed
sub-group of up to 1e9 elements held ~16 B/element of temporaries, ~16 GB per rank), the
values written stay bit-identical to the one-pass computation, and the planner's CPU figure
(sap_ds/cost/plan.py) counts the chunk that remains.

The structural check records every tensor the twin allocates (a TorchDispatchMode sees each
aten op's outputs): none is larger than a chunk. A subprocess measures the peak RSS growth of
one call over a large shard against the planner's bytes per element.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sap_ds.cost import plan as P
from sap_ds_kernels import perturb as perturb_module
from sap_ds_kernels import restore as restore_module
from sap_ds_kernels.perturb import N_STATS, perturb_from_master_torch, perturbation_stats_torch
from sap_ds_kernels.restore import restore_from_master_torch


class _AllocationRecorder(TorchDispatchMode):
    """Bytes of every storage an op returns that none of its inputs owned (fresh allocations;
    views and in-place results share an input's storage; meta tensors hold no memory)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owned = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        result = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in owned:
                self.sizes.append(t.untyped_storage().nbytes())
        return result


def _shard(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(n, generator=g)
    direction = torch.randn(n, generator=g)
    return master, direction, torch.tensor(3e-3)


@pytest.mark.parametrize("twin", ["perturb", "perturb+stats", "stats"])
def test_offload_twins_allocate_at_most_one_chunk(monkeypatch, twin):
    chunk, n = 1000, 25_013
    monkeypatch.setattr(perturb_module, "OFFLOAD_CHUNK", chunk)
    master, direction, scale = _shard(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    stats = torch.zeros(N_STATS, dtype=torch.float64)
    calls = {
        "perturb": lambda: perturb_from_master_torch(master, direction, scale, out),
        "perturb+stats": lambda: perturb_from_master_torch(master, direction, scale, out, stats=stats),
        "stats": lambda: perturbation_stats_torch(master, direction, scale, torch.bfloat16),
    }
    with _AllocationRecorder() as recorder:
        calls[twin]()
    assert recorder.sizes, "no allocation recorded"
    assert max(recorder.sizes) <= 4 * chunk, f"a temporary of {max(recorder.sizes)} B, chunk is {chunk} elements"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_twins_write_what_one_pass_writes_bit_for_bit(monkeypatch, dtype):
    """Chunks that do not divide the shard; values written equal ``cast(master + scale *
    direction)`` and ``cast(master)`` computed in one pass; the statistics equal a float64
    reference of the same definition within fp32 summation error."""
    n = 10_007
    monkeypatch.setattr(perturb_module, "OFFLOAD_CHUNK", 999)
    monkeypatch.setattr(restore_module, "OFFLOAD_CHUNK", 999)
    master, direction, scale = _shard(n, seed=1)
    master[:5] = torch.tensor([0.0, -0.0, 1e-30, 65504.0, 3.0e38])  # zeros, subnormal in fp16/bf16, overflow
    tmp = direction * scale
    want = (tmp + master).to(dtype)

    out = torch.empty(n, dtype=dtype)
    perturb_from_master_torch(master, direction, scale, out)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))

    out_stats = torch.empty(n, dtype=dtype)
    stats = torch.zeros(N_STATS, dtype=torch.float64)
    perturb_from_master_torch(master, direction, scale, out_stats, stats=stats)
    assert torch.equal(out_stats.view(torch.uint8), want.view(torch.uint8))

    r = want.double() - master.to(dtype).double()
    d = tmp.double()
    finite = torch.isfinite(r)
    r64, d64 = r.where(finite, 0), d
    reference = torch.stack([r64.square().sum(), d64.square().sum(), (r64 * d64).sum(), (r != 0).sum().double()])
    if finite.all():
        torch.testing.assert_close(stats, reference, rtol=n * 2.0**-24, atol=0)
        torch.testing.assert_close(perturbation_stats_torch(master, direction, scale, dtype), stats, rtol=0, atol=0)
    else:  # an element overflowed to inf: r*r is inf, the twin reports it rather than dropping it
        assert not torch.isfinite(stats[0])

    restored = torch.empty(n, dtype=dtype)
    restore_from_master_torch(master, restored)
    assert torch.equal(restored.view(torch.uint8), master.to(dtype).view(torch.uint8))


def test_planner_and_twins_use_the_same_chunk():
    assert P.OFFLOAD_TWIN_CHUNK == perturb_module.OFFLOAD_CHUNK == restore_module.OFFLOAD_CHUNK


def test_planner_counts_the_twin_transient_under_offload():
    """Under offload SAP's CPU figure per node is SFT's + the direction + one chunk of the
    twin's temporaries per rank; without offload the twin runs on no CPU buffer."""
    kw = dict(model="llama2-7b", nodes=1, gpus_per_node=8, micro_batch=1, seq_len=2048)
    r = P.plan(P.PlanInputs(offload="optimizer", **kw))
    direction = 4 * r.trainable_params / 8
    transient = P.OFFLOAD_TWIN_BYTES_PER_ELEMENT * P.OFFLOAD_TWIN_CHUNK
    assert r.cpu_memory_per_node_sap - r.cpu_memory_per_node_sft == pytest.approx(8 * (direction + transient), abs=1)
    assert r.gpu_memory_sap["SAP offload twin temporaries (on CPU, one chunk per rank)"] == 0
    # a shard smaller than a chunk holds only its own elements' worth
    tiny = P.plan(P.PlanInputs(offload="optimizer", lora=True, lora_r=1, lora_targets=("q_proj",), **kw))
    shard = tiny.trainable_params / 8
    assert shard < P.OFFLOAD_TWIN_CHUNK
    assert tiny.cpu_memory_per_node_sap - tiny.cpu_memory_per_node_sft == pytest.approx(
        8 * (4 * shard + P.OFFLOAD_TWIN_BYTES_PER_ELEMENT * shard), abs=1)
    r_none = P.plan(P.PlanInputs(**kw))
    assert r_none.cpu_memory_per_node_sap == r_none.cpu_memory_per_node_sft == 0


_RSS_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from sap_ds_kernels import perturb
    from sap_ds_kernels.perturb import N_STATS, perturb_from_master_torch
    torch.set_num_threads(1)
    n = int(sys.argv[1])
    master, direction = torch.randn(n), torch.randn(n)
    out = torch.empty(n, dtype=torch.bfloat16).fill_(0)
    scale, stats = torch.tensor(3e-3), torch.zeros(N_STATS, dtype=torch.float64)
    small = torch.randn(4096)
    perturb_from_master_torch(small, small, scale, torch.empty(4096, dtype=torch.bfloat16),
                              stats=torch.zeros(N_STATS, dtype=torch.float64))  # load what a first call loads
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    perturb_from_master_torch(master, direction, scale, out, stats=stats)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, perturb.OFFLOAD_CHUNK)
""")


def test_peak_rss_of_the_offload_twin_is_one_chunk_not_the_shard():
    """32M elements (a 128 MB fp32 shard; the one-pass twin grew RSS by 16 B/element, 512 MiB):
    the chunked twin's peak growth stays within the planner's bytes per element times one
    chunk, plus 16 MiB for the allocator's rounding."""
    n = 2**25
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(n)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    growth, chunk = map(int, proc.stdout.split())
    bound = P.OFFLOAD_TWIN_BYTES_PER_ELEMENT * chunk + 16 * 2**20
    assert growth <= bound, f"peak RSS grew {growth / 2**20:.0f} MiB over {n} elements; bound {bound / 2**20:.0f} MiB"
