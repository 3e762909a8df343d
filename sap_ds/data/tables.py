"""One source -> a formatted, windowed Arrow table of conversations or safety pairs.

``offset``/``limit`` select usable rows. Every row of a task format is usable (or an
error), so the window is taken on the raw rows first and only those rows are formatted;
the skipping formats (hh-rlhf, preference) are formatted whole, their skipped rows counted,
and the window taken on what is left. Formatting runs in one process (``datasets.map``,
batched): it is cheap, and the first bad row is the one reported.
"""
from __future__ import annotations

from pathlib import Path

from sap_ds.data.formats import (
    SAFETY_FORMATS,
    SKIPPING_FORMATS,
    Conversation,
    Example,
    Rows,
    SafetyPair,
    safety_pair,
    task_conversation,
)
from sap_ds.data.sources import read_table
from sap_ds.errors import DataError

BATCH = 1000


def column(table, name: str) -> list:
    """One column as a list (iterating ``table[name]`` goes row by row: 100x slower)."""
    return table.select_columns([name]).to_dict()[name]


def _row_dicts(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def _messages(turns) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def turns_of(messages: list[dict]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in messages)


def _window(n: int, source) -> range:
    end = n if source.limit is None else min(n, source.offset + source.limit)
    return range(min(source.offset, n), end)


def _read(source):
    return read_table(source.path, source.split, source.subset, source.revision)


def task_table(source, fingerprint: str = "task"):
    """Columns ``messages`` (list of {role, content}), ``learn_from``, ``origin``."""
    path = Path(source.path)
    if source.format in SAFETY_FORMATS:
        raise DataError(f"{path}: format '{source.format}' holds safety pairs; use it under data.safety, not as task data")
    raw = _read(source)
    window = _window(len(raw), source)
    if not window:
        raise DataError(f"{path}: offset={source.offset} skips all {len(raw)} rows of the file; lower the offset")
    if window != range(len(raw)):
        raw = raw.select(window)
    rows = Rows(source.path, raw.column_names)

    def convert(batch, indices):
        out = {"messages": [], "learn_from": [], "origin": []}
        for i, row in zip(indices, _row_dicts(batch)):
            conv = task_conversation(row, source, rows, window.start + i + 1)
            out["messages"].append(_messages(conv.turns))
            out["learn_from"].append(conv.learn_from)
            out["origin"].append(conv.origin)
        return out

    return raw.map(convert, batched=True, batch_size=BATCH, with_indices=True, remove_columns=raw.column_names,
                   new_fingerprint=f"{fingerprint}-format")


def pair_table(source, fingerprint: str = "pairs"):
    """(table, skipped rows): columns ``messages``, ``safe``, ``harmful``, ``origin``."""
    path = Path(source.path)
    if source.format not in SAFETY_FORMATS:
        raise DataError(f"{path}: data.safety needs a safety format ({', '.join(map(repr, SAFETY_FORMATS))}; "
                        f"e.g. 'safety_pairs' or 'hh_rlhf'), got '{source.format}'")
    raw = _read(source)
    skipping = source.format in SKIPPING_FORMATS
    window = _window(len(raw), source)
    if not window:
        raise DataError(f"{path}: no usable safety pairs (offset={source.offset} skips all {len(raw)} rows)")
    if not skipping and window != range(len(raw)):
        raw = raw.select(window)
    start = 0 if skipping else window.start
    rows = Rows(source.path, raw.column_names)

    def convert(batch, indices):
        out = {"messages": [], "safe": [], "harmful": [], "origin": [], "usable": []}
        for i, row in zip(indices, _row_dicts(batch)):
            pair = safety_pair(row, source, rows, start + i + 1)
            out["usable"].append(pair is not None)
            out["messages"].append(_messages(pair.messages) if pair else [])
            out["safe"].append(pair.safe if pair else "")
            out["harmful"].append(pair.harmful if pair else "")
            out["origin"].append(pair.origin if pair else f"{path}:{start + i + 1}")
        return out

    table = raw.map(convert, batched=True, batch_size=BATCH, with_indices=True, remove_columns=raw.column_names,
                    new_fingerprint=f"{fingerprint}-format")
    skipped = 0
    if skipping:
        usable = column(table, "usable")
        keep = [i for i, ok in enumerate(usable) if ok]
        skipped = len(usable) - len(keep)
        window = _window(len(keep), source)
        table = table.select([keep[i] for i in window])
    table = table.remove_columns("usable")
    if len(table) == 0:
        raise DataError(f"{path}: no usable safety pairs")
    return table, skipped


def load_examples(source) -> list[Example]:
    """A task source's examples as a list (the evaluation's small task files): the turns
    before the last assistant turn and that turn's text."""
    rows = task_table(source).to_dict()
    return [Conversation(turns_of(m), 0, o).as_example() for m, o in zip(rows["messages"], rows["origin"])]


def load_safety_pairs(source) -> list[SafetyPair]:
    rows = pair_table(source)[0].to_dict()
    return [SafetyPair(turns_of(m), s, h, o) for m, s, h, o in
            zip(rows["messages"], rows["safe"], rows["harmful"], rows["origin"])]
