"""Rows -> conversations: what each ``format`` reads from a row.

A task row becomes a ``Conversation``: chat turns ``(role, content)`` that end with an
assistant turn, and ``learn_from``, the first turn that may be learned (the completion of
``prompt_completion``; 0 otherwise). Which assistant turns are learned is
``data.loss_on``'s choice, made when tokenizing. A safety row becomes a ``SafetyPair``: the
turns before the answer, a safe answer and a harmful one.

Every error names the file and the row (1-based, in file order), the column or turn, and
what would be valid.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from sap_ds.errors import DataError

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

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TASK_FORMATS = ("alpaca", "alpaca_seed", "gsm8k", "sst2", "advbench", "instruction", "refusal", "messages", "sharegpt",
                "prompt_completion")
SAFETY_FORMATS = ("safety_pairs", "hh_rlhf", "preference", "circuit_breakers")
# Formats whose rows may be skipped (counted, logged): hh-rlhf and implicit-prompt preference
# rows whose two conversations differ before the last turn have no shared prompt.
SKIPPING_FORMATS = ("hh_rlhf", "preference")

Turns = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Example:
    """One prompt/response pair. ``messages`` are the chat turns before the response."""

    messages: Turns
    response: str
    origin: str  # "file:row", for error messages and audits


@dataclass(frozen=True)
class Conversation:
    turns: Turns  # ends with an assistant turn
    learn_from: int  # turns before this index are never learned
    origin: str

    def as_example(self) -> Example:
        return Example(self.turns[:-1], self.turns[-1][1], self.origin)


@dataclass(frozen=True)
class SafetyPair:
    messages: Turns
    safe: str
    harmful: str
    origin: str


class Rows:
    """The columns of one table and how to name a row in an error."""

    def __init__(self, path: str, columns: Sequence[str]):
        self.path, self.columns = Path(path), list(columns)

    def pick(self, explicit: Optional[str], candidates: Sequence[str], what: str) -> str:
        names = [explicit] if explicit else list(candidates)
        for name in names:
            if name in self.columns:
                return name
        raise DataError(
            f"{self.path}: no {what} column: looked for {', '.join(map(repr, names))}, the file has "
            f"{', '.join(map(repr, self.columns))}; set {what}_column in the data source"
        )

    def optional(self, explicit: Optional[str], candidates: Sequence[str]) -> Optional[str]:
        return explicit or next((c for c in candidates if c in self.columns), None)


def refusal_for(prompt: str) -> str:
    """A refusal picked by a hash of the prompt: deterministic across runs and ranks."""
    digest = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16)
    return REFUSALS[digest % len(REFUSALS)]


def _text(value, path: Path, number: int, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}: row {number}, column '{column}': expected text, got {type(value).__name__}")
    return value.strip()


def _hh_turns(transcript: str) -> list[tuple[str, str]]:
    turns = []
    for chunk in transcript.split("\n\nHuman: ")[1:]:
        human, _, rest = chunk.partition("\n\nAssistant:")
        turns.append(("user", human.strip()))
        if _:
            turns.append(("assistant", rest.strip()))
    return turns


def parse_turns(value, path: Path, number: int, column: str, sharegpt: bool = False) -> list[tuple[str, str]]:
    """A list of ``{role, content}`` (ShareGPT: ``{from, value}``) -> (role, content) turns."""
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    valid = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(f"{path}: row {number}, column '{column}': expected a non-empty list of "
                        f"{{{role_key}, {content_key}}} messages, got {got}")
    turns = []
    for k, message in enumerate(value):
        where = f"{path}: row {number}, {column}[{k}]"
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise DataError(f"{where}: expected a message {{{role_key}: ..., {content_key}: ...}}, got {message!r:.80}")
        role, content = message[role_key], message[content_key]
        if role not in valid:
            raise DataError(f"{where}: unknown {role_key} {role!r}; valid: {', '.join(map(repr, valid))}")
        if not isinstance(content, str):
            raise DataError(f"{where} ({role}): {content_key} must be text, got {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{where} ({role}): empty {content_key}; every turn needs text")
        turns.append((valid[role], content))
    return turns


def _prompt_turns(value, path: Path, number: int, column: str) -> list[tuple[str, str]]:
    """A prompt given as text (one user turn) or as a list of messages."""
    if isinstance(value, list):
        return parse_turns(value, path, number, column)
    text = _text(value, path, number, column)
    if not text:
        raise DataError(f"{path}: row {number}: empty prompt in column '{column}'")
    return [("user", text)]


def _answer_turns(value, path: Path, number: int, column: str) -> list[tuple[str, str]]:
    """An answer given as text (one assistant turn) or as a list of messages ending with one."""
    if isinstance(value, list):
        turns = parse_turns(value, path, number, column)
    else:
        text = _text(value, path, number, column)
        if not text:
            raise DataError(f"{path}: row {number}: empty answer in column '{column}'")
        turns = [("assistant", text)]
    if turns[-1][0] != "assistant":
        raise DataError(f"{path}: row {number}, column '{column}': must end with an assistant turn, ends with {turns[-1][0]}")
    return turns


def _check_learnable(turns, learn_from: int, path: Path, number: int) -> None:
    if not any(role == "assistant" for role, _ in turns[learn_from:]):
        raise DataError(f"{path}: row {number}: no assistant turn: the conversation has {', '.join(r for r, _ in turns)}; "
                        "a training conversation needs an assistant answer to learn")
    if turns[-1][0] != "assistant":
        raise DataError(f"{path}: row {number}: the conversation ends with a {turns[-1][0]} turn; "
                        "the last turn must be the assistant's (nothing after it could be learned)")


# --------------------------------------------------------------------------- task formats


def _one_turn(row: dict, source, rows: Rows, number: int) -> tuple[str, str]:
    """(prompt, response) of the one-turn formats: exactly as before conversations existed."""
    fmt, path = source.format, rows.path
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
        col = rows.pick(source.prompt_column, ("sentence", "content", "text"), "prompt")
        label = row.get("label")
        if label not in SST2_LABELS:
            raise DataError(f"{path}: row {number}: label {label!r} is not 0 or 1")
        return SST2_INSTRUCTION.format(text=_text(row[col], path, number, col)), SST2_LABELS[label]
    prompt_col = rows.pick(source.prompt_column, PROMPT_COLUMNS, "prompt")
    prompt = _text(row[prompt_col], path, number, prompt_col)
    if fmt == "refusal":
        safe_col = rows.optional(source.safe_column, SAFE_COLUMNS)
        given = _text(row.get(safe_col), path, number, safe_col) if safe_col else ""
        return prompt, source.refusal or given or refusal_for(prompt)
    defaults = {"gsm8k": ("answer",), "advbench": ("target",)}.get(fmt, RESPONSE_COLUMNS)
    response_col = rows.pick(source.response_column, defaults, "response")
    return prompt, _text(row[response_col], path, number, response_col)


def _alpaca_context(row: dict, path: Path, number: int) -> list[tuple[str, str]]:
    """LLaMA-Factory's optional alpaca columns: ``system`` and ``history`` ([prompt, answer] pairs)."""
    turns = []
    system = _text(row.get("system"), path, number, "system")
    if system:
        turns.append(("system", system))
    for k, pair in enumerate(row.get("history") or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, str) and x.strip() for x in pair):
            raise DataError(f"{path}: row {number}, history[{k}]: expected a [prompt, answer] pair of non-empty texts")
        turns += [("user", pair[0].strip()), ("assistant", pair[1].strip())]
    return turns


