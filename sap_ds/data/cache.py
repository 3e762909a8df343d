"""The tokenized-data cache: a fingerprint of everything that decides the tokens, one
writer per node, atomic folders.

The fingerprint covers each source (``sources.source_identity``: path, size and mtime of
files; name, split and revision of hub sets), every data setting (formats, columns,
limits, max lengths, overlength, loss_on, system prompt, mixing, packing, the split), the
tokenizer (its vocabulary and merges, special tokens, chat template), the seed and
``VERSION`` (raised when the pipeline's output changes). A run whose fingerprint has a
folder loads it memory-mapped and tokenizes nothing.

Who writes: the first rank of each node (``LOCAL_RANK`` 0) builds a missing folder while
the other ranks wait (up to ``WAIT_TIMEOUT``) in a collective that also carries the
builder's error, if any, to every rank (so a bad file fails all ranks with the same message instead of leaving them
waiting). A folder is written under a temporary name and renamed into place: it exists
complete or not at all, and two writers (nodes on a shared file system) race harmlessly.
Without a process group (the reference, evaluation, tests) the wait is a no-op.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

from sap_ds import files
from sap_ds.errors import DataError
from sap_ds.files import atomic_folder

# 2: truncation at turn boundaries (tokenize._fit) and each row's record of what the
# length limit did (pipeline.RECORD_COLUMNS): a cache written by version 1 is not read.
VERSION = 2
# The ranks that wait for the builder do so in a gloo group of their own with this timeout
# (the default group's is 10 minutes under DeepSpeed: too short for a large set).
WAIT_TIMEOUT = timedelta(hours=6)


def cache_root(configured: Optional[str]) -> Path:
    if configured:
        return Path(configured)
    return files.cache_root() / "data"


def tokenizer_identity(tokenizer) -> dict:
    """What makes a tokenizer produce the ids it does: vocabulary and merges (the fast
    tokenizer's serialized state, hashed), added and special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = backend.to_str()
    else:
        state = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "size": len(tokenizer),
        "state_sha256": hashlib.sha256(state.encode("utf-8")).hexdigest(),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template,
    }


def fingerprint(parts: dict) -> str:
    text = json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_node_leader() -> bool:
    return _dist() is None or int(os.environ.get("LOCAL_RANK", "0")) == 0


def _share_outcome(error: Optional[tuple[str, str]]) -> Optional[tuple[str, str]]:
    """Every rank learns the first builder's error (None: all fine). The non-builders
    block here until the builders are done."""
    dist = _dist()
    if dist is None:
        return error
    group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error, group=group)
    dist.destroy_process_group(group)
    return next((e for e in gathered if e is not None), None)


def build_once(final: Path, build: Callable[[Path], None]) -> tuple[bool, float]:
    """(cache hit, seconds spent building on this rank): ``build(folder)`` writes the data
    into a fresh folder, which becomes ``final`` atomically, on the first rank per node
    only, and only if ``final`` is missing."""
    hit = final.is_dir()
    error, spent = None, 0.0
    if not hit and is_node_leader():
        start = time.perf_counter()
        try:
            with atomic_folder(final, if_exists="keep") as folder:  # kept: another writer's finished folder
                build(folder)
        except DataError as exc:
            error = ("DataError", str(exc))
        except Exception as exc:  # a bug or an I/O error: still release the waiting ranks
            error = (type(exc).__name__, str(exc))
            if _dist() is None:
                raise
            _share_outcome(error)
            raise
        spent = time.perf_counter() - start
    shared = _share_outcome(error)
    if shared is not None:
        kind, message = shared
        if kind == "DataError":
            raise DataError(message)
        raise RuntimeError(f"preparing the data failed on another rank: {kind}: {message}")
    if not final.is_dir():
        raise DataError(f"{final}: the prepared data is missing after its builder finished; is data.cache_dir "
                        "on a file system every rank of a node can read?")
    return hit, spent
