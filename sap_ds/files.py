"""Files and folders written so that a reader never sees half of one.

Each is written beside its final name and renamed into place (a rename within one
filesystem is atomic), so an interrupted write leaves the previous version, or nothing.
Checkpoints, run outputs, reports, plots and caches all write this way; it lives at the
bottom of the house because every layer writes files.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

CACHE_ENV = "SAP_DS_CACHE"


def cache_root() -> Path:
    """sap-ds's cache folder ($SAP_DS_CACHE, default ~/.cache/sap-ds): the converted embedded
    model, the tiny test model and the tokenized data, each written atomically."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "sap-ds"))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8), on disk before it takes the name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_save_figure(fig, path: Path, dpi: int) -> None:
    """Save a matplotlib figure to ``path`` (PNG) atomically and close it: a reader never
    sees half a file, and an interrupted save leaves the previous plot in place."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


@contextmanager
def atomic_folder(target: Path, if_exists: Literal["keep", "replace", "error"] = "error") -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` to write into; when the block ends without
    an error it becomes ``target`` in one rename, else it is removed.

    If ``target`` is there by then: ``keep`` leaves it (another process finished the same
    folder first: ranks building one cache), ``replace`` removes it first (a run's export,
    written again), ``error`` raises the rename's OSError (a folder a user must not lose)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if if_exists == "replace" and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if if_exists != "keep" or not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