def task_conversation(row: dict, source, rows: Rows, number: int) -> Conversation:
    path, fmt, origin = rows.path, source.format, f"{rows.path}:{number}"
    if fmt in ("messages", "sharegpt"):
        column = rows.pick(source.messages_column, ("messages",) if fmt == "messages" else ("conversations",), "messages")
        turns = parse_turns(row[column], path, number, column, sharegpt=fmt == "sharegpt")
        _check_learnable(turns, 0, path, number)
        return Conversation(tuple(turns), 0, origin)
    if fmt == "prompt_completion":
        prompt_col = rows.pick(source.prompt_column, ("prompt",), "prompt")
        completion_col = rows.pick(source.response_column, ("completion",), "response")
        prompt = _prompt_turns(row[prompt_col], path, number, prompt_col)
        completion = _answer_turns(row[completion_col], path, number, completion_col)
        return Conversation(tuple(prompt + completion), len(prompt), origin)
    prompt, response = _one_turn(row, source, rows, number)
    if not prompt:
        raise DataError(f"{path}: row {number}: empty prompt; every example needs an instruction")
    if not response:
        raise DataError(f"{path}: row {number}: empty response; drop the row or fill the response column")
    context = _alpaca_context(row, path, number) if fmt == "alpaca" else []
    return Conversation(tuple(context) + (("user", prompt), ("assistant", response)), 0, origin)


