"""Preparing a run's data once: sources -> formatted tables -> held-out split, harmful mix
-> tokens (``datasets.map``, batched, ``data.num_proc`` processes) -> packs -> a folder of
Arrow tables (``cache.build_once`` makes it atomic and runs it on one rank per node).

The selection and its order are those sap-ds always had: the sources of ``data.train``
in order, the held-out split of ``data.eval_fraction`` (``Random(seed + 1)``), the eval
cap ``data.eval_max_examples``, the harmful mix (``Random(seed)``, ``mixing``), then the
length limit, which may drop examples (counted) but never reorders them. With
``method: safety_mix`` the refusal demonstrations are added last, after the length limit
and before packing (``add_safety_demonstrations``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sap_ds.data.formats import Conversation, SafetyPair
from sap_ds.data.mixing import eval_split, mix_indices, safety_mix_indices, safety_mix_order
from sap_ds.data.packing import first_fit_decreasing
from sap_ds.data.sources import source_identity
from sap_ds.data.tables import BATCH, column, pair_table, task_table, turns_of
from sap_ds.data.tokenize import IGNORE_INDEX, ChatTokenizer, Status
from sap_ds.errors import DataError

AUTO_PROC_MIN_ROWS = 20_000  # below this, worker start-up costs more than it saves


def num_proc(configured, rows: int):
    """``datasets.map``'s num_proc: None (this process) for one; else worker processes."""
    if configured is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        configured = 1 if rows < AUTO_PROC_MIN_ROWS else max(1, min(cores, 16, rows // 5_000))
    return configured if configured > 1 else None


def fingerprint_parts(cfg, tokenizer_id: dict, seed: int, need_safety: bool, safety_mix: float = 0.0) -> dict:
    """Everything that decides the prepared data (``cache`` docstring). ``num_proc``,
    ``cache_dir`` and ``shuffle`` (the batch order, not the data) are left out. The
    safety-mix ratio is a part only when it is set, so a run without it keeps its cache."""
    sources = lambda items: [source_identity(s.path, s.split, s.subset, s.revision) for s in items]  # noqa: E731
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("num_proc", "cache_dir", "shuffle")}
    parts = {
        "settings": settings,
        "files": {"train": sources(cfg.train), "eval": sources(cfg.eval), "harmful": sources([cfg.harmful] if cfg.harmful else []),
                  "safety": sources(cfg.safety) if need_safety or safety_mix > 0 else []},
        "need_safety": need_safety,
        "tokenizer": tokenizer_id,
        "seed": seed,
    }
    if safety_mix > 0:
        parts["safety_mix"] = safety_mix
    return parts


def _concat(tables):
    import datasets

    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    return tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)


# Per tokenized row, besides the tokens: where it came from and what the length limit did.
RECORD_COLUMNS = ("origin", "status", "full_length", "trained_tokens", "trained_tokens_lost", "assistant_turns_lost")


def _counts(statuses, turns_lost, tokens_lost) -> dict:
    """Kept whole / truncated / dropped, and what the truncated examples lost: learned
    assistant turns with no token left and learned tokens cut off (dropped examples are
    counted as dropped, not here)."""
    counts = {name: sum(1 for s in statuses if s == code) for code, name in enumerate(Status.NAMES)}
    cut = [i for i, s in enumerate(statuses) if s == Status.TRUNCATED]
    counts["assistant_turns_lost"] = sum(turns_lost[i] for i in cut)
    counts["trained_tokens_lost"] = sum(tokens_lost[i] for i in cut)
    return counts


def _trained(labels) -> int:
    return sum(1 for label in labels if label != IGNORE_INDEX)


def tokenize_tasks(table, chat: ChatTokenizer, procs, what: str, name: str = ""):
    """(tokenized table without the dropped rows, counts): columns ``input_ids``,
    ``labels``, ``length`` and ``RECORD_COLUMNS`` (``origin``: file:row; what the length
    limit did, read by ``sap-ds data``). ``what`` names the rows in errors; ``name``
    (default: ``what``) the map's fingerprint."""

    def encode(batch):
        convs = [Conversation(turns_of(m), lf, o) for m, lf, o in zip(batch["messages"], batch["learn_from"], batch["origin"])]
        out = {k: [] for k in ("input_ids", "labels", "length", *RECORD_COLUMNS)}
        out["origin"] = batch["origin"]
        for enc in chat.encode_many(convs):
            tokens = enc.tokens
            out["input_ids"].append(tokens.input_ids if tokens else [])
            out["labels"].append(tokens.labels if tokens else [])
            out["length"].append(len(tokens.input_ids) if tokens else 0)
            out["status"].append(enc.status)
            out["full_length"].append(enc.full_length)
            out["trained_tokens"].append(_trained(tokens.labels) if tokens else 0)
            out["trained_tokens_lost"].append(enc.trained_tokens_lost)
            out["assistant_turns_lost"].append(enc.assistant_turns_lost)
        return out

    encoded = table.map(encode, batched=True, batch_size=BATCH, num_proc=num_proc(procs, len(table)),
                        remove_columns=table.column_names, new_fingerprint=f"{name or what}-tokens")
    return _finish(encoded, chat, what)


