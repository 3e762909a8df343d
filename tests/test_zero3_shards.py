"""Zero3Shards (sap_ds/parallel/zero3.py) against a stand-in for DeepSpeed's stage-3 optimizer,
in one process and in seconds: the finite-gradient check, Lisa's gradient edit and
statistics, and the layout NVMe offload would give.

The stand-in (``FakeStage3``) holds the buffers stage 3 keeps (``fp16_groups``, the flat
working and master shards, ``grad_partitions_flat_buffer``, ``grad_position``,
``norm_for_param_grads``) and borrows DeepSpeed 0.19's own methods for the local-gradient
accessors (``get_local_fp32_grad_for_param``, ``set_local_grad_for_param`` and what they call),
so the reference for every edit is what DeepSpeed's ``safe_set_local_grad`` writes. The
2-rank runs of Lisa against plain PyTorch are in tests/test_methods.py.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

from sap_ds.config.run import load_config
from sap_ds.errors import ConfigError
from sap_ds.methods.lisa import LisaMethod
from sap_ds.parallel import zero3
from sap_ds.parallel.zero3 import ShardLayoutError, Zero3Shards
from tests.support.repo import REPO

# Two groups; per parameter (elements in the local shard, real elements): the last shard of
# each group is padded, as the last rank's is.
GROUPS = [[(6, 6), (5, 3)], [(7, 7), (4, 4), (6, 2)]]


class _NoStream:
    def synchronize(self):
        pass


class FakeStage3:
    """What Zero3Shards reads of DeepSpeed's ``DeepSpeedZeroOptimizer_Stage3``, with its own
    accessors (``_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition``: the private map
    they read, slices of the flat gradient buffer in ``chain(fp16_groups)`` order)."""

    get_local_fp32_grad_for_param = Stage3.get_local_fp32_grad_for_param
    set_local_grad_for_param = Stage3.set_local_grad_for_param
    _get_fp32_grad_state_partition = Stage3._get_fp32_grad_state_partition
    _swappable_optimizer_subgroup = Stage3._swappable_optimizer_subgroup
    _constant_buffered_norm2 = Stage3._constant_buffered_norm2
    get_param_id = Stage3.get_param_id

    def __init__(self, dtype=torch.float32, offload=False, grad_dtype=None, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.offload_optimizer = offload
        self.swap_optimizer = False
        self.reduce_and_partition_stream = _NoStream()
        self.norm_for_param_grads = {}
        self.fp16_groups, self.fp16_partitioned_groups_flat, self.fp32_partitioned_groups_flat = [], [], []
        self.grad_position = {}
        total = sum(n for group in GROUPS for n, _ in group)
        self.grad_partitions_flat_buffer = torch.randn(total, generator=gen).to(grad_dtype or dtype)
        self._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition = {}
        ds_id, flat_start = 0, 0
        for gi, group in enumerate(GROUPS):
            lp = torch.randn(sum(n for n, _ in group), generator=gen).to(dtype)
            params, offset = [], 0
            for n, real in group:
                p = torch.nn.Parameter(torch.empty(0, dtype=dtype))
                p.ds_id, p.ds_numel, p.ds_persist = ds_id, real, False
                p.ds_tensor = lp.narrow(0, offset, n)
                p.partition_numel = (lambda n=n: n)
                p._z3_optimizer = self
                self.grad_position[ds_id] = [gi, offset, n]
                self._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition[ds_id] = \
                    self.grad_partitions_flat_buffer.narrow(0, flat_start + offset, n)
                params.append(p)
                ds_id, offset = ds_id + 1, offset + n
            flat_start += offset
            master = lp.float().clone() + 0.01 * torch.randn(lp.numel(), generator=gen)
            if offload:  # DeepSpeed copies each reduced partition into the master's .grad at the boundary
                master.grad = torch.randn(lp.numel(), generator=gen)
            self.fp16_groups.append(params)
            self.fp16_partitioned_groups_flat.append(lp)
            self.fp32_partitioned_groups_flat.append(master)

    def zero_grad(self):
        pass


class FakeEngine:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def _shards(**kwargs) -> Zero3Shards:
    return Zero3Shards(FakeEngine(FakeStage3(**kwargs)))


class _Recorder(TorchDispatchMode):
    """Every aten op run under it: the largest tensor any op produced, and the storages of
    every tensor any op read."""

    def __init__(self):
        super().__init__()
        self.largest_output = 0
        self.read = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                self.read.add(a.untyped_storage().data_ptr())
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self.largest_output = max(self.largest_output, o.numel())
        return out


# --------------------------------------------------------------------------- the finite-gradient check (item 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison,finite", [
    (None, True), ("nan", False), ("inf", False), ("-inf", False), ("all_nan", False), ("largest", True)])
def test_local_grads_finite_sees_nan_and_inf_in_each_dtype(dtype, poison, finite):
    """NaN in the middle of a buffer, +inf, -inf, a buffer of NaN only; the largest finite
    value of the dtype is finite (a sum would overflow where a max does not)."""
    shards = _shards(dtype=dtype)
    flat = shards.optimizer.grad_partitions_flat_buffer
    middle = flat.numel() // 2
    if poison == "all_nan":
        flat.fill_(float("nan"))
    elif poison == "largest":
        flat.fill_(torch.finfo(dtype).max)
    elif poison is not None:
        flat[middle] = float(poison)
    assert bool(shards.local_grads_finite()) is finite


def test_local_grads_finite_of_empty_buffers():
    shards = _shards()
    shards.optimizer.grad_partitions_flat_buffer = torch.empty(0)
    assert bool(shards.local_grads_finite())


@pytest.mark.parametrize("offload", [False, True])
def test_local_grads_finite_makes_no_shard_sized_temporary(offload):
    """O(1) extra memory: no op under the check produces more than a couple of elements
    (``isfinite(buffer)`` made one of the buffer's size)."""
    shards = _shards(offload=offload)
    with _Recorder() as seen:
        shards.local_grads_finite()
    assert seen.largest_output <= 2


def test_local_grads_finite_reads_one_buffer_under_offload():
    """With the optimizer offloaded, DeepSpeed holds the reduced gradients twice: accumulated in
    ``grad_partitions_flat_buffer`` and, at the boundary, copied into the masters' ``.grad``
    (stage3.py ``_offload_grad_partition_at_boundary``). The check reads the first only."""
    shards = _shards(offload=True)
    flat = shards.optimizer.grad_partitions_flat_buffer
    with _Recorder() as seen:
        shards.local_grads_finite()
    masters = {m.grad.untyped_storage().data_ptr() for m in shards.optimizer.fp32_partitioned_groups_flat}
    assert flat.untyped_storage().data_ptr() in seen.read, "the flat gradient buffer was not checked"
    assert not seen.read & masters, "the masters' offloaded gradients were read as well"


# --------------------------------------------------------------------------- NVMe offload (item 2)


def test_swapped_masters_are_refused_with_the_setting_that_causes_them():
    """NVMe optimizer offload: DeepSpeed keeps a swappable group's fp32 master as
    ``torch.empty(0)`` (stage3.py ``_create_fp32_partitions``)."""
    optimizer = FakeStage3()
    optimizer.fp32_partitioned_groups_flat[1] = torch.empty(0)
    with pytest.raises(ShardLayoutError, match="offload_optimizer.device.*nvme.*cpu"):
        Zero3Shards(FakeEngine(optimizer))


def test_swapped_working_shards_are_refused_with_the_setting_that_causes_them():
    """NVMe parameter offload: a swapped group's working shard is None."""
    optimizer = FakeStage3()
    optimizer.fp16_partitioned_groups_flat[0] = None
    with pytest.raises(ShardLayoutError, match="offload_param.device.*nvme.*cpu"):
        Zero3Shards(FakeEngine(optimizer))


@pytest.mark.parametrize("method", ["sft", "sap", "lisa", "safety_mix"])
@pytest.mark.parametrize("key", ["offload_optimizer", "offload_param"])
def test_nvme_offload_is_refused_for_every_method_on_gpu_too(tmp_path, method, key):
    import json

    from sap_ds.parallel.ds_config import load_ds_config

    path = tmp_path / "ds_nvme.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, key: {"device": "nvme", "nvme_path": "/nvme"}}}))
    cfg = load_config(REPO / "configs/tiny.yaml", [f"deepspeed_config={path}", f"method={method}"])
    with pytest.raises(ConfigError) as info:
        load_ds_config(cfg, world_size=8)
    message = str(info.value)
    assert str(path) in message and f"'zero_optimization.{key}.device' is nvme" in message and '"cpu"' in message


# --------------------------------------------------------------------------- Lisa's gradient edit (item 10)


def _lisa(shards: Zero3Shards, rho: float = 3.0):
    cfg = load_config(REPO / "configs/tiny.yaml", ["method=lisa", f"lisa.rho={rho}"])
    trainer = type("FakeTrainer", (), {"shards": shards, "step": 1, "total_steps": 10})()
    method = LisaMethod(cfg)
    method.setup(trainer)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for g in shards.groups:  # the masters move away from the anchor (padding stays zero)
            g.master.add_(0.1 * torch.randn(g.master.numel(), generator=gen))
        shards.zero_padding()
    return method, trainer


def _deepspeed_reference(shards: Zero3Shards, anchor, rho: float) -> None:
    """The proximal gradient through DeepSpeed's accessors, parameter by parameter."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    for gi, p, offset, _ in shards.param_slices():
        n = p.partition_numel()
        delta = (shards.groups[gi].master.narrow(0, offset, n) - anchor[gi].narrow(0, offset, n)).mul_(rho)
        safe_set_local_grad(p, safe_get_local_grad(p).reshape(-1) + delta)


def _local_grads(optimizer) -> list[torch.Tensor]:
    if optimizer.offload_optimizer:
        return [m.grad.clone() for m in optimizer.fp32_partitioned_groups_flat]
    return [optimizer.grad_partitions_flat_buffer.clone()]


@pytest.mark.parametrize("offload", [False, True], ids=["flat-buffer", "offload"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lisa_proximal_gradient_is_deepspeeds(offload, dtype):
    """grad += rho (master - anchor) in every gradient element, and under offload the
    per-parameter norms gradient clipping reads, as DeepSpeed's ``safe_set_local_grad``
    leaves them (bf16: an fp32 sum rounded once into the bf16 accumulation buffer)."""
    rho = 3.0
    got_shards, ref_shards = _shards(dtype=dtype, offload=offload), _shards(dtype=dtype, offload=offload)
    method, trainer = _lisa(got_shards, rho)
    _lisa(ref_shards, rho)
    for _ in range(2):  # the second call uses the gradient views proven on the first
        method._add_proximal(trainer)
        _deepspeed_reference(ref_shards, method.anchor, rho)
    for got, want in zip(_local_grads(got_shards.optimizer), _local_grads(ref_shards.optimizer)):
        assert torch.equal(got, want)
    if offload:
        got_norms, want_norms = got_shards.optimizer.norm_for_param_grads, ref_shards.optimizer.norm_for_param_grads
        assert set(got_norms) == set(want_norms) and len(want_norms) == sum(len(g) for g in GROUPS)
        for pid, norm in want_norms.items():
            assert float(got_norms[pid]) == pytest.approx(float(norm), rel=1e-12)


@pytest.mark.parametrize("offload", [False, True], ids=["flat-buffer", "offload"])
def test_lisa_step_reads_no_gradient_parameter_by_parameter(monkeypatch, offload):
    """After the first step (which proves the gradient views once), Lisa's edit of the
    gradients goes through the per-group views: no per-parameter DeepSpeed accessor (each one
    a reduce-stream synchronisation and a copy on a GPU)."""
    shards = _shards(offload=offload)
    method, trainer = _lisa(shards)
    method._add_proximal(trainer)
    calls = []
    for name in ("get_local_fp32_grad_for_param", "set_local_grad_for_param"):
        real = getattr(FakeStage3, name)
        monkeypatch.setattr(FakeStage3, name, lambda self, *a, real=real, name=name: calls.append(name) or real(self, *a))
    method._add_proximal(trainer)
    assert calls == []


def test_lisa_step_and_statistics_make_no_temporary_beyond_a_chunk(monkeypatch):
    """The proximal gradient and the logged squared drift work a chunk at a time: no op makes
    a tensor larger than one chunk (before: a full-shard fp32 difference, and a float64 one
    for the statistics)."""
    monkeypatch.setattr(zero3, "CHUNK_NUMEL", 4, raising=False)
    shards = _shards()
    method, trainer = _lisa(shards)
    method._add_proximal(trainer)  # the first call proves the views (it reads each parameter once)
    expected = sum(float((g.master - a).double().pow(2).sum()) for g, a in zip(shards.groups, method.anchor))
    with _Recorder() as seen:
        method._add_proximal(trainer)
        stats = method.log_stats(trainer)
    assert seen.largest_output <= 4
    assert stats["lisa/drift_sq"] == pytest.approx(expected, rel=1e-12)
