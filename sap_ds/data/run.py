"""The run's data: prepared once (``pipeline.build``, cached by ``cache``), then read
memory-mapped by every rank.

``RunData.train`` is what the trainer batches: examples, or packs with ``data.packing``
(one pack is one unit of ``train.micro_batch_size``, ``global_batch_indices`` and
``train.epochs``). Either way ``len(train)`` is the number of units, ``train[i]`` a
``Tokenized`` (a ``Packed`` with packing) and ``train.lengths`` the real tokens per unit.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from sap_ds.data.cache import build_once, cache_root, fingerprint, tokenizer_identity
from sap_ds.data.packing import pack
from sap_ds.data.pipeline import build, fingerprint_parts
from sap_ds.data.tables import column
from sap_ds.data.tokenize import ChatTokenizer, EncodedPair, Tokenized
from sap_ds.errors import DataError

log = logging.getLogger("sap_ds")


def _load(folder: Path):
    import datasets

    return datasets.load_from_disk(str(folder)) if folder.is_dir() else None


def _lengths(table, name: str = "length") -> np.ndarray:
    if table is None:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(column(table, name), dtype=np.int64)


class TokenizedSet:
    """Tokenized examples in a memory-mapped Arrow table (read row by row, on demand)."""

    def __init__(self, table=None):
        self.table = table
        self.lengths = _lengths(table)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.table[int(i)]
        return Tokenized(row["input_ids"], row["labels"])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def origin(self, i: int) -> str:
        return self.table[int(i)]["origin"]

    def record(self, i: int) -> dict:
        """Row ``i`` whole: its tokens, origin (file:row) and what the length limit did to
        it (``pipeline.RECORD_COLUMNS``), for ``sap-ds data``."""
        return self.table[int(i)]


class PackedSet:
    """Packs of the examples of a ``TokenizedSet`` (``packing.first_fit_decreasing``)."""

    def __init__(self, examples: TokenizedSet, members: list[list[int]]):
        self.examples, self.members = examples, members
        self.lengths = np.asarray([int(examples.lengths[m].sum()) for m in members], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return pack([self.examples[j] for j in self.members[int(i)]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class PairSet:
    def __init__(self, table=None):
        self.table = table
        self.lengths = _lengths(table)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.table[int(i)]
        return EncodedPair(Tokenized(row["safe_input_ids"], row["safe_labels"]),
                           Tokenized(row["harmful_input_ids"], row["harmful_labels"]))

    def record(self, i: int) -> dict:
        """Pair ``i`` whole, with its origin and length-limit record (``TokenizedSet.record``)."""
        return self.table[int(i)]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass
class RunData:
    train: object  # TokenizedSet, or PackedSet with data.packing
    eval: TokenizedSet
    safety: PairSet
    n_harmful: int
    examples: TokenizedSet = None  # the training examples (== train without packing)
    counts: dict = field(default_factory=dict)  # per split: kept / truncated / dropped
    meta: dict = field(default_factory=dict, repr=False)
    cache_dir: Optional[Path] = None
    cache_hit: bool = False

    def __post_init__(self):
        if self.examples is None:
            self.examples = self.train

    @property
    def packed(self) -> bool:
        return isinstance(self.train, PackedSet)

    @property
    def n_safety_mix(self) -> int:
        """Refusal demonstrations among the training examples (``method: safety_mix``)."""
        return self.meta.get("n_safety_mix", 0)

    @property
    def safety_mix_rows(self) -> list[int]:
        """Their indices in ``examples``."""
        return self.meta.get("safety_mix_rows", [])

    def summary(self) -> dict:
        """The ``data`` entry of summary.json."""
        out = {"cache_dir": str(self.cache_dir) if self.cache_dir else None, "cache_hit": self.cache_hit,
               "train_examples": len(self.examples), "harmful_examples": self.n_harmful,
               "safety_mix_examples": self.n_safety_mix,
               "eval_examples": len(self.eval), "eval_available": self.meta.get("eval_available", 0),
               "safety_pairs": len(self.safety), "overlength": self.counts,
               "skipped_rows": self.meta.get("skipped_rows", {})}
        if self.packed:
            out["packs"] = len(self.train)
            out["pack_fill"] = float(self.train.lengths.sum() / max(1, len(self.train) * self.meta["max_length"]))
        return out


def load_run_data(folder: Path, hit: bool) -> RunData:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    examples = TokenizedSet(_load(folder / "train"))
    packs = _load(folder / "packs")
    train = PackedSet(examples, packs.to_dict()["members"]) if packs is not None else examples
    return RunData(train, TokenizedSet(_load(folder / "eval")), PairSet(_load(folder / "safety")), meta["n_harmful"],
                   examples, meta["counts"], meta, folder, hit)


def truncation_losses(counts: dict) -> str:
    """"; truncation cut M trained tokens (N learned assistant turns whole)", empty when
    nothing was truncated: a cut is counted in what it costs the loss, not only in examples."""
    if not counts.get("truncated"):
        return ""
    turns = counts["assistant_turns_lost"]
    return (f"; truncation cut {counts['trained_tokens_lost']} trained tokens ({turns} learned assistant "
            f"turn{'' if turns == 1 else 's'} whole)")


def log_data(data: RunData, cfg, spent: float) -> None:
    """What was prepared, on rank 0 at start: nothing is dropped or capped without a line here."""
    how = "loaded from cache" if data.cache_hit else f"prepared in {spent:.1f} s"
    log.info("data: %s %s", how, data.cache_dir)
    for split, limit in (("train", "data.max_length"), ("eval", "data.max_length"), ("safety", "data.safety_max_length"),
                         ("safety_mix", "data.max_length")):
        c = data.counts.get(split)
        if c:
            log.info("data: %s: %d kept whole, %d truncated, %d dropped (%s, data.overlength=%s)%s", split, c["kept"],
                     c["truncated"], c["dropped"], limit, cfg.overlength, truncation_losses(c))
    available = data.meta.get("eval_available", 0)
    if available > len(data.eval) + data.counts.get("eval", {}).get("dropped", 0):
        log.info("data: eval: the first %d of %d eval examples are used (data.eval_max_examples=%d)",
                 cfg.eval_max_examples, available, cfg.eval_max_examples)
    for path, n in data.meta.get("skipped_rows", {}).items():
        log.info("data: %s: %d rows skipped: chosen and rejected differ before their last turn, or their answers are "
                 "empty or equal (no shared prompt to contrast on)", path, n)
    if data.n_harmful:
        log.info("data: train: %d of %d examples are harmful (data.harmful_ratio=%s)", data.n_harmful,
                 len(data.examples), cfg.harmful_ratio)
    if data.n_safety_mix:
        log.info("data: train: %d of %d examples are refusal demonstrations added from data.safety (method safety_mix)",
                 data.n_safety_mix, len(data.examples))
    if data.packed:
        s = data.summary()
        log.info("data: train: %d examples in %d packs of <= %d tokens (%.1f %% full)", len(data.examples), s["packs"],
                 cfg.max_length, 100 * s["pack_fill"])


def build_run_data(cfg, tokenizer, seed: int, need_safety: bool, safety_mix: float = 0.0) -> RunData:
    """The run's data from the cache, prepared first if missing (one rank per node; the
    others wait, see ``cache``). Every rank returns the same RunData. ``safety_mix``:
    refusal demonstrations added per task example (``Method.safety_mix``; 0: none)."""
    from sap_ds.parallel.distributed import is_main

    if not cfg.train:
        raise DataError("data.train is empty: give at least one source, e.g. {path: data/gsm8k/train.jsonl, format: gsm8k}")
    ChatTokenizer(tokenizer, cfg.max_length)  # no chat template: fail here, on every rank
    parts = fingerprint_parts(cfg, tokenizer_identity(tokenizer), seed, need_safety, safety_mix)
    folder = cache_root(cfg.cache_dir) / fingerprint(parts)

    def write(tmp: Path) -> None:
        build(tmp, cfg, tokenizer, seed, need_safety, safety_mix)
        meta = json.loads((tmp / "meta.json").read_text(encoding="utf-8"))
        meta.update(max_length=cfg.max_length, fingerprint=parts)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")

    hit, spent = build_once(folder, write)
    data = load_run_data(folder, hit)
    if is_main():
        log_data(data, cfg, spent)
    return data