def tokenize_pairs(table, chat: ChatTokenizer, procs):
    """Both answers of each pair; a pair is dropped if either answer is, truncated if
    either is. Columns ``safe_*``/``harmful_*`` (``input_ids``, ``labels``), ``origin``."""

    def encode(batch):
        pairs = [SafetyPair(turns_of(m), s, h, o) for m, s, h, o in
                 zip(batch["messages"], batch["safe"], batch["harmful"], batch["origin"])]
        convs = []
        for p in pairs:
            turns = p.messages
            convs += [Conversation(turns + (("assistant", p.safe),), len(turns), p.origin),
                      Conversation(turns + (("assistant", p.harmful),), len(turns), p.origin)]
        done = chat.encode_many(convs)
        out = {k: [] for k in ("safe_input_ids", "safe_labels", "harmful_input_ids", "harmful_labels", "length",
                               *RECORD_COLUMNS)}
        out["origin"] = batch["origin"]
        for safe, harm in zip(done[0::2], done[1::2]):
            worst = max(safe.status, harm.status)
            usable = worst in (Status.KEPT, Status.TRUNCATED)
            out["safe_input_ids"].append(safe.tokens.input_ids if usable else [])
            out["safe_labels"].append(safe.tokens.labels if usable else [])
            out["harmful_input_ids"].append(harm.tokens.input_ids if usable else [])
            out["harmful_labels"].append(harm.tokens.labels if usable else [])
            out["length"].append(len(safe.tokens.input_ids) + len(harm.tokens.input_ids) if usable else 0)
            out["status"].append(worst)
            out["full_length"].append(max(safe.full_length, harm.full_length))
            out["trained_tokens"].append(_trained(safe.tokens.labels) + _trained(harm.tokens.labels) if usable else 0)
            out["trained_tokens_lost"].append(safe.trained_tokens_lost + harm.trained_tokens_lost)
            out["assistant_turns_lost"].append(safe.assistant_turns_lost + harm.assistant_turns_lost)
        return out

    encoded = table.map(encode, batched=True, batch_size=BATCH, num_proc=num_proc(procs, len(table)),
                        remove_columns=table.column_names, new_fingerprint="safety-tokens")
    return _finish(encoded, chat, "data.safety")


def _finish(encoded, chat: ChatTokenizer, what: str):
    statuses = column(encoded, "status")
    too_long = [i for i, s in enumerate(statuses) if s == Status.OVERLENGTH]
    if too_long:
        origins, lengths = column(encoded, "origin"), column(encoded, "full_length")
        raise chat.overlength_error(what, [origins[i] for i in too_long], [lengths[i] for i in too_long], len(statuses))
    counts = _counts(statuses, column(encoded, "assistant_turns_lost"), column(encoded, "trained_tokens_lost"))
    keep = [i for i, s in enumerate(statuses) if s != Status.DROPPED]
    if len(keep) < len(statuses):
        encoded = encoded.select(keep)
    return encoded, counts


def demonstration_table(pairs, indices: list[int]):
    """The pairs at ``indices`` as task conversations: the harmful prompt's turns, then the
    safe response as the one learned assistant turn (``learn_from`` past the prompt, so an
    assistant turn inside a multi-turn prompt is context, as in the pair)."""
    picked = pairs.select(indices)

    def convert(batch):
        return {"messages": [m + [{"role": "assistant", "content": safe}] for m, safe in zip(batch["messages"], batch["safe"])],
                "learn_from": [len(m) for m in batch["messages"]], "origin": batch["origin"]}

    return picked.map(convert, batched=True, batch_size=BATCH, remove_columns=picked.column_names,
                      new_fingerprint="safety-mix-format")


def add_safety_demonstrations(train, pairs, chat: ChatTokenizer, cfg, ratio: float, seed: int, meta: dict):
    """``train`` (tokenized task examples) with round(ratio x len(train)) refusal
    demonstrations of data.safety's pairs added (``mixing.safety_mix_indices``), tokenized
    like the task examples (``chat``: data.max_length, the system prompt) and shuffled in
    among them (``mixing.safety_mix_order``). The count is of the task examples the length
    limit kept, so the ratio is the share of what the model trains on, not of rows it never
    sees. Records in ``meta``: how many were added (``n_safety_mix``) and their rows in the
    table (``safety_mix_rows``); returns the table and the demonstrations' length counts."""
    chosen = safety_mix_indices(len(train), len(pairs), ratio, seed)
    what = "safety_mix demonstrations (data.safety prompts with their safe responses)"
    demos, counts = tokenize_tasks(demonstration_table(pairs, chosen), chat, cfg.num_proc, what, "safety-mix")
    if chosen and len(demos) == 0:
        raise DataError(
            f"{what}: every prompt is longer than data.max_length={cfg.max_length} tokens, so no response token is "
            f"left to learn; raise data.max_length (first: {pairs[chosen[0]]['origin']})"
        )
    order = safety_mix_order(len(train), len(demos), seed)
    meta.update(n_safety_mix=len(demos), safety_mix_rows=sorted(i for i, j in enumerate(order) if j >= len(train)))
    return _concat([train, demos]).select(order), counts


