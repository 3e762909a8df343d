"""Local data files -> chat-formatted, label-masked token sequences.

Files are read with the ``datasets`` library (JSON, JSONL, CSV, TSV, TXT, gzip) from
local paths only. Each source has a ``format`` that says how its columns become a prompt
and a response (or, for safety data, a prompt with a safe and a harmful response). The
tokenizer's chat template is applied, and the loss mask covers the response only.

Every error names the file, and where it can the line and the column, and says what
would be valid: a bad row found after an hour on a cluster is an hour lost.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from sap_ds.config import DataConfig, DataSource

IGNORE_INDEX = -100

# Refusals used where a harmful prompt needs a safe answer and the file has none
# (alignment data, AdvBench-derived safety pairs). Several, so the model learns to
# refuse rather than to repeat one string.
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I cannot help with this request. It is harmful and may be illegal.",
    "Sorry, I can't assist with that. If you have another question, I'm happy to help.",
    "I'm not able to provide that. Helping with this could put people at risk.",
    "I must decline. This request asks for something dangerous or unethical.",
)

SST2_INSTRUCTION = "Classify the sentiment of the following sentence as positive or negative.\n\nSentence: {text}"
SST2_LABELS = {0: "negative", 1: "positive"}

# Column defaults per format: the first name present in the file wins.
PROMPT_COLUMNS = ("prompt", "instruction", "question", "goal", "Behavior", "behavior", "text", "query")
RESPONSE_COLUMNS = ("response", "output", "answer", "target", "completion")
SAFE_COLUMNS = ("safe_response", "safe", "chosen", "Safe_Response")
HARMFUL_COLUMNS = ("harmful_response", "harmful", "rejected", "target")


class DataError(ValueError):
    """A bad data file: the message names the file, the row or line, and the fix."""


@dataclass(frozen=True)
class Example:
    """One prompt/response pair. ``messages`` are the chat turns before the response."""

    messages: tuple[tuple[str, str], ...]
    response: str
    origin: str  # "file:row", for error messages and audits


@dataclass(frozen=True)
class SafetyPair:
    messages: tuple[tuple[str, str], ...]
    safe: str
    harmful: str
    origin: str


# --------------------------------------------------------------------------- reading files


def _check_text_file(path: Path) -> None:
    """Fail early, with a line number, on what ``datasets`` reports poorly."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found (paths are relative to the working directory)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; expected rows of data")
    if path.suffix == ".gz":
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


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a local file as dicts, through ``datasets`` (no network, no hub)."""
    import datasets

    path = Path(path)
    _check_text_file(path)
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    datasets.disable_progress_bars()
    kwargs: dict = {}
    if kind in (".json", ".jsonl"):
        builder = "json"
    elif kind == ".csv":
        builder = "csv"
    elif kind == ".tsv":
        builder, kwargs = "csv", {"delimiter": "\t", "quoting": 3}  # QUOTE_NONE: SST-2 has bare quotes
    elif kind == ".txt":
        builder = "text"
    else:
        raise DataError(f"{path}: unsupported file type '{kind}'; use .json, .jsonl, .csv, .tsv or .txt (optionally .gz)")
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    except Exception as exc:  # datasets wraps parser errors in many types
        raise DataError(f"{path}: could not be read as {kind[1:].upper()}: {exc}") from None
    rows = table.to_list()
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


# --------------------------------------------------------------------------- formats


def _pick(row: dict, explicit: Optional[str], candidates: Sequence[str], path: Path, what: str) -> str:
    names = [explicit] if explicit else list(candidates)
    for name in names:
        if name in row:
            return name
    raise DataError(
        f"{path}: no {what} column: looked for {', '.join(map(repr, names))}, the file has {', '.join(map(repr, row))}; "
        f"set {what}_column in the data source"
    )


def refusal_for(prompt: str) -> str:
    """A refusal picked by a hash of the prompt: deterministic across runs and ranks."""
    digest = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16)
    return REFUSALS[digest % len(REFUSALS)]


def _hh_turns(transcript: str) -> list[tuple[str, str]]:
    turns = []
    for chunk in transcript.split("\n\nHuman: ")[1:]:
        human, _, rest = chunk.partition("\n\nAssistant:")
        turns.append(("user", human.strip()))
        if _:
            turns.append(("assistant", rest.strip()))
    return turns


def _text(value, path: Path, number: int, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}: row {number}, column '{column}': expected text, got {type(value).__name__}")
    return value.strip()


def _row_to_pair(row: dict, source: DataSource, path: Path, number: int) -> tuple[str, str]:
    fmt = source.format
    if fmt == "alpaca":
        prompt = _text(row.get("instruction"), path, number, "instruction")
        extra = _text(row.get("input"), path, number, "input")
        return (f"{prompt}\n\n{extra}" if extra else prompt), _text(row.get("output"), path, number, "output")
    if fmt == "alpaca_seed":
        instance = (row.get("instances") or [{}])[0]
        prompt = _text(row.get("instruction"), path, number, "instruction")
        extra = _text(instance.get("input"), path, number, "instances.input")
        return (f"{prompt}\n\n{extra}" if extra else prompt), _text(instance.get("output"), path, number, "instances.output")
    if fmt == "sst2":
        col = _pick(row, source.prompt_column, ("sentence", "content", "text"), path, "prompt")
        label = row.get("label")
        if label not in SST2_LABELS:
            raise DataError(f"{path}: row {number}: label {label!r} is not 0 or 1")
        return SST2_INSTRUCTION.format(text=_text(row[col], path, number, col)), SST2_LABELS[label]
    prompt_col = _pick(row, source.prompt_column, PROMPT_COLUMNS, path, "prompt")
    prompt = _text(row[prompt_col], path, number, prompt_col)
    if fmt == "refusal":
        safe_col = source.safe_column or next((c for c in SAFE_COLUMNS if c in row), None)
        given = _text(row.get(safe_col), path, number, safe_col) if safe_col else ""
        return prompt, source.refusal or given or refusal_for(prompt)
    defaults = {"gsm8k": ("answer",), "advbench": ("target",)}.get(fmt, RESPONSE_COLUMNS)
    response_col = _pick(row, source.response_column, defaults, path, "response")
    return prompt, _text(row[response_col], path, number, response_col)


def _rows_window(rows: list, source: DataSource) -> list:
    end = None if source.limit is None else source.offset + source.limit
    return rows[source.offset : end]


def load_examples(source: DataSource) -> list[Example]:
    path = Path(source.path)
    if source.format in ("safety_pairs", "hh_rlhf"):
        raise DataError(f"{path}: format '{source.format}' holds safety pairs; use it under data.safety, not as task data")
    examples = []
    for number, row in enumerate(read_rows(path), start=1):
        prompt, response = _row_to_pair(row, source, path, number)
        if not prompt:
            raise DataError(f"{path}: row {number}: empty prompt; every example needs an instruction")
        if not response:
            raise DataError(f"{path}: row {number}: empty response; drop the row or fill the response column")
        examples.append(Example((("user", prompt),), response, f"{path}:{number}"))
    window = _rows_window(examples, source)
    if not window:
        raise DataError(f"{path}: offset={source.offset} skips all {len(examples)} rows of the file; lower the offset")
    return window


def load_safety_pairs(source: DataSource) -> list[SafetyPair]:
    """Safety pairs from ``safety_pairs`` files (prompt/safe/harmful columns; an AdvBench
    goal/target file gets a refusal as its safe side) or hh-rlhf chosen/rejected."""
    path = Path(source.path)
    if source.format not in ("safety_pairs", "hh_rlhf"):
        raise DataError(f"{path}: data.safety needs format 'safety_pairs' or 'hh_rlhf', got '{source.format}'")
    pairs = []
    for number, row in enumerate(read_rows(path), start=1):
        if source.format == "hh_rlhf":
            chosen, rejected = _hh_turns(row.get("chosen", "")), _hh_turns(row.get("rejected", ""))
            if not chosen or chosen[-1][0] != "assistant" or not rejected or rejected[-1][0] != "assistant":
                raise DataError(f"{path}: row {number}: expected 'chosen' and 'rejected' transcripts ending with an Assistant turn")
            if chosen[:-1] != rejected[:-1]:
                continue  # different conversations: no shared prompt to contrast on
            messages, safe, harmful = tuple(chosen[:-1]), chosen[-1][1], rejected[-1][1]
            if not safe or not harmful or safe == harmful:
                continue
        else:
            prompt_col = _pick(row, source.prompt_column, PROMPT_COLUMNS, path, "prompt")
            harmful_col = _pick(row, source.harmful_column, HARMFUL_COLUMNS, path, "harmful")
            prompt = _text(row[prompt_col], path, number, prompt_col)
            harmful = _text(row[harmful_col], path, number, harmful_col)
            safe_col = source.safe_column or next((c for c in SAFE_COLUMNS if c in row), None)
            safe = _text(row[safe_col], path, number, safe_col) if safe_col else refusal_for(prompt)
            if not prompt or not safe or not harmful:
                raise DataError(f"{path}: row {number}: prompt, safe and harmful responses must all be non-empty")
            messages = (("user", prompt),)
        pairs.append(SafetyPair(messages, safe, harmful, f"{path}:{number}"))
    pairs = _rows_window(pairs, source)
    if not pairs:
        raise DataError(f"{path}: no usable safety pairs")
    return pairs


# --------------------------------------------------------------------------- tokenizing


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


class ChatTokenizer:
    """Applies the chat template and masks the prompt.

    The prompt and the response are tokenized separately and concatenated, split where
    the template's text for "prompt + generation prompt" ends, so no token straddles the
    boundary and the label mask is exact for any template.
    """

    def __init__(self, tokenizer, max_length: int, system_prompt: Optional[str] = None):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template; sap-ds fine-tunes chat models. "
                "Use an instruct model or add chat_template to tokenizer_config.json"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.system_prompt = system_prompt

    def _chat(self, messages) -> list[dict]:
        chat = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return chat + [{"role": role, "content": content} for role, content in messages]

    def prompt_text(self, messages) -> str:
        return self.tokenizer.apply_chat_template(self._chat(messages), tokenize=False, add_generation_prompt=True)

    def encode(self, messages, response: str, origin: str = "") -> Optional[Tokenized]:
        """Token ids and labels, or None when truncation leaves no response token."""
        prompt = self.prompt_text(messages)
        full = self.tokenizer.apply_chat_template(
            self._chat(messages) + [{"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(prompt):
            raise DataError(
                f"{origin}: the chat template does not render the prompt as a prefix of prompt + response; "
                "sap-ds cannot mask the prompt for this template"
            )
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = self.tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + response_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return Tokenized(ids, labels)


def encode_all(chat: ChatTokenizer, examples: Sequence[Example], what: str) -> list[Tokenized]:
    encoded = [chat.encode(e.messages, e.response, e.origin) for e in examples]
    kept = [e for e in encoded if e is not None]
    if examples and not kept:
        raise DataError(
            f"{what}: every example's prompt is longer than max_length={chat.max_length} tokens, "
            f"so no response token is left to learn; raise data.max_length (first: {examples[0].origin})"
        )
    return kept


@dataclass
class EncodedPair:
    safe: Tokenized
    harmful: Tokenized


def encode_pairs(chat: ChatTokenizer, pairs: Sequence[SafetyPair]) -> list[EncodedPair]:
    out = []
    for p in pairs:
        safe, harmful = chat.encode(p.messages, p.safe, p.origin), chat.encode(p.messages, p.harmful, p.origin)
        if safe is not None and harmful is not None:
            out.append(EncodedPair(safe, harmful))
    if pairs and not out:
        raise DataError(
            f"data.safety: every pair is longer than data.safety_max_length={chat.max_length} tokens before its "
            f"response starts; raise data.safety_max_length (first: {pairs[0].origin})"
        )
    return out


def collate(items: Sequence[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss."""
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        labels[i, :n] = torch.tensor(t.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Safe responses first, harmful second, in one padded batch of 2 * len(pairs)."""
    return collate([p.safe for p in pairs] + [p.harmful for p in pairs], pad_id)


# --------------------------------------------------------------------------- the run's data


def mix_harmful(task: list, harmful: list, ratio: float, seed: int, what: str = "data") -> list:
    """Replace a share ``ratio`` of the task examples with harmful ones (same total).

    This is the fine-tuning attack setting of the defence literature: the user's data
    set of size N contains round(ratio * N) harmful examples.
    """
    if ratio <= 0:
        return list(task)
    n_total = len(task)
    n_harmful = round(ratio * n_total)
    if n_harmful > len(harmful):
        raise DataError(
            f"{what}: harmful_ratio={ratio} of {n_total} examples needs {n_harmful} harmful examples, "
            f"the harmful file has {len(harmful)}; lower data.harmful_ratio or use a larger file"
        )
    rng = random.Random(seed)
    chosen_task = rng.sample(task, n_total - n_harmful)
    chosen_harmful = rng.sample(harmful, n_harmful)
    mixed = chosen_task + chosen_harmful
    rng.shuffle(mixed)
    return mixed


@dataclass
class RunData:
    train: list[Tokenized]
    eval: list[Tokenized]
    safety: list[EncodedPair]
    n_harmful: int


def build_run_data(cfg: DataConfig, tokenizer, seed: int, need_safety: bool) -> RunData:
    if not cfg.train:
        raise DataError("data.train is empty: give at least one source, e.g. {path: data/gsm8k/train.jsonl, format: gsm8k}")
    train_examples = [e for s in cfg.train for e in load_examples(s)]
    eval_examples = [e for s in cfg.eval for e in load_examples(s)]
    if not eval_examples and cfg.eval_fraction > 0:
        rng = random.Random(seed + 1)
        shuffled = rng.sample(train_examples, len(train_examples))
        n_eval = max(1, int(len(shuffled) * cfg.eval_fraction))
        eval_examples, train_examples = shuffled[:n_eval], shuffled[n_eval:]
        if not train_examples:
            raise DataError(
                f"data.eval_fraction={cfg.eval_fraction} of {len(shuffled)} examples leaves none to train on; "
                "add training rows, lower data.eval_fraction or give data.eval"
            )
    eval_examples = eval_examples[: cfg.eval_max_examples]
    n_harmful = 0
    if cfg.harmful_ratio > 0:
        harmful = load_examples(cfg.harmful)
        train_examples = mix_harmful(train_examples, harmful, cfg.harmful_ratio, seed, f"data ({cfg.harmful.path})")
        n_harmful = round(cfg.harmful_ratio * len(train_examples))
    chat = ChatTokenizer(tokenizer, cfg.max_length, cfg.system_prompt)
    train = encode_all(chat, train_examples, "data.train")
    evals = encode_all(chat, eval_examples, "data.eval")
    safety = []
    if need_safety:
        safety_chat = ChatTokenizer(tokenizer, cfg.safety_max_length, cfg.system_prompt)
        safety = encode_pairs(safety_chat, [p for s in cfg.safety for p in load_safety_pairs(s)])
    return RunData(train, evals, safety, n_harmful)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so a resumed
    run sees exactly the batches an uninterrupted one would."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch_indices(n: int, global_batch: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices of the ``global_batch`` examples of optimizer step ``step`` (0-based),
    walking through epochs; the last partial batch of an epoch wraps into the next."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch, shuffle)
        take = min(global_batch - len(out), n - offset)
        out.extend(order[offset : offset + take])
    return out
