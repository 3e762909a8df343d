"""This rank's ZeRO-3 shards of the trainable weights, as flat buffers per parameter group.

The SAP step (``sap_ds/sap/step.py``) never touches DeepSpeed internals: it asks this module
for the local gradient, the fp32 master and the low-precision working shard of each
group, and for the two operations that need care under ZeRO-3:

* ``refresh_gathered``: after any in-place edit of ``ds_tensor``, ZeRO-3 may still hold
  full copies gathered before the edit (after a no-grad or ``autograd.grad`` pass) and
  would compute with those stale weights. Only the trainable parameters are ever edited,
  so only their gathered copies are released (frozen ones stay valid and stay gathered),
  and the persistent trainable ones (the small parameters ZeRO keeps whole) are
  re-gathered in one coalesced all-gather.
* padding: the last rank's shard of a parameter is padded, and DeepSpeed leaves the
  padding uninitialised. We zero it once in the master and working shards (AdamW keeps a
  zero with a zero gradient at zero) and in each copied gradient, so norms over whole
  flat buffers count only real weights.

Per step the cost does not grow with the number of parameters: one gradient copy per
flat group (``copy_local_grads``), one index fill for all padding, one coalesced
all-gather per refresh.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sap_ds.parallel.segments import Segments


CHUNK_NUMEL = 2**24  # elements per piece of a whole-shard element-wise pass (``chunked``): 64 MiB in fp32, 128 MiB in float64


def chunked(*buffers: torch.Tensor):
    """Views of equally long flat buffers, ``CHUNK_NUMEL`` elements at a time, side by side:
    for an element-wise pass whose temporaries must stay one chunk in size, not a shard."""
    numel = buffers[0].numel()
    for start in range(0, numel, CHUNK_NUMEL):
        length = min(CHUNK_NUMEL, numel - start)
        yield tuple(b.narrow(0, start, length) for b in buffers)


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


def _refuse_swapped(lp, master, params) -> None:
    """A group whose shards DeepSpeed keeps on NVMe (``offload_*.device: nvme``) has nothing in
    memory to read or edit: a working shard of None (parameter offload) or an fp32 master
    held as ``torch.empty(0)`` while swapped out (optimizer offload; DeepSpeed 0.19
    ``runtime/zero/stage3.py:1117-1118``). ``load_ds_config`` refuses both settings before
    any rank starts; this names them where an engine was built some other way."""
    numel = sum(p.partition_numel() for p in params)
    if lp is None:
        raise ShardLayoutError(
            "a group's working shard is not in memory: 'zero_optimization.offload_param.device' is nvme, which "
            "sap-ds cannot work with; set it to \"cpu\" (or \"none\")")
    if master.numel() == 0 and numel > 0:
        raise ShardLayoutError(
            f"a group's fp32 master ({numel} elements) is an empty tensor, as DeepSpeed keeps one swapped out to "
            "NVMe: 'zero_optimization.offload_optimizer.device' is nvme, which sap-ds cannot work with; set it to "
            "\"cpu\" (or \"none\")")


def partition_rank(p) -> int:
    """This rank's index in the group ``p`` is partitioned over (``ds_process_group``),
    which is not the global rank under MiCS or hierarchical partitioning."""
    if not dist.is_initialized():
        return 0
    group = getattr(p, "ds_process_group", None)
    return dist.get_rank(group=group) if group is not None else dist.get_rank()


class _EditedParams(nn.Module):
    """A module that holds exactly the trainable parameters (no copies), so DeepSpeed's
    own ``release_and_reset_all(module)`` can release those and nothing else."""

    def __init__(self, params):
        super().__init__()
        self.held = nn.ParameterList(params)

    def ds_external_parameters(self):  # what ZeRO-3's iter_params reads besides named_parameters
        return []


class Zero3Shards:
    """The local shards of every trainable parameter of a ZeRO-3 engine."""

    def __init__(self, engine):
        self.engine = engine
        self.optimizer = engine.optimizer
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        groups, lp_flats, master_flats = _flat_group_buffers(self.optimizer)
        self.groups: list[GroupShard] = []
        self.valid: list[list[int]] = []
        for params, lp, master in zip(groups, lp_flats, master_flats):
            _refuse_swapped(lp, master, params)
            offsets, padding, valid_numels, offset = [], [], [], 0
            for p in params:
                n = p.partition_numel()
                if p.ds_tensor.data_ptr() != lp.data_ptr() + offset * lp.element_size():
                    raise ShardLayoutError(f"parameter {getattr(p, 'ds_id', '?')} is not at its expected place in the flat shard")
                offsets.append(offset)
                valid = self._valid_numel(p)
                valid_numels.append(valid)
                if valid < n:
                    padding.append((offset + valid, n - valid))
                offset += n
            if offset != lp.numel() or master.numel() != lp.numel():
                raise ShardLayoutError(f"flat shard of {lp.numel()} elements does not match its parameters ({offset})")
            self.groups.append(GroupShard(list(params), offsets, lp, master, padding))
            self.valid.append(valid_numels)
        self.trainable = [p for g in self.groups for p in g.params]
        self.trainable_numel = sum(p.ds_numel for p in self.trainable)  # all ranks: real weights only
        self.persistent_trainable = sorted((p for p in self.trainable if getattr(p, "ds_persist", False)),
                                           key=lambda p: p.ds_id)
        self._edited = _EditedParams(self.trainable)
        device = self.groups[0].master.device if self.groups else torch.device("cpu")
        self._padding_index = [torch.tensor([i for s, n in g.padding for i in range(s, s + n)], dtype=torch.long,
                                            device=g.master.device) for g in self.groups]
        self.segments = Segments(list(self.param_slices()), [g.master.numel() for g in self.groups], device)
        self._grad_views: list | None = None  # per group: the engine's gradient shard laid out like the master
        self.zero_padding()

    def _valid_numel(self, p) -> int:
        """Elements of ``p``'s local shard that are real weights (the rest is padding)."""
        n = p.partition_numel()
        return max(0, min(n, p.ds_numel - partition_rank(p) * n))

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

    # ------------------------------------------------------------------ gradients

    def _find_grad_views(self) -> list | None:
        """Per group, the engine's reduced gradient shard as one flat view laid out like
        the master (``None`` where that cannot be proven: then ``copy_local_grads`` reads
        parameter by parameter through DeepSpeed's accessor).

        Where stage 3 keeps them (DeepSpeed 0.19 ``stage3.py``): with the optimizer on the
        device, in ``grad_partitions_flat_buffer``, the partitions of ``chain(fp16_groups)``
        back to back; with an offloaded optimizer, in ``fp32_partitioned_groups_flat[i].grad``.
        In both, ``grad_position[param_id] = [group, offset, numel]`` places a parameter, and
        ``safe_get_local_grad`` reads exactly that place. The proof, once, on the first
        reduced gradient: every parameter's ``grad_position`` equals its place in our master
        layout, and ``safe_get_local_grad(p)`` either is a view at that very address (an fp32
        buffer on the compute device: no copy) or holds exactly the values of that slice (a
        bf16 accumulation buffer, or an offloaded one that the accessor copies)."""
        from deepspeed.utils import safe_get_local_grad

        opt = self.optimizer
        positions = getattr(opt, "grad_position", None)
        if positions is None or not hasattr(opt, "get_param_id"):
            return None
        offloaded = bool(getattr(opt, "offload_optimizer", False))
        flat = getattr(opt, "grad_partitions_flat_buffer", None)
        views, start = [], 0
        for gi, g in enumerate(self.groups):
            n = g.master.numel()
            if offloaded:
                view = opt.fp32_partitioned_groups_flat[gi].grad
                if view is None or view.numel() != n:
                    return None
            else:
                if flat is None or flat.numel() < start + n:
                    return None
                view = flat.narrow(0, start, n)
            for p, offset in zip(g.params, g.offsets):
                n_p = p.partition_numel()
                if list(positions.get(opt.get_param_id(p), ())) != [gi, offset, n_p]:
                    return None
                grad = safe_get_local_grad(p)
                if grad is None or grad.numel() != n_p:
                    return None
                same_storage = grad.device == view.device and grad.data_ptr() == view.data_ptr() + offset * view.element_size()
                if not same_storage and not torch.equal(grad.reshape(-1).float(),
                                                        view.narrow(0, offset, n_p).to(grad.device).float()):
                    return None
            views.append(view)
            start += n
        return views

    @torch.no_grad()
    def copy_local_grads(self, out: list[torch.Tensor]) -> None:
        """Copy this rank's reduced fp32 gradient shards into ``out`` (padding zeroed): one
        copy per flat group where the layout is proven (``_find_grad_views``), else one
        DeepSpeed ``safe_get_local_grad`` per parameter. No stream synchronisation is
        needed: ``engine.backward`` ends with stage 3's ``independent_gradient_partition_
        epilogue``, which waits for the reduce-scatter stream."""
        if self._grad_views is None:
            self._grad_views = self._find_grad_views() or []
        if self._grad_views:
            for view, buf in zip(self._grad_views, out):
                buf.copy_(view)
        else:
            self._copy_local_grads_per_param(out)
        for index, buf in zip(self._padding_index, out):
            if index.numel():
                buf.index_fill_(0, index, 0.0)

    @torch.no_grad()
    def _copy_local_grads_per_param(self, out: list[torch.Tensor]) -> None:
        from deepspeed.utils import safe_get_local_grad

        for g, buf in zip(self.groups, out):
            for p, offset in zip(g.params, g.offsets):
                grad = safe_get_local_grad(p)
                if grad is None:
                    buf.narrow(0, offset, p.partition_numel()).zero_()
                else:
                    buf.narrow(0, offset, grad.numel()).copy_(grad.reshape(-1))

    @torch.no_grad()
    def add_proximal_gradient(self, anchors: list[torch.Tensor], rho: float) -> None:
        """grad += rho * (master - anchor) on this rank's reduced gradient shards, before
        ``engine.step``: the gradient of ``rho/2 ||w - anchor||^2`` (``anchors``: flat fp32
        buffers laid out like the master, padding zero). Summed in fp32 and written in the
        gradient's own dtype, as DeepSpeed's ``safe_set_local_grad`` writes it.

        Through the per-group gradient views of ``copy_local_grads`` (proven once), a chunk
        at a time (``CHUNK_NUMEL``): no reduce-stream synchronisation or copy per parameter,
        no temporary beyond a chunk. With an offloaded optimizer, gradient clipping reads
        per-parameter norms that DeepSpeed records when it copies the gradient into the
        master's ``.grad``; they are recomputed as ``set_local_grad_for_param`` does
        (DeepSpeed 0.19 ``stage3.py:3229-3230``), or clipping would use the norms without
        the term. Where the views cannot be proven, parameter by parameter through
        DeepSpeed's accessors."""
        if self._grad_views is None:
            self._grad_views = self._find_grad_views() or []
        if not self._grad_views:
            self._add_proximal_gradient_per_param(anchors, rho)
            return
        for g, anchor, view in zip(self.groups, anchors, self._grad_views):
            for grad, master, anchor_piece in chunked(view, g.master, anchor):
                grad.add_(torch.sub(master, anchor_piece).mul_(rho))  # computed in fp32, rounded once into grad's dtype
        opt = self.optimizer
        if getattr(opt, "offload_optimizer", False):
            for gi, p, offset, _ in self.param_slices():
                grad = self._grad_views[gi].narrow(0, offset, p.partition_numel())
                opt.norm_for_param_grads[opt.get_param_id(p)] = opt._constant_buffered_norm2(grad)

    @torch.no_grad()
    def _add_proximal_gradient_per_param(self, anchors: list[torch.Tensor], rho: float) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for gi, p, offset, _ in self.param_slices():
            n = p.partition_numel()
            grad = safe_get_local_grad(p)
            delta = torch.sub(self.groups[gi].master.narrow(0, offset, n), anchors[gi].narrow(0, offset, n)).mul_(rho)
            safe_set_local_grad(p, grad.reshape(-1) + delta.to(grad.device))

    @torch.no_grad()
    def accumulate_local_grads(self, out: list[torch.Tensor], alpha: float) -> None:
        """``out += alpha * grad``: this rank's reduced gradient shards added into flat fp32
        buffers laid out like the master (padding left as it is), a chunk at a time through
        the per-group views of ``copy_local_grads``, else parameter by parameter. Booster's
        second harmful gradient is subtracted this way from the first (alpha -1), so that it
        needs one shard-sized buffer, not two."""
        if self._grad_views is None:
            self._grad_views = self._find_grad_views() or []
        if not self._grad_views:
            from deepspeed.utils import safe_get_local_grad

            for gi, p, offset, valid in self.param_slices():
                grad = safe_get_local_grad(p)
                if grad is not None and valid:
                    out[gi].narrow(0, offset, valid).add_(grad.reshape(-1)[:valid].to(out[gi]), alpha=alpha)
            return
        for view, buf in zip(self._grad_views, out):
            for grad, piece in chunked(view, buf):
                piece.add_(grad, alpha=alpha)  # the gradient's values exactly, summed in fp32
        for index, buf in zip(self._padding_index, out):
            if index.numel():
                buf.index_fill_(0, index, 0.0)

    @torch.no_grad()
    def add_to_local_grads(self, buffers: list[torch.Tensor], scale: torch.Tensor) -> None:
        """``grad += scale * buffer`` on this rank's reduced gradient shards, before
        ``engine.step`` (``buffers``: flat fp32, laid out like the master, padding zero;
        ``scale``: a 0-dim tensor, so that no host read is needed). As
        ``add_proximal_gradient``: summed in fp32 and rounded once into the gradient's dtype,
        through the per-group views where proven, with the per-parameter norms an offloaded
        optimizer's clipping reads recomputed; else through DeepSpeed's accessors."""
        if self._grad_views is None:
            self._grad_views = self._find_grad_views() or []
        if not self._grad_views:
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            for gi, p, offset, _ in self.param_slices():
                grad = safe_get_local_grad(p)
                piece = buffers[gi].narrow(0, offset, p.partition_numel())
                added = grad.reshape(-1).float() + (piece * scale.to(piece.device)).to(grad.device)
                safe_set_local_grad(p, added.to(grad.dtype))
            return
        for buf, view in zip(buffers, self._grad_views):
            s = scale.to(buf.device, torch.float32)
            for grad, piece in chunked(view, buf):
                grad.add_(piece * s)  # computed in fp32, rounded once into grad's dtype
        opt = self.optimizer
        if getattr(opt, "offload_optimizer", False):
            for gi, p, offset, _ in self.param_slices():
                grad = self._grad_views[gi].narrow(0, offset, p.partition_numel())
                opt.norm_for_param_grads[opt.get_param_id(p)] = opt._constant_buffered_norm2(grad)

    @property
    def grads_copied_per_group(self) -> bool:
        """Whether ``copy_local_grads`` and ``add_proximal_gradient`` use the flat per-group
        views (after the first call of either)."""
        return bool(self._grad_views)

    def param_slices(self):
        """(group index, parameter, offset, valid length) for every local parameter shard."""
        for gi, g in enumerate(self.groups):
            for p, offset, valid in zip(g.params, g.offsets, self.valid[gi]):
                yield gi, p, offset, valid

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
        """Whether this rank's reduced gradient shards hold only finite values (a 0-dim bool).

        One buffer holds them in every placement of the optimizer: ``grad_partitions_flat_
        buffer``, where stage 3 reduces and accumulates every partition (on the CPU when the
        optimizer is offloaded); an offloaded master's ``.grad`` is a copy of it made at the
        accumulation boundary (DeepSpeed 0.19 ``stage3.py``: ``partition_grads`` and
        ``_offload_grad_partition_at_boundary``), so it is read only where that buffer is
        missing. One ``aminmax`` pass per buffer, with no temporary beyond its two scalars:
        both propagate NaN (as ``torch.aminmax`` documents) and an infinity is its own
        extreme (an ``isfinite`` of the buffer was a 1 B/element temporary)."""
        flat = getattr(self.optimizer, "grad_partitions_flat_buffer", None)
        if flat is not None:
            buffers = [flat]
        else:
            buffers = [m.grad for m in self.optimizer.fp32_partitioned_groups_flat if m.grad is not None]
        extremes = [torch.stack(torch.aminmax(b)) for b in buffers if b.numel()]
        if not extremes:
            return torch.ones((), dtype=torch.bool)
        return torch.isfinite(torch.cat([e.cpu() for e in extremes])).all()

    # ------------------------------------------------------------------ gathered copies

    @torch.no_grad()
    def refresh_gathered(self) -> None:
        """Make the next forward read the edited shards (see the module docstring).

        DeepSpeed's ``release_and_reset_all`` waits for in-flight gathers and releases
        every gathered copy of the module it is given: given a module holding only the
        trainable parameters, the frozen ones (all of a LoRA base model) keep their
        gathered copies. The persistent trainable parameters are re-gathered with
        ``all_gather_coalesced`` (one collective per dtype; ``Parameter.all_gather`` on a
        list issues one per tensor)."""
        self._order_gathers_after_edit()
        offload = self.optimizer.parameter_offload
        offload.get_param_coordinator().release_and_reset_all(self._edited)
        if self.persistent_trainable:
            self.persistent_trainable[0].all_gather_coalesced(self.persistent_trainable).wait()

    def _order_gathers_after_edit(self) -> None:
        """CUDA only: the perturb/restore kernels wrote the shards on the current stream,
        but ZeRO-3's forward gathers read ``ds_tensor`` on the coordinator's own all-gather
        stream, which does not wait for ours. Make it wait (no host synchronisation); if
        that stream cannot be found (another DeepSpeed version), wait on the host instead:
        the one synchronisation per shard edit that correctness needs."""
        if not torch.cuda.is_available() or not self.groups or self.groups[0].lp.device.type != "cuda":
            return
        coordinator = self.optimizer.parameter_offload.get_param_coordinator()
        stream = getattr(coordinator, "_PartitionedParameterCoordinator__allgather_stream", None)
        if isinstance(stream, torch.cuda.Stream):
            stream.wait_stream(torch.cuda.current_stream())
        else:
            torch.cuda.current_stream().synchronize()


def release_deepspeed_globals() -> None:
    """Drop the two module-level references through which DeepSpeed 0.19 keeps a
    destroyed ZeRO-3 engine (and its model) alive: the forward module stack of
    ``parameter_offload`` and the class-level ``lru_cache`` of
    ``PartitionedParameterCoordinator.__params_to_release`` (its keys hold the modules).
    Without this every variant leaks its model; on a GPU the next variant would OOM."""
    try:
        from deepspeed.runtime.zero import parameter_offload

        parameter_offload.FWD_MODULE_STACK.clear()
    except (ImportError, AttributeError):
        pass
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        for value in vars(PartitionedParameterCoordinator).values():
            for fn in (value, *(c.cell_contents for c in (getattr(value, "__closure__", None) or ()))):
                if hasattr(fn, "cache_clear"):
                    fn.cache_clear()
    except (ImportError, ValueError):  # ValueError: an empty closure cell
        pass