def build(folder: Path, cfg, tokenizer, seed: int, need_safety: bool, safety_mix: float = 0.0) -> None:
    """Write the run's data into ``folder``: ``train``, ``eval``, ``safety`` and ``packs``
    tables (those that are not empty) and ``meta.json`` (counts, what was selected).
    ``safety_mix`` > 0 adds that many refusal demonstrations per task example to ``train``
    (``add_safety_demonstrations``); ``need_safety`` writes the ``safety`` pair table."""
    if not cfg.train:
        raise DataError("data.train is empty: give at least one source, e.g. {path: data/gsm8k/train.jsonl, format: gsm8k}")
    meta: dict = {"skipped_rows": {}}
    train = _concat([task_table(s, f"train{i}") for i, s in enumerate(cfg.train)])
    evals = _concat([task_table(s, f"eval{i}") for i, s in enumerate(cfg.eval)])
    if evals is None and cfg.eval_fraction > 0:
        held_out, kept = eval_split(len(train), cfg.eval_fraction, seed)
        evals, train = train.select(held_out), train.select(kept)
    meta["eval_available"] = len(evals) if evals is not None else 0
    if evals is not None and len(evals) > cfg.eval_max_examples:
        evals = evals.select(range(cfg.eval_max_examples))
    meta["n_harmful"] = 0
    if cfg.harmful_ratio > 0:
        harmful = task_table(cfg.harmful, "harmful")
        mix = mix_indices(len(train), len(harmful), cfg.harmful_ratio, seed, f"data ({cfg.harmful.path})")
        order = [i if kind == 0 else len(train) + i for kind, i in mix]
        train = _concat([train, harmful]).select(order)
        meta["n_harmful"] = round(cfg.harmful_ratio * len(train))
    chat = ChatTokenizer(tokenizer, cfg.max_length, cfg.system_prompt, cfg.overlength, cfg.loss_on, "data.max_length")
    tables, counts = {}, {}
    tables["train"], counts["train"] = tokenize_tasks(train, chat, cfg.num_proc, "data.train")
    if len(tables["train"]) == 0:
        raise DataError(
            f"data.train: every example's prompt is longer than max_length={cfg.max_length} tokens, so no response "
            f"token is left to learn (data.overlength={cfg.overlength}); raise data.max_length (first: {train[0]['origin']})"
        )
    if evals is not None:
        tables["eval"], counts["eval"] = tokenize_tasks(evals, chat, cfg.num_proc, "data.eval")
        if len(tables["eval"]) == 0:
            raise DataError(
                f"data.eval: every example's prompt is longer than max_length={cfg.max_length} tokens, so no response "
                f"token is left to score; raise data.max_length (first: {evals[0]['origin']})"
            )
    meta["n_safety_mix"] = 0
    if (need_safety or safety_mix > 0) and cfg.safety:
        pairs = []
        for i, source in enumerate(cfg.safety):
            table, skipped = pair_table(source, f"safety{i}")
            pairs.append(table)
            if skipped:
                meta["skipped_rows"][source.path] = skipped
        pairs = _concat(pairs)
    if need_safety and cfg.safety:
        safety_chat = ChatTokenizer(tokenizer, cfg.safety_max_length, cfg.system_prompt, cfg.overlength, cfg.loss_on,
                                    "data.safety_max_length")
        tables["safety"], counts["safety"] = tokenize_pairs(pairs, safety_chat, cfg.num_proc)
        if len(tables["safety"]) == 0:
            raise DataError(
                f"data.safety: every pair is longer than data.safety_max_length={cfg.safety_max_length} tokens before "
                f"its response starts; raise data.safety_max_length (first: {pairs[0]['origin']})"
            )
    if safety_mix > 0:
        if not cfg.safety:
            raise DataError("safety_mix adds refusal demonstrations from data.safety, which is empty: give it a source, "
                            "e.g. {path: data/advbench/harmful_behaviors.csv, format: safety_pairs}")
        tables["train"], counts["safety_mix"] = add_safety_demonstrations(tables["train"], pairs, chat, cfg, safety_mix,
                                                                          seed, meta)
    if cfg.packing:
        import datasets

        lengths = column(tables["train"], "length")
        packs = first_fit_decreasing(lengths, cfg.max_length, seed)
        tables["packs"] = datasets.Dataset.from_dict({"members": packs})
    for name, table in tables.items():
        table.save_to_disk(str(folder / name))
    meta["counts"] = counts
    (folder / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
