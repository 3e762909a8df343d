"""Atomic, resumable checkpoints.

Layout under ``<output_dir>/checkpoints``::

    step_00000020/          one complete checkpoint (DeepSpeed's shards + ours)
    latest                  the tag of the newest complete checkpoint, written last
    zero_to_fp32.py         DeepSpeed's scripts that rebuild whole weights from a checkpoint
    .staging/               where a checkpoint is written before it is renamed into place

A checkpoint is written into ``.staging``, renamed into place when every rank has
finished, and only then does ``latest`` (itself written to a temporary file and renamed)
point at it; DeepSpeed's recovery scripts, which it writes beside the checkpoint, are moved
up beside ``latest`` (where DeepSpeed's usage has them), and ``.staging`` is removed once
empty. A crash at any moment leaves the previous checkpoint intact and findable; what it
left in ``.staging`` (a checkpoint never renamed into place, so never one ``latest``
names) is removed at the next start (``remove_interrupted_saves``).
Our own state (trainer counters, RNG states, SAP probe/optimizer/direction) is saved as
safetensors plus JSON, never pickled.

A checkpoint written on N ranks resumes on M ranks (docs/design.md, "Resuming on another
number of ranks"): rank 0 converts it once into DeepSpeed's universal format, inside the
checkpoint folder (``step_N/universal``, written to a temporary folder and renamed), while
the other ranks wait on the long-timeout wait group, and every rank loads its new shard
from there. Beside it while it runs or after it was interrupted::

    step_00000020/.universal.tmp/          ds_to_universal's output until it has finished
    step_00000020/.universal_attempts.json the conversions started and not finished
    step_00000020/universal_conversion.log ds_to_universal's output, every try
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sap_ds.errors import CheckpointError  # defined there (a user error is reported without importing torch)
from sap_ds.files import atomic_write_text
from sap_ds.parallel.distributed import barrier, is_main, wait_group

log = logging.getLogger("sap_ds")
LATEST = "latest"
STAGING = ".staging"
RECOVERY_SCRIPTS = "zero_to_*.py"  # what DeepSpeed's save_checkpoint writes beside the tag folder (rank 0)
META = "sap_ds_meta.json"
UNIVERSAL = "universal"
CONVERSION_ATTEMPTS = ".universal_attempts.json"
CONVERSION_LOG = "universal_conversion.log"
MAX_INTERRUPTED_CONVERSIONS = 2  # then a job is refused: every requeue would start the conversion over
MAX_CONVERSION_WORKERS = 16  # beyond this the file system's throughput, not the worker count, sets the pace
CONVERSION_MEMORY_SHARE = 0.5  # of the node's available memory, what the workers may hold together


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(root: Path) -> str | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text(encoding="utf-8").strip()
    if not (root / tag).is_dir():
        raise CheckpointError(f"{pointer} names '{tag}', which does not exist in {root}; remove the pointer or restore the folder")
    return tag


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save(engine, root: Path, step: int, meta: dict, tensors: dict[str, torch.Tensor], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tag = tag_for(step)
    staging = root / STAGING
    if is_main():
        shutil.rmtree(staging / tag, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
    folder = staging / tag
    own = {f"rng.{k}": v for k, v in rng_state().items()}
    own.update({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    save_file(own, str(own_file(folder, rank)))
    if is_main():
        meta = {**meta, "step": step, "python_random": _encode_random_state()}
        atomic_write_text(folder / META, json.dumps(meta, indent=1))
    barrier()
    final = root / tag
    if is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(folder, final)
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, keep)
        for script in staging.glob(RECOVERY_SCRIPTS):
            os.replace(script, root / script.name)
        try:
            staging.rmdir()  # empty now; not empty only with another save's leftovers (removed at the next start)
        except OSError:
            pass
    barrier()
    return final


def remove_interrupted_saves(root: Path) -> list[str]:
    """Rank 0, when a run starts (before any save): delete ``.staging``, which holds only
    the unfinished writes of a save that was interrupted (a finished one is renamed out of
    it before ``latest`` names it). Returns what was there, for the log."""
    staging = root / STAGING
    if not staging.is_dir():
        return []
    left = sorted(p.name for p in staging.iterdir())
    shutil.rmtree(staging)
    return left


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    current = (root / LATEST).read_text().strip()
    for old in tags[:-keep]:
        if old != current:
            shutil.rmtree(root / old, ignore_errors=True)


def _encode_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def own_file(folder: Path, rank: int) -> Path:
    return folder / f"sap_ds_rank{rank:05d}.safetensors"


def read_meta(root: Path) -> tuple[Path, dict] | None:
    """(folder, metadata) of the checkpoint ``latest`` points at; None if there is none."""
    tag = latest_tag(root)
    if tag is None:
        return None
    folder = root / tag
    meta_path = folder / META
    try:
        return folder, json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({exc}); the checkpoint is corrupt") from None


def peek_meta(root: Path) -> dict | None:
    """``read_meta``'s metadata, or None for any problem (``load`` reports it later): what
    the trainer needs to know before it builds the engine (the world size the checkpoint
    was written on)."""
    try:
        found = read_meta(root)
    except CheckpointError:
        return None
    return found[1] if found else None


def check_identity(folder: Path, meta: dict, expect: dict) -> None:
    """A checkpoint of another model or method cannot be resumed: say which key differs,
    before anything is loaded or written."""
    for key, value in expect.items():
        if meta.get(key) != value:
            raise CheckpointError(
                f"{folder}: this checkpoint was written with {key}={meta.get(key)!r}, this run has {key}={value!r}: "
                f"it belongs to another run and was neither loaded nor changed. Use a new output_dir, or set "
                f"train.resume=never to start this one over (which deletes the old run's checkpoints)"
            )


def config_identity(cfg) -> dict:
    """The part of ``Trainer.checkpoint_identity`` a run config fixes on its own (the
    trainable parameter count needs the model)."""
    return {"method": cfg.method, "model_path": str(cfg.model.path), "lora": cfg.lora.enabled}


def check_resumable(cfg) -> None:
    """Before the model loads: a checkpoint in output_dir of another method, model or LoRA
    setting is refused in seconds, not after a 70B model has been loaded and sharded.
    Unreadable metadata is left to ``Trainer.maybe_resume``, which checks the full identity
    again and reports it after the config's own errors."""
    root = Path(cfg.output_dir) / "checkpoints"
    meta = peek_meta(root) if cfg.train.resume != "never" else None
    if meta is not None:
        check_identity(root / latest_tag(root), meta, config_identity(cfg))


