"""Conversations -> token ids and labels, through the tokenizer's own chat template.

Assistant-only labels come from the template's actual boundaries, for any template: the
conversation is rendered prefix by prefix (up to each assistant turn with the generation
prompt, then including that turn), each rendering must be a prefix of the whole text, and
the text is cut at those boundaries. Each piece is tokenized on its own and the pieces are
concatenated, so no token straddles a boundary and the mask is exact. A template that
renders earlier turns differently once later ones follow is an error, not a guess.

For a one-turn example this is exactly the tokenization sap-ds always had: the prompt with
the generation prompt, then the rest of the text.

Which assistant turns are learned: all of them (``data.loss_on: all_assistant``) or the
last one (``last_assistant``), and never those before ``learn_from`` (a completion's
prompt). Longer than ``max_length``: ``data.overlength`` (truncate, drop or error); see
``Status``. Truncation keeps whole turns: the example is cut at ``max_length`` and then
back to its last learned token, so it ends at the end of a learned assistant turn, or
inside the last one it keeps, never in a loss-free fragment of a later turn (``_fit``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from sap_ds.data.formats import Conversation, Example, SafetyPair
from sap_ds.errors import DataError

IGNORE_INDEX = -100


class Status:
    """What the length limit did to an example."""

    KEPT = 0  # fits in max_length
    TRUNCATED = 1  # cut at max_length (and back to its last learned token), learned tokens left
    DROPPED = 2  # not used: no learned token left (truncate) or too long (drop)
    OVERLENGTH = 3  # too long under overlength 'error' (reported by the caller, with counts)
    NAMES = ("kept", "truncated", "dropped")


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Encoded:
    """What the length limit made of one conversation (``ChatTokenizer.encode_many``)."""

    tokens: Optional[Tokenized]  # None: dropped, or over the limit under overlength 'error'
    status: int  # a Status code
    full_length: int  # tokens before the length limit
    trained_tokens_lost: int = 0  # learned tokens a truncation cut off
    assistant_turns_lost: int = 0  # learned assistant turns a truncation left no token of


@dataclass
class EncodedPair:
    safe: Tokenized
    harmful: Tokenized


class ChatTokenizer:
    """Applies the chat template and masks everything but the learned assistant turns."""

    def __init__(self, tokenizer, max_length: int, system_prompt: Optional[str] = None, overlength: str = "truncate",
                 loss_on: str = "all_assistant", length_key: str = "data.max_length"):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template; sap-ds fine-tunes chat models. "
                "Use an instruct model or add chat_template to tokenizer_config.json"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.overlength = overlength
        self.loss_on = loss_on
        self.length_key = length_key

    # ------------------------------------------------------------------ rendering

    def _chat(self, messages) -> list[dict]:
        """The turns as template messages, with ``system_prompt`` first unless the
        conversation has its own system turn."""
        own_system = bool(messages) and messages[0][0] == "system"
        chat = [{"role": "system", "content": self.system_prompt}] if self.system_prompt and not own_system else []
        return chat + [{"role": role, "content": content} for role, content in messages]

    def _render(self, chat: list[dict], generation_prompt: bool, origin: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja's raise_exception, template bugs: name the row
            roles = ", ".join(m["role"] for m in chat)
            raise DataError(f"{origin}: the chat template rejected this conversation (turns: {roles}): {exc}") from None

    def prompt_text(self, messages) -> str:
        return self._render(self._chat(messages), True, "prompt")

    def pieces(self, turns: Sequence[tuple[str, str]], origin: str = "") -> list[tuple[str, Optional[int]]]:
        """The rendered conversation cut at every assistant turn's start and end: (text,
        index of the assistant turn in ``turns``, or None for template/context text)."""
        chat = self._chat(turns)
        shift = len(chat) - len(turns)
        full = self._render(chat, False, origin)
        out, pos = [], 0
        for i, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            start = self._render(chat[:i], True, origin)
            end = full if i == len(chat) - 1 else self._render(chat[: i + 1], False, origin)
            if len(start) < pos or not end.startswith(start) or not full.startswith(end):
                raise DataError(
                    f"{origin}: the chat template does not render this conversation prefix by prefix (at turn {i - shift}, "
                    "an assistant turn: the text up to it is not a prefix of the whole), so sap-ds cannot find the "
                    "assistant turns' token boundaries; use a template that renders earlier turns unchanged"
                )
            out += [(full[pos : len(start)], None), (full[len(start) : len(end)], i - shift)]
            pos = len(end)
        out.append((full[pos:], None))
        return [(text, turn) for text, turn in out if text]

    def _learned(self, turns, learn_from: int) -> set[int]:
        assistant = [i for i, (role, _) in enumerate(turns) if role == "assistant" and i >= learn_from]
        return set(assistant[-1:] if self.loss_on == "last_assistant" else assistant)

    # ------------------------------------------------------------------ encoding

    def encode_many(self, conversations: Sequence[Conversation]) -> list[Encoded]:
        """What the length limit made of each conversation; one tokenizer call for all
        pieces of all conversations."""
        cut = [self.pieces(c.turns, c.origin) for c in conversations]
        texts = [text for pieces in cut for text, _ in pieces]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out, k = [], 0
        for conv, pieces in zip(conversations, cut):
            learned = self._learned(conv.turns, conv.learn_from)
            input_ids, labels, spans = [], [], []
            for _, turn in pieces:
                if turn in learned:
                    spans.append((len(input_ids), len(input_ids) + len(ids[k])))
                input_ids += ids[k]
                labels += ids[k] if turn in learned else [IGNORE_INDEX] * len(ids[k])
                k += 1
            out.append(self._fit(input_ids, labels, spans))
        return out

    def _fit(self, ids: list[int], labels: list[int], spans: Sequence[tuple[int, int]]) -> Encoded:
        """The length limit. ``spans``: [start, end) of each learned assistant turn.

        Truncation cuts at ``max_length`` and then back to the last learned token: later
        turns go whole, a learned turn is cut only when it is the last one kept, and no
        example ends in loss-free text (a user turn, a context assistant turn, the template's
        turn header) that nothing after it would learn from. With ``loss_on:
        last_assistant`` the learned turn is the last one, so it is cut, or the example
        dropped when the cut falls before it."""
        full = len(ids)
        if full <= self.max_length:
            return Encoded(Tokenized(ids, labels), Status.KEPT, full)
        if self.overlength == "error":
            return Encoded(None, Status.OVERLENGTH, full)
        if self.overlength == "drop":
            return Encoded(None, Status.DROPPED, full)
        end = self.max_length
        while end > 0 and labels[end - 1] == IGNORE_INDEX:
            end -= 1
        if end == 0:
            return Encoded(None, Status.DROPPED, full)
        lost_tokens = sum(stop - max(start, end) for start, stop in spans if stop > end)
        lost_turns = sum(1 for start, _ in spans if start >= end)
        return Encoded(Tokenized(ids[:end], labels[:end]), Status.TRUNCATED, full, lost_tokens, lost_turns)

    def overlength_error(self, what: str, origins: Sequence[str], lengths: Sequence[int], total: int) -> DataError:
        first = ", ".join(f"{o} ({n} tokens)" for o, n in list(zip(origins, lengths))[:3])
        return DataError(
            f"{what}: {len(origins)} of {total} examples are longer than {self.length_key}={self.max_length} tokens "
            f"(first: {first}) and data.overlength is 'error'; raise {self.length_key}, or set data.overlength to "
            "'truncate' (keep the prompt, cut at turn boundaries) or 'drop'"
        )

    def encode_conversation(self, conv: Conversation) -> Optional[Tokenized]:
        encoded = self.encode_many([conv])[0]
        if encoded.status == Status.OVERLENGTH:
            raise self.overlength_error("data", [conv.origin], [encoded.full_length], 1)
        return encoded.tokens

    def encode(self, messages, response: str, origin: str = "") -> Optional[Tokenized]:
        """Token ids and labels of ``messages`` + the assistant's ``response`` (only the
        response is learned), or None when the length limit leaves no response token."""
        turns = tuple(messages) + (("assistant", response),)
        return self.encode_conversation(Conversation(turns, len(turns) - 1, origin))


def encode_all(chat: ChatTokenizer, examples: Sequence[Example], what: str) -> list[Tokenized]:
    encoded = [chat.encode(e.messages, e.response, e.origin) for e in examples]
    kept = [e for e in encoded if e is not None]
    if examples and not kept:
        raise DataError(
            f"{what}: every example's prompt is longer than max_length={chat.max_length} tokens, "
            f"so no response token is left to learn; raise data.max_length (first: {examples[0].origin})"
        )
    return kept


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
