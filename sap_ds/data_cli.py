"""``sap-ds data --config C [key=value ...] [--show N]``: the run's data as training sees it.

Builds the run's data exactly as ``sap-ds train`` does (the same config and overrides, the
model's tokenizer, the method's need for safety pairs or refusal demonstrations, the same
pipeline and so the same cache folder: the training run after it tokenizes nothing), in
one process with no DeepSpeed engine and no GPU. Prints what was prepared (per split: kept
whole / truncated / dropped, what truncation cut, harmful examples mixed in, token counts,
packs) and N decoded examples with the trained tokens marked: between ``⟦`` and ``⟧``, or
coloured instead of bracketed when the output is a terminal. Each example names its origin
(``file:row``: the source file and the row, 1-based, in file order), its length, what
truncation cut from it, and with ``data.packing`` the pack it is in and the examples that
share it. The equivalent of axolotl's preprocess debug view. Exit codes: 0 shown, 2 bad
configuration, data or arguments.
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
from pathlib import Path

from sap_ds.entry import run_command

SPLITS = ("train", "eval", "safety")
OPEN, CLOSE = "⟦", "⟧"  # around trained tokens in plain output
GREEN, RESET = "\033[1;32m", "\033[0m"  # trained tokens on a terminal


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="sap-ds data",
        description="The run's data as sap-ds train builds it (same pipeline and cache; one process, no GPU): counts per "
                    "split, and examples with the trained tokens marked, their file:row and what truncation or packing "
                    "did to them.")
    parser.add_argument("--config", required=True,
                        help="run config (YAML or JSON), or a shipped config's name (tiny, demo)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted key=value overrides, as for sap-ds train (e.g. data.max_length=256)")
    parser.add_argument("--show", type=int, default=3, metavar="N",
                        help="examples to print (default 3; 0: the summary only)")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="train (what is trained on, default), eval (the eval loss's examples) or safety (SAP's and "
                             "Lisa's pairs)")
    parser.add_argument("--start", type=int, default=0, metavar="K", help="first example to print (0-based, default 0)")
    parser.add_argument("--random", action="store_true", help="print N examples drawn at random (seeded by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the trained tokens instead of bracketing them: auto (default) when the output is a "
                             "terminal and NO_COLOR is unset")
    args = parser.parse_args(argv)
    for name in ("show", "start"):
        if getattr(args, name) < 0:
            parser.error(f"--{name}: {getattr(args, name)} is negative; give 0 or more")
    return args


class Marks:
    """How trained text is shown: coloured, or between ``OPEN`` and ``CLOSE``."""

    def __init__(self, colour: bool):
        self.colour = colour

    def learned(self, text: str) -> str:
        return f"{GREEN}{text}{RESET}" if self.colour else f"{OPEN}{text}{CLOSE}"

    def legend(self) -> str:
        return f"trained tokens are {self.learned('marked like this')}; the rest is context (no loss)"


def use_colour(choice: str, stream) -> bool:
    if choice != "auto":
        return choice == "always"
    return stream.isatty() and not os.environ.get("NO_COLOR")


def prepare(cfg):
    """(RunData, tokenizer): the data of ``cfg`` as ``Trainer.__init__`` builds it (same
    tokenizer, same method flags, hence the same cache fingerprint)."""
    from sap_ds.data import build_run_data
    from sap_ds.methods import build_method
    from sap_ds.model.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model.trust_remote_code)
    method = build_method(cfg)
    data = build_run_data(cfg.data, tokenizer, cfg.seed, need_safety=method.needs_safety, safety_mix=method.safety_mix)
    return data, tokenizer


def render(tokenizer, ids, labels, marks: Marks) -> str:
    """The decoded tokens, each run of trained tokens (label != IGNORE_INDEX) marked.
    Runs are decoded apart: they are the template's own pieces, tokenized apart."""
    from sap_ds.data import IGNORE_INDEX

    out = []
    for learned, run in itertools.groupby(zip(ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(marks.learned(text) if learned else text)
    return "".join(out)


def _split_set(data, split: str):
    return {"train": data.examples, "eval": data.eval, "safety": data.safety}[split]


def _limit_key(split: str) -> str:
    return "data.safety_max_length" if split == "safety" else "data.max_length"


def summary_lines(data, cfg, config_name: str) -> list[str]:
    from sap_ds.data.run import truncation_losses
    from sap_ds.data.tables import column

    d = cfg.data
    lines = [f"sap-ds data: {config_name}, method {cfg.method}, model {cfg.model.path}, seed {cfg.seed}",
             f"cache: {data.cache_dir} ({'loaded from cache' if data.cache_hit else 'prepared now'})"]
    names = {"train": "train", "eval": "eval", "safety": "safety pairs", "safety_mix": "safety_mix demonstrations"}
    for split in ("train", "eval", "safety", "safety_mix"):
        c = data.counts.get(split)
        if not c:
            continue
        rows = c["kept"] + c["truncated"] + c["dropped"]
        limit = getattr(d, "safety_max_length" if split == "safety" else "max_length")
        lines.append(f"{names[split]}: {c['kept'] + c['truncated']} of {rows} kept: {c['kept']} whole, {c['truncated']} "
                     f"truncated, {c['dropped']} dropped ({_limit_key(split)}={limit}, data.overlength={d.overlength})"
                     f"{truncation_losses(c)}")
        if split == "safety_mix":
            continue
        table = _split_set(data, split)
        if len(table):
            lengths = table.lengths
            trained = sum(column(table.table, "trained_tokens"))
            unit = "pair (both answers)" if split == "safety" else "example"
            lines.append(f"  tokens per {unit}: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}; "
                         f"{lengths.sum()} in all, {trained} trained ({100 * trained / max(1, lengths.sum()):.1f} %)")
        if split == "train":
            lines.append(f"  harmful examples mixed in: {data.n_harmful} (data.harmful_ratio={d.harmful_ratio}); refusal "
                         f"demonstrations (method safety_mix): {data.n_safety_mix}")
            if data.packed:
                s = data.summary()
                lines.append(f"  packed (data.packing): {len(data.examples)} examples in {s['packs']} packs of <= "
                             f"{d.max_length} tokens, {100 * s['pack_fill']:.1f} % full")
        if split == "eval" and data.meta.get("eval_available", 0) > rows:
            lines.append(f"  the first {rows} of {data.meta['eval_available']} eval examples "
                         f"(data.eval_max_examples={d.eval_max_examples})")
    for path, n in data.meta.get("skipped_rows", {}).items():
        lines.append(f"{path}: {n} rows skipped (chosen and rejected differ before their last turn, or their answers are "
                     "empty or equal)")
    return lines


def pick(n: int, args) -> list[int]:
    """The indices to show: ``--show`` from ``--start``, or drawn with ``--random``."""
    from sap_ds.errors import ConfigError

    if args.random:
        return sorted(random.Random(args.seed).sample(range(n), min(args.show, n)))
    if args.show and args.start >= n:
        raise ConfigError(f"--start {args.start}: the {args.split} split has {n} examples; give 0 to {n - 1}")
    return list(range(args.start, min(n, args.start + args.show)))


def _note(record: dict, split: str, limit: int) -> str:
    """What the length limit did to one example (for a pair: to its longer answer)."""
    from sap_ds.data import Status

    tokens = "" if split == "safety" else f"{len(record['input_ids'])} tokens, "
    if record["status"] != Status.TRUNCATED:
        return f"{tokens}{record['trained_tokens']} trained; kept whole"
    turns = record["assistant_turns_lost"]
    what = "the longer answer had" if split == "safety" else "it had"
    return (f"{tokens}{record['trained_tokens']} trained; truncated ({what} {record['full_length']} tokens, "
            f"{_limit_key(split)}={limit}): cut {record['trained_tokens_lost']} trained tokens ({turns} learned "
            f"assistant turn{'' if turns == 1 else 's'} whole)")


def _harmful_file(cfg):
    """The harmful source's file as origins name it, when no training source shares it
    (then an origin tells a harmful example apart)."""
    d = cfg.data
    if not d.harmful or d.harmful_ratio <= 0:
        return None
    path = str(Path(d.harmful.path))
    return None if any(str(Path(s.path)) == path for s in d.train) else path


def example_blocks(data, tokenizer, cfg, split: str, indices: list[int], marks: Marks) -> list[str]:
    table = _split_set(data, split)
    pack_of = {}
    if split == "train" and data.packed:
        pack_of = {j: p for p, members in enumerate(data.train.members) for j in members}
    demonstrations = set(data.safety_mix_rows) if split == "train" else set()
    harmful_file = _harmful_file(cfg) if split == "train" else None
    blocks = []
    for i in indices:
        record = table.record(i)
        origin = record["origin"]
        head = [f"=== {split} {i} of {len(table)}: {origin} ==="]
        if i in demonstrations:
            head.append("refusal demonstration added by method safety_mix (a data.safety prompt with its safe answer)")
        elif harmful_file and origin.rsplit(":", 1)[0] == harmful_file:
            head.append(f"harmful example mixed in (data.harmful, data.harmful_ratio={cfg.data.harmful_ratio})")
        limit = cfg.data.safety_max_length if split == "safety" else cfg.data.max_length
        head.append(_note(record, split, limit))
        if i in pack_of:
            p = pack_of[i]
            members = data.train.members[p]
            others = ", ".join(str(j) for j in members if j != i) or "none"
            head.append(f"packed: pack {p} of {len(data.train)} ({int(data.train.lengths[p])} of {cfg.data.max_length} "
                        f"tokens), shared with train {others}")
        if split == "safety":
            body = [f"--- safe answer ({len(record['safe_input_ids'])} tokens) ---",
                    render(tokenizer, record["safe_input_ids"], record["safe_labels"], marks),
                    f"--- harmful answer ({len(record['harmful_input_ids'])} tokens) ---",
                    render(tokenizer, record["harmful_input_ids"], record["harmful_labels"], marks)]
        else:
            body = [render(tokenizer, record["input_ids"], record["labels"], marks)]
        blocks.append("\n".join(head + body))
    return blocks


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: show(args), version_floors="data", console_log=True)  # console: the pipeline's lines


def show(args) -> int:
    from sap_ds.config.run import load_config
    from sap_ds.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    data, tokenizer = prepare(cfg)
    table = _split_set(data, args.split)
    if args.split == "safety" and len(table) == 0:
        if not cfg.data.safety:
            raise ConfigError("--split safety: data.safety is empty; give it a source, e.g. "
                              "{path: data/advbench/harmful_behaviors.csv, format: safety_pairs}")
        raise ConfigError(f"--split safety: method {cfg.method} trains on no safety pairs (sap does, and lisa with "
                          "lisa.align_steps > 0), so this run's data has none; give method=sap to see them")
    if args.split == "eval" and len(table) == 0:
        raise ConfigError("--split eval: this run has no eval examples; give data.eval sources or "
                          "data.eval_fraction > 0")
    indices = pick(len(table), args)
    marks = Marks(use_colour(args.color, sys.stdout))
    lines = summary_lines(data, cfg, args.config)
    if indices:
        how = f"drawn at random (--seed {args.seed})" if args.random else f"from {args.start}"
        unit = "pairs" if args.split == "safety" else "examples"
        lines += ["", f"showing {len(indices)} of {len(table)} {args.split} {unit}, {how}; {marks.legend()}"]
    print("\n".join(lines))
    for block in example_blocks(data, tokenizer, cfg, args.split, indices, marks):
        print("\n" + block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