def conversion_workers(folder: Path) -> tuple[int, int]:
    """(extract, merge) worker processes for ds_to_universal on this node: as many as rank 0's
    cores, up to ``MAX_CONVERSION_WORKERS``, and as fit together in ``CONVERSION_MEMORY_SHARE``
    of the memory available now (on an offloading node the optimizer states already hold
    most of it); at least one each.

    What a worker holds (ds_to_universal in DeepSpeed 0.19): an extract worker loads one
    rank's whole optimizer file (the fp32 weights and both Adam moments of its shard, 12 B
    per parameter over the ranks: ~105 GB per file for 70B full fine-tuning on 8 ranks); a
    merge worker, one state of one parameter at a time, its fp32 fragments and their
    concatenation (8 B per element of the largest parameter: 8.4 GB for a 70B embedding)."""
    import psutil  # a dependency of DeepSpeed

    cores = len(os.sched_getaffinity(0))
    budget = psutil.virtual_memory().available * CONVERSION_MEMORY_SHARE
    optim_files = sorted(folder.glob("*_optim_states.pt"))
    per_extract = max((f.stat().st_size for f in optim_files), default=0)
    per_merge = 8 * _largest_parameter(folder) or per_extract

    def affordable(per_worker: int) -> int:
        return int(budget // per_worker) if per_worker else MAX_CONVERSION_WORKERS

    extract = max(1, min(cores, MAX_CONVERSION_WORKERS, len(optim_files), affordable(per_extract)))
    merge = max(1, min(cores, MAX_CONVERSION_WORKERS, affordable(per_merge)))
    return extract, merge


def _largest_parameter(folder: Path) -> int:
    """Elements of the checkpoint's largest parameter, from DeepSpeed's ``param_shapes`` (0
    if no model-state file records them). Memory-mapped: a ZeRO-1/2 file holds the weights."""
    from deepspeed.checkpoint.constants import PARAM_SHAPES

    for path in sorted(folder.glob("*model_states.pt")):
        if "_expert_" in path.name:
            continue
        groups = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(PARAM_SHAPES) or []
        return max((shape.numel() for group in groups for shape in group.values()), default=0)
    return 0


def _read_attempts(record: Path) -> list[dict]:
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError):
        return [{"started": "unknown (unreadable record)"}]


