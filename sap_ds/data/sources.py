"""Where rows come from: a data source -> a ``datasets.Dataset`` (Arrow), resolved through
``datasets`` only.

A source is a local file (JSON, JSONL, CSV, TSV, TXT, Parquet, optionally gzipped), a
folder written by ``datasets.save_to_disk``, or a hub name (``hf://org/name``, or a bare
``org/name`` with ``split`` that is not a local path). Text files are checked first for
what ``datasets`` reports poorly (bad UTF-8, a bad JSON line), so the error names the file
and the line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from sap_ds.errors import DataError  # defined there (a user error is reported without importing torch)

HUB_PREFIX = "hf://"
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")


def check_text_file(path: Path) -> None:
    """Fail early, with a line number, on what ``datasets`` reports poorly."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found (a path in a config file is relative to that file's "
                        "folder; one on the command line, to the working directory)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; expected rows of data")
    if path.suffix in (".gz", ".parquet"):
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg}, column {exc.colno}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
    elif path.suffix == ".json":
        try:
            tree = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(tree, list) or not all(isinstance(r, dict) for r in tree):
            raise DataError(f"{path}: expected a JSON list of objects (or use .jsonl, one object per line)")


def is_hub_name(path: str, split: Optional[str]) -> bool:
    """``hf://org/name``, or a bare name with a split that is no local path."""
    return path.startswith(HUB_PREFIX) or (split is not None and not Path(path).exists())


def _file_kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def _load_file(path: Path):
    import datasets

    check_text_file(path)
    kind = _file_kind(path)
    kwargs: dict = {}
    if kind in (".json", ".jsonl"):
        builder = "json"
    elif kind == ".csv":
        builder = "csv"
    elif kind == ".tsv":
        builder, kwargs = "csv", {"delimiter": "\t", "quoting": 3}  # QUOTE_NONE: SST-2 has bare quotes
    elif kind == ".txt":
        builder = "text"
    elif kind == ".parquet":
        builder = "parquet"
    else:
        raise DataError(f"{path}: unsupported file type '{kind}'; use .json, .jsonl, .csv, .tsv, .txt (optionally .gz), "
                        ".parquet, or a folder written by datasets.save_to_disk")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    except Exception as exc:  # datasets wraps parser errors in many types
        raise DataError(f"{path}: could not be read as {kind[1:].upper()}: {exc}") from None


def _load_saved(path: Path, split: Optional[str]):
    """A folder written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    import datasets

    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"{path}: a folder must be one written by datasets' save_to_disk (state.json or "
                        "dataset_dict.json inside); for data files give the file itself")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: could not be read by datasets.load_from_disk: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise DataError(f"{path}: a saved DatasetDict with splits {', '.join(map(repr, loaded))}: "
                            f"set split in the data source{'' if split is None else f' (got {split!r})'}")
        loaded = loaded[split]
    elif split is not None:
        raise DataError(f"{path}: a saved Dataset has no splits; remove split={split!r} from the data source")
    return loaded


def _load_hub(path: str, split: Optional[str], subset: Optional[str], revision: Optional[str]):
    import datasets

    name = path[len(HUB_PREFIX):] if path.startswith(HUB_PREFIX) else path
    split = split or "train"
    try:
        return datasets.load_dataset(name, subset, split=split, revision=revision)
    except Exception as exc:  # offline, unknown name, unknown split: all end the same way for the user
        hint = "offline mode (HF_HUB_OFFLINE) is on" if datasets.config.HF_HUB_OFFLINE else \
            "no network, or an unknown name, subset or split"
        raise DataError(
            f"{path}: could not load '{name}' (split {split!r}{f', subset {subset!r}' if subset else ''}) "
            f"from the Hugging Face hub ({hint}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Where there is no network, load it once where there is one, save it with "
            "datasets' save_to_disk (or to_parquet) and give that folder or file as path"
        ) from None


def read_table(path: str, split: Optional[str] = None, subset: Optional[str] = None, revision: Optional[str] = None):
    """A source's rows as a ``datasets.Dataset`` (never a Python list of the whole set)."""
    import datasets

    datasets.disable_progress_bars()
    if is_hub_name(path, split):
        table = _load_hub(path, split, subset, revision)
    elif Path(path).is_dir():
        table = _load_saved(Path(path), split)
    else:
        if split is not None:
            raise DataError(f"{path}: split={split!r} is for hub names and saved DatasetDict folders, not a data file")
        table = _load_file(Path(path))
    if len(table) == 0:
        raise DataError(f"{path}: the file has no rows")
    return table


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a small local source as dicts (prompt files of the evaluation)."""
    return read_table(str(path)).to_list()


def source_identity(path: str, split: Optional[str] = None, subset: Optional[str] = None,
                    revision: Optional[str] = None) -> dict:
    """What the cache fingerprint knows of a source: (path, size, mtime) of a file or of
    every file of a saved folder; for a hub name its name, subset, split and revision (pin
    the revision: an unpinned hub set that changes upstream keeps its old cache)."""
    if is_hub_name(path, split):
        return {"hub": path, "split": split, "subset": subset, "revision": revision}
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"folder": str(p.resolve()), "split": split,
                "files": [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    if not p.is_file():
        return {"missing": str(p)}  # reading it fails with the message; nothing is cached
    stat = p.stat()
    return {"file": str(p.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
