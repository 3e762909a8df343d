"""Count what one SAP step adds over an SFT step: collectives, host syncs, op launches.

    deepspeed --num_gpus 2 scripts/count_step_ops.py [--repo PATH] [--layers 32,64]
        [--modes lora,full] [--out F.json]

Counts, not timings, so the figures hold on any machine. For each mode (LoRA r=8 on
q_proj/v_proj, or full fine-tuning) and layer count, a random-weight Llama (the tiny
test model's config with ``num_hidden_layers`` changed: hidden 64, so it runs on CPU) is
trained by the sap-ds ``Trainer`` found under ``--repo`` (default: this checkout; point it
at another checkout to count older code: only ``Trainer``, ``train_step``, ``timer`` and
SAP's state, ``method.state`` (``sap_state`` in older checkouts), are used). After warm-up steps, one SFT step and one SAP step (paper
settings: a safety pass and a probe pass every step) are counted, each with the reads the
trainer does when it logs that step, under:

- a ``TorchDispatchMode`` that counts every aten op (``ops``: kernel launches on a GPU),
  the ``c10d`` collectives however they are called (``collectives``: DeepSpeed binds some
  torch.distributed functions at start-up, so wrapping module attributes would miss
  them), and ``aten._local_scalar_dense`` (``.item()``, ``float()``, ``bool()`` of a tensor);
- wrappers of ``Tensor.tolist``, ``Tensor.cpu``, ``Tensor.numpy`` and the CUDA
  ``synchronize`` functions; with those, ``syncs`` = every point where the host waits for
  the device (on CPU the calls are counted; they would wait on a GPU).

The persistence threshold is scaled to the small hidden size (``--persistence-threshold``,
default 1000 elements) so that, as in a real model, LoRA adapters and norms are persistent
and the weight matrices are not. Prints a table and writes JSON (rank 0).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="sap-ds checkout whose code to count")
    p.add_argument("--config", default="configs/tiny.yaml", help="run config, relative to --repo")
    p.add_argument("--layers", default="32,64")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--warmup", type=int, default=2, help="steps before the counted one (first-use costs)")
    p.add_argument("--persistence-threshold", type=int, default=1000)
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", type=int, default=None)
    return p.parse_args(argv)


def call_site() -> str:
    """Where a collective or sync comes from: the innermost sap_ds function and the
    innermost DeepSpeed function on the stack (``sap.perturb > partition_parameters.
    _all_gather_dtype``), to tell SAP's own bookkeeping from the passes' gathers."""
    sap_site = ds_site = None
    frame = sys._getframe(2)
    while frame is not None and not (sap_site and ds_site):
        path = frame.f_code.co_filename
        if ds_site is None and f"{os.sep}deepspeed{os.sep}" in path:
            ds_site = f"{Path(path).stem}.{frame.f_code.co_name}"
        elif sap_site is None and f"{os.sep}sap_ds{os.sep}" in path:
            sap_site = f"{Path(path).stem}.{frame.f_code.co_name}"
        frame = frame.f_back
    return " > ".join(x for x in (sap_site, ds_site) if x) or "other"


class Counter:
    """The counting context: a dispatch mode plus Python-level wrappers."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        self.counts = collections.Counter()
        counts = self.counts

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.name()  # e.g. "aten::mm", "c10d::allreduce_"
                counts["ops"] += 1
                if name.startswith("c10d::") and "wait" not in name:
                    counts["collectives"] += 1
                    counts[f"collective:{name.removeprefix('c10d::')}"] += 1
                    counts[f"collective@{call_site()}"] += 1
                elif name == "aten::_local_scalar_dense":
                    counts["syncs"] += 1
                    counts["sync:item"] += 1
                    counts[f"sync@{call_site()}"] += 1
                return func(*args, **(kwargs or {}))

        self._mode_cls = Mode
        self._patches = []
        for owner, attr, label in ((torch.Tensor, "tolist", "sync:tolist"), (torch.Tensor, "cpu", "sync:cpu"),
                                   (torch.Tensor, "numpy", "sync:numpy"), (torch.cuda, "synchronize", "sync:cuda"),
                                   (torch.cuda.Event, "synchronize", "sync:cuda_event"),
                                   (torch.cuda.Stream, "synchronize", "sync:cuda_stream")):
            self._patches.append((owner, attr, label, getattr(owner, attr)))

    def __enter__(self):
        for owner, attr, label, original in self._patches:
            def wrapper(*args, _original=original, _label=label, **kwargs):
                self.counts["syncs"] += 1
                self.counts[_label] += 1
                self.counts[f"sync@{call_site()}"] += 1
                return _original(*args, **kwargs)

            setattr(owner, attr, wrapper)
        self._mode = self._mode_cls()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for owner, attr, _, original in self._patches:
            setattr(owner, attr, original)
        return False