def _size_text(folder: Path) -> str:
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    return f"{total / 2**30:.1f} GiB"


def _conversion_command(folder: Path, output: Path, extract: int, merge: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
            "--output_folder", str(output), "--num_extract_workers", str(extract), "--num_merge_workers", str(merge)]


def _log_tail(path: Path, lines: int = 12) -> str:
    """The last lines of the latest try in ``path`` (progress bars' carriage returns as line ends)."""
    text = path.read_text(encoding="utf-8", errors="replace").rsplit("\n--- try ", 1)[-1]
    kept = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def convert_to_universal(folder: Path) -> Path:
    """``folder/universal``: the checkpoint in DeepSpeed's universal format (every
    parameter's fp32 weights and Adam moments whole, one file each), which any number of
    ranks can load. Made once (rank 0 only), in a temporary folder renamed into place, so
    an interrupted conversion is never taken for a finished one.

    ds_to_universal runs in a process of its own (``python -m``), with parallel workers
    (``conversion_workers``): a fresh process forks its workers safely, which a rank with
    NCCL and gloo threads would not, and its output goes to ``universal_conversion.log``.
    It cannot continue a half-done conversion (it extracts every shard again, and writes
    its files in place, so a truncated one cannot be told apart). Each try is therefore
    recorded until it ends: a try that finds earlier ones says so and starts over, and
    after ``MAX_INTERRUPTED_CONVERSIONS`` the job is refused with the command that converts
    outside a job, instead of every requeue starting over for ever."""
    target = folder / UNIVERSAL
    if target.is_dir():
        return target
    tmp = folder / f".{UNIVERSAL}.tmp"
    record = folder / CONVERSION_ATTEMPTS
    earlier = _read_attempts(record)
    extract, merge = conversion_workers(folder)
    started = ", ".join(str(a.get("started")) for a in earlier)
    if len(earlier) >= MAX_INTERRUPTED_CONVERSIONS:
        command = shlex.join(["python", *_conversion_command(folder, tmp, extract, merge)[1:]])
        raise CheckpointError(
            f"{folder}: its conversion to DeepSpeed's universal format (to resume on another number of ranks) was "
            f"interrupted {len(earlier)} times (started {started}; {_size_text(tmp)} in {tmp.name} when the last one "
            f"stopped, log: {folder / CONVERSION_LOG}), and a job would start it over again. Convert it outside a job, on "
            f"a node with the memory: `rm -rf {tmp} && {command} && mv {tmp} {target}`, then submit again; or give the "
            f"job more time (and distributed.wait_timeout_minutes, which bounds the other ranks' wait) and delete "
            f"{record} to let a job try again; or resume on the number of ranks it was written on"
        )
    if earlier:
        log.warning("%s: a conversion to DeepSpeed's universal format was interrupted %d time%s (started %s; "
                    "%s in %s when it stopped; log: %s). ds_to_universal cannot continue one: starting over, try %d "
                    "of %d", folder, len(earlier), "s" if len(earlier) > 1 else "", started, _size_text(tmp), tmp.name,
                    CONVERSION_LOG, len(earlier) + 1, MAX_INTERRUPTED_CONVERSIONS + 1)
    shutil.rmtree(tmp, ignore_errors=True)
    attempt = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "host": socket.gethostname(), "extract_workers": extract, "merge_workers": merge}
    atomic_write_text(record, json.dumps([*earlier, attempt], indent=1))
    log.info("%s: converting to DeepSpeed's universal format on this node, %d extract and %d merge workers "
             "(DeepSpeed's output: %s); the other ranks wait", folder, extract, merge, CONVERSION_LOG)
    with open(folder / CONVERSION_LOG, "a", encoding="utf-8") as out:
        out.write(f"\n--- try {len(earlier) + 1}: {json.dumps(attempt)}\n")
        out.flush()
        # The conversion reads files on the CPU: no GPU for it, whatever the rank's accelerator.
        done = subprocess.run(_conversion_command(folder, tmp, extract, merge), stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}, check=False)
    if done.returncode < 0:  # killed by a signal (the job's time limit, scancel): an interrupted try, kept on record
        raise CheckpointError(f"ds_to_universal was killed by signal {-done.returncode} before it finished; the next "
                              f"job starts the conversion over (output so far: {folder / CONVERSION_LOG})")
    record.unlink()  # it ended by itself, either way: not an interrupted try
    (folder / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer names the temporary folder
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"ds_to_universal exited with status {done.returncode}; the end of "
                              f"{folder / CONVERSION_LOG}:\n{_log_tail(folder / CONVERSION_LOG)}")
    os.replace(tmp, target)
    return target