# --------------------------------------------------------------------------- safety formats


def _pair_from_conversations(chosen, rejected, path: Path, number: int, origin: str, what: str):
    """Two conversations that share all but their last (assistant) turn; None if they differ
    earlier (skipped and counted: no shared prompt to contrast on)."""
    if not chosen or chosen[-1][0] != "assistant" or not rejected or rejected[-1][0] != "assistant":
        raise DataError(f"{path}: row {number}: expected 'chosen' and 'rejected' {what} ending with an assistant turn")
    if tuple(chosen[:-1]) != tuple(rejected[:-1]) or not chosen[:-1]:
        return None
    safe, harmful = chosen[-1][1], rejected[-1][1]
    if not safe.strip() or not harmful.strip() or safe == harmful:
        return None
    return SafetyPair(tuple(chosen[:-1]), safe, harmful, origin)


def safety_pair(row: dict, source, rows: Rows, number: int) -> Optional[SafetyPair]:
    """A row's safety pair, or None for a skipped row (SKIPPING_FORMATS only)."""
    path, fmt, origin = rows.path, source.format, f"{rows.path}:{number}"
    if fmt == "hh_rlhf":
        return _pair_from_conversations(_hh_turns(row.get("chosen") or ""), _hh_turns(row.get("rejected") or ""),
                                        path, number, origin, "transcripts")
    if fmt == "preference":
        chosen_col = rows.pick(source.safe_column, ("chosen",), "safe")
        rejected_col = rows.pick(source.harmful_column, ("rejected",), "harmful")
        prompt_col = rows.optional(source.prompt_column, ("prompt", "messages"))
        chosen = _answer_turns(row[chosen_col], path, number, chosen_col)
        rejected = _answer_turns(row[rejected_col], path, number, rejected_col)
        if prompt_col is not None:  # explicit prompt; answers are one assistant turn (or end with one)
            prompt = _prompt_turns(row[prompt_col], path, number, prompt_col)
            chosen, rejected = prompt + chosen, prompt + rejected
        return _pair_from_conversations(chosen, rejected, path, number, origin, "answers")
    if fmt == "circuit_breakers":  # the authors' layout: prompt, llama3_output (refusal), response (harmful)
        prompt_col = rows.pick(source.prompt_column, ("prompt",), "prompt")
        safe_col = rows.pick(source.safe_column, ("llama3_output",), "safe")
        harmful_col = rows.pick(source.harmful_column, ("response",), "harmful")
    else:
        prompt_col = rows.pick(source.prompt_column, PROMPT_COLUMNS, "prompt")
        harmful_col = rows.pick(source.harmful_column, HARMFUL_COLUMNS, "harmful")
        safe_col = rows.optional(source.safe_column, SAFE_COLUMNS)
    prompt = _text(row[prompt_col], path, number, prompt_col)
    harmful = _text(row[harmful_col], path, number, harmful_col)
    safe = _text(row[safe_col], path, number, safe_col) if safe_col else refusal_for(prompt)
    if not prompt or not safe or not harmful:
        raise DataError(f"{path}: row {number}: prompt, safe and harmful responses must all be non-empty")
    return SafetyPair((("user", prompt),), safe, harmful, origin)