def model_folder(layers: int, root: Path) -> Path:
    """The tiny test model's folder (config + tokenizer) with ``layers`` decoder layers."""
    from sap_ds.model.embedded import tiny_model_dir

    src = tiny_model_dir()
    dst = root / f"llama-{layers}"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def log_reads(trainer) -> None:
    """What the trainer reads from the device when it logs a step (this checkout's, or
    the older per-value reads when ``sap.stats_as_floats`` does not exist)."""
    from sap_ds.sap import step as sap_step

    trainer.timer.pop()
    state = getattr(trainer.method, "state", None) if hasattr(trainer, "method") else None
    state = getattr(trainer, "sap_state", state)  # older checkouts kept SAP's state on the trainer
    if state is None:
        return
    if hasattr(sap_step, "stats_as_floats"):
        sap_step.stats_as_floats(state)
    else:
        [float(v) for v in state.stats.values()]
        state.probe.vectors.detach().norm().item()


def count(cfg, rank, world, warmup: int) -> dict:
    import gc

    from sap_ds.training.trainer import Trainer

    trainer = Trainer(cfg, rank, world)
    for step in range(warmup):
        trainer.train_step(step)
        log_reads(trainer)
    with Counter() as counter:
        trainer.train_step(warmup)
        log_reads(trainer)
    del trainer
    try:
        from sap_ds.parallel.zero3 import release_deepspeed_globals

        release_deepspeed_globals()
    except ImportError:
        pass
    gc.collect()
    return dict(counter.counts)


def main(argv=None) -> int:
    args = parse_args(argv)
    repo = Path(args.repo).resolve()
    sys.path.insert(0, str(repo))
    os.chdir(repo)
    from sap_ds.config.run import load_config
    from sap_ds.parallel.distributed import init_distributed

    rank, _, world = init_distributed()
    import torch.distributed as dist

    work = Path(tempfile.mkdtemp(prefix=f"count_ops_r{rank}_"))
    ds = json.loads((repo / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold
    (work / "ds.json").write_text(json.dumps(ds))
    rows = []
    for mode in args.modes.split(","):
        for layers in (int(x) for x in args.layers.split(",")):
            folder = model_folder(layers, work)
            per_method = {}
            for method in ("sft", "sap"):
                overrides = [f"model.path={folder}", "model.from_config=true", f"method={method}",
                             f"deepspeed_config={work / 'ds.json'}", f"output_dir={work / 'run'}",
                             f"train.max_steps={args.warmup + 1}", "train.resume=never", "export.enabled=false",
                             "sap.safety_every=1", "sap.probe_fraction=1.0", "sap.rho=0.05", "sap.probe_layers=[1,2]",
                             ]
                if mode == "lora":
                    overrides += ["lora.enabled=true", "lora.r=8", "lora.target_modules=[q_proj,v_proj]"]
                cfg = load_config(repo / args.config, overrides)
                per_method[method] = count(cfg, rank, world, args.warmup)
            keys = sorted(set(per_method["sft"]) | set(per_method["sap"]))
            added = {k: per_method["sap"].get(k, 0) - per_method["sft"].get(k, 0) for k in keys}
            rows.append({"mode": mode, "layers": layers, "sft": per_method["sft"], "sap": per_method["sap"],
                         "sap_added": added})
    every = [None] * world
    dist.all_gather_object(every, rows)
    if rank == 0:
        print(f"repo {repo}  world {world}  persistence threshold {args.persistence_threshold}")
        head = f"{'mode':<5} {'layers':>6} | {'SFT coll':>8} {'SFT syncs':>9} {'SFT ops':>8} | " \
               f"{'SAP+ coll':>9} {'SAP+ syncs':>10} {'SAP+ ops':>8}"
        print(head)
        print("-" * len(head))
        for r in rows:  # rank 0's counts (ranks differ only in padding-dependent ops)
            s, a = r["sft"], r["sap_added"]
            print(f"{r['mode']:<5} {r['layers']:>6} | {s.get('collectives', 0):>8} {s.get('syncs', 0):>9} "
                  f"{s.get('ops', 0):>8} | {a.get('collectives', 0):>9} {a.get('syncs', 0):>10} {a.get('ops', 0):>8}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"repo": str(repo), "world": world, "args": vars(args),
                                                  "rows_per_rank": every}, indent=1))
    dist.barrier()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