def _on_rank0_then_all(fn, what: str):
    """Run ``fn`` on rank 0 while the others wait; every rank raises if it failed there.
    The others wait on the wait group (gloo, ``distributed.wait_timeout_minutes``), as in
    ``barrier()``: on the default group the NCCL watchdog would abort the wait after
    ``timeout_minutes``, which a 70B conversion outlasts."""
    error = None
    if is_main():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - any failure must reach every rank, not hang them
            error = f"{type(exc).__name__}: {exc}"
    if torch.distributed.is_initialized():
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0, group=wait_group())
        error = box[0]
    if error:
        raise CheckpointError(f"{what} failed on rank 0 ({error})")


def load(engine, root: Path, expect: dict, world: int) -> tuple[dict, dict[str, torch.Tensor], bool] | None:
    """Resume from ``latest`` if there is one: (meta, tensors, resharded).

    On the world size the checkpoint was written on, every rank loads its own shards and
    its own tensors. On another one (``resharded``), the engine must have been built with
    ``checkpoint.load_universal`` (the trainer does so when ``peek_meta`` shows another
    world size); the tensors are rank 0's replicated ones (probe, its optimizer, counters),
    without the shard-shaped SAP direction and RNG states, which the trainer renews."""
    found = read_meta(root)
    if found is None:
        return None
    folder, meta = found
    check_identity(folder, meta, expect)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    resharded = meta.get("world_size", world) != world
    try:
        if resharded:
            _on_rank0_then_all(lambda: convert_to_universal(folder), f"{folder}: converting the checkpoint of "
                               f"{meta.get('world_size')} ranks for {world} ranks")
            tensors = {k: v for k, v in load_file(str(own_file(folder, 0))).items()
                       if not k.startswith(("rng.", "sap.direction."))}
            load_path, _ = engine.load_checkpoint(str(folder), tag=UNIVERSAL, load_module_strict=True)
        else:
            tensors = load_file(str(own_file(folder, rank)))
            load_path, _ = engine.load_checkpoint(str(root), tag=folder.name, load_module_strict=True)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, DeepSpeed and torch raise many types for a bad file
        raise CheckpointError(f"{folder}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None
    if load_path is None:
        raise CheckpointError(f"{folder}: DeepSpeed found no loadable checkpoint there")
    if not resharded:
        set_rng_state(tensors)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return meta, tensors, resharded
