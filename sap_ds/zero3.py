"""This rank's ZeRO-3 shards of the trainable weights, as flat buffers per parameter group.

The SAP step (``sap_ds/sap.py``) never touches DeepSpeed internals: it asks this module
for the local gradient, the fp32 master and the low-precision working shard of each
group, and for the two operations that need care under ZeRO-3:

* ``refresh_gathered``: after any in-place edit of ``ds_tensor``, ZeRO-3 may still hold
  full copies gathered before the edit (after a no-grad or ``autograd.grad`` pass) and
  would compute with those stale weights. We release every gathered parameter and
  re-gather the persistent ones (the small parameters ZeRO keeps whole).
* padding: the last rank's shard of a parameter is padded, and DeepSpeed leaves the
  padding uninitialised. We zero it once in the master and working shards (AdamW keeps a
  zero with a zero gradient at zero) and in each copied gradient, so norms over whole
  flat buffers count only real weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class ShardLayoutError(RuntimeError):
    """The engine's buffers are not laid out as this module expects."""


@dataclass
class GroupShard:
    """Flat views of one ZeRO-3 parameter (sub-)group on this rank."""

    params: list  # the group's parameters, in buffer order
    offsets: list  # start of each parameter's shard in the flat buffers
    lp: torch.Tensor  # low-precision working shard (bf16, or fp32 in fp32 runs)
    master: torch.Tensor  # fp32 master shard (may be the same storage as lp in fp32 runs)
    padding: list  # (start, length) of padding inside the flat buffers

    @property
    def master_aliases_lp(self) -> bool:
        return self.master.data_ptr() == self.lp.data_ptr()


def _flat_group_buffers(optimizer):
    lp = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    master = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    groups = getattr(optimizer, "fp16_groups", None)
    if lp is None or master is None or groups is None:
        raise ShardLayoutError("the engine's optimizer is not a ZeRO stage-3 optimizer (set zero_optimization.stage to 3)")
    return groups, lp, master


class Zero3Shards:
    """The local shards of every trainable parameter of a ZeRO-3 engine."""

    def __init__(self, engine):
        self.engine = engine
        self.optimizer = engine.optimizer
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        groups, lp_flats, master_flats = _flat_group_buffers(self.optimizer)
        self.groups: list[GroupShard] = []
        for params, lp, master in zip(groups, lp_flats, master_flats):
            offsets, padding, offset = [], [], 0
            for p in params:
                n = p.partition_numel()
                if p.ds_tensor.data_ptr() != lp.data_ptr() + offset * lp.element_size():
                    raise ShardLayoutError(f"parameter {getattr(p, 'ds_id', '?')} is not at its expected place in the flat shard")
                offsets.append(offset)
                valid = self._valid_numel(p)
                if valid < n:
                    padding.append((offset + valid, n - valid))
                offset += n
            if offset != lp.numel() or master.numel() != lp.numel():
                raise ShardLayoutError(f"flat shard of {lp.numel()} elements does not match its parameters ({offset})")
            self.groups.append(GroupShard(list(params), offsets, lp, master, padding))
        self.zero_padding()

    def _valid_numel(self, p) -> int:
        """Elements of ``p``'s local shard that are real weights (the rest is padding)."""
        n = p.partition_numel()
        return max(0, min(n, p.ds_numel - self.rank * n))

    @torch.no_grad()
    def zero_padding(self) -> None:
        for g in self.groups:
            for start, length in g.padding:
                g.lp.narrow(0, start, length).zero_()
                g.master.narrow(0, start, length).zero_()

    @property
    def numel(self) -> int:
        return sum(g.lp.numel() for g in self.groups)

    def new_flat_buffers(self) -> list[torch.Tensor]:
        """One fp32 buffer per group, shaped like the master shard (for the direction)."""
        return [torch.zeros(g.master.numel(), dtype=torch.float32, device=g.master.device) for g in self.groups]

    @torch.no_grad()
    def copy_local_grads(self, out: list[torch.Tensor]) -> None:
        """Copy this rank's reduced fp32 gradient shards into ``out`` (padding zeroed).

        Uses DeepSpeed's public ``safe_get_local_grad`` (valid after backward, before
        step), which also works with an offloaded optimizer.
        """
        from deepspeed.utils import safe_get_local_grad

        for g, buf in zip(self.groups, out):
            for p, offset in zip(g.params, g.offsets):
                grad = safe_get_local_grad(p)
                if grad is None:
                    buf.narrow(0, offset, p.partition_numel()).zero_()
                else:
                    buf.narrow(0, offset, grad.numel()).copy_(grad.reshape(-1))
            for start, length in g.padding:
                buf.narrow(0, start, length).zero_()

    def param_slices(self):
        """(group index, parameter, offset, valid length) for every local parameter shard."""
        for gi, g in enumerate(self.groups):
            for p, offset in zip(g.params, g.offsets):
                yield gi, p, offset, self._valid_numel(p)

    @torch.no_grad()
    def drop_grads(self) -> None:
        """Forget accumulated gradients without stepping.

        ``zero_grad`` resets ZeRO-3's micro-step so the next backward *copies* into the
        gradient partitions instead of adding; but a later ``autograd.grad`` pass (the
        probe pass) runs the backward epilogue and the next forward then counts as a
        second micro-step, which *adds* to what is there. So the partitions are zeroed
        too: stale safety gradients can never leak into the weight update.
        """
        self.optimizer.zero_grad()
        flat = getattr(self.optimizer, "grad_partitions_flat_buffer", None)
        if flat is not None:
            flat.zero_()
        for master in self.optimizer.fp32_partitioned_groups_flat:  # offloaded optimizer
            if master.grad is not None:
                master.grad.zero_()

    @torch.no_grad()
    def local_grads_finite(self) -> torch.Tensor:
        """Whether this rank's gradient shards hold only finite values (a 0-dim bool)."""
        flat = getattr(self.optimizer, "grad_partitions_flat_buffer", None)
        buffers = [flat] if flat is not None else []
        buffers += [m.grad for m in self.optimizer.fp32_partitioned_groups_flat if m.grad is not None]
        ok = torch.ones((), dtype=torch.bool)
        for b in buffers:
            ok &= torch.isfinite(b).all().cpu()
        return ok

    @torch.no_grad()
    def refresh_gathered(self) -> None:
        """Make the next forward read the edited shards (see the module docstring)."""
        offload = self.optimizer.parameter_offload
        offload.get_param_coordinator().release_and_reset_all(self.engine.module)
        persistent = self.optimizer.persistent_parameters
        if persistent:
            persistent[0].all_gather(persistent)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor
