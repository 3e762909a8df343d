"""Conversations and sources (sap_ds/data/): assistant-only masks token by token under two
chat templates, truncation at turn boundaries, the conversation formats against each other, safety pairs from
conversations, save_to_disk/Parquet/hub sources, and malformed conversations, each a
clear error naming the file and the row."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from sap_ds.config.run import DataConfig, DataSource
from sap_ds.data import (
    IGNORE_INDEX,
    ChatTokenizer,
    Conversation,
    DataError,
    Status,
    build_run_data,
    load_examples,
    load_safety_pairs,
    read_table,
)

REPO = Path(__file__).resolve().parents[1]

# Llama-2's chat template (meta-llama/Llama-2-7b-chat-hf), with "<s>"/"</s>" written out:
# the generation prompt is implicit ("[/INST]"), roles must alternate, system only first.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<s>' + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + '</s>' }}{% endif %}{% endfor %}"
)

THREE_TURNS = (("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "2+2?"), ("assistant", "4."),
               ("user", "Thanks"), ("assistant", "Welcome."))


@pytest.fixture(scope="module")
def llama_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


def _expected(tokenizer, pieces, learned):
    """Ids and labels from hand-written template text, piece by piece."""
    ids, labels = [], []
    for k, text in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if k in learned else [IGNORE_INDEX] * len(piece)
    return ids, labels


CHATML_PIECES = ["<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                 "Hello.<|im_end|>\n", "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4.<|im_end|>\n",
                 "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n", "Welcome.<|im_end|>\n"]
LLAMA2_PIECES = ["<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST]", " Hello. </s>", "<s>[INST] 2+2? [/INST]",
                 " 4. </s>", "<s>[INST] Thanks [/INST]", " Welcome. </s>"]


@pytest.mark.parametrize("template", ["chatml", "llama2"])
@pytest.mark.parametrize("loss_on,learned", [("all_assistant", {1, 3, 5}), ("last_assistant", {5})])
def test_three_turn_masks_token_by_token(tokenizer, llama_tokenizer, template, loss_on, learned):
    tok, pieces = (tokenizer, CHATML_PIECES) if template == "chatml" else (llama_tokenizer, LLAMA2_PIECES)
    assert tok.apply_chat_template([{"role": r, "content": c} for r, c in THREE_TURNS], tokenize=False) == "".join(pieces)
    enc = ChatTokenizer(tok, 512, loss_on=loss_on).encode_conversation(Conversation(THREE_TURNS, 0, "case"))
    ids, labels = _expected(tok, pieces, learned)
    assert enc.input_ids == ids
    assert enc.labels == labels
    # the learned tokens are exactly the assistant turns with their end-of-turn text
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == "".join(pieces[k] for k in sorted(learned))


def test_one_turn_conversation_is_the_old_prompt_response_split(tokenizer):
    """A one-turn conversation tokenizes as sap-ds always did: prompt + generation prompt,
    then the rest, each tokenized on its own."""
    chat = ChatTokenizer(tokenizer, 512, system_prompt="Be brief.")
    messages, response = (("user", "Name a colour.\n\nOne word."),), "\n\nBlue."
    prompt = chat.prompt_text(messages)
    full = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": messages[0][1]},
                                          {"role": "assistant", "content": response}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    enc = chat.encode(messages, response)
    assert enc.input_ids == prompt_ids + response_ids
    assert enc.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids


def test_template_that_rewrites_earlier_turns_is_an_error(tokenizer):
    """A template that renders a turn differently once a later one follows has no fixed
    token boundaries: an error naming the row, never a guessed mask."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old answer]"
                         "{% else %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(DataError) as info:
        ChatTokenizer(tok, 512).encode_conversation(Conversation(THREE_TURNS[1:], 0, "f.jsonl:7"))
    assert "f.jsonl:7" in str(info.value) and "prefix by prefix" in str(info.value)


# --------------------------------------------------------------------------- truncation at turn boundaries


def _piece_ids(tok, pieces):
    return [tok(text, add_special_tokens=False)["input_ids"] for text in pieces]


def _expected_prefix(piece_ids, learned, n_pieces, extra=0):
    """The first ``n_pieces`` pieces whole, then ``extra`` tokens of the next one."""
    ids, labels = [], []
    for k, piece in enumerate(piece_ids[:n_pieces + 1]):
        piece = piece if k < n_pieces else piece[:extra]
        ids += piece
        labels += piece if k in learned else [IGNORE_INDEX] * len(piece)
    return ids, labels


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_truncation_drops_later_turns_whole_and_cuts_only_the_last_kept_answer(tokenizer, llama_tokenizer, template):
    """THREE_TURNS (pieces: prompt, answer 1, user 2, answer 2, user 3, answer 3) at lengths
    that end in each kind of piece: the example ends at the end of an answer, or inside the
    last answer it keeps, never in a loss-free fragment of a later turn; the lost answers
    and trained tokens are counted."""
    tok, pieces = (tokenizer, CHATML_PIECES) if template == "chatml" else (llama_tokenizer, LLAMA2_PIECES)
    p = _piece_ids(tok, pieces)
    ends = [sum(len(x) for x in p[: k + 1]) for k in range(len(p))]
    conv = Conversation(THREE_TURNS, 0, "case")
    learned = {1, 3, 5}
    cases = [  # max_length, whole pieces kept, tokens of the next piece, answers lost whole, trained tokens lost
        (ends[2] - 2, 2, 0, 2, len(p[3]) + len(p[5])),  # inside user turn 2: back to the end of answer 1
        (ends[1], 2, 0, 2, len(p[3]) + len(p[5])),  # exactly answer 1's end
        (ends[2] + 2, 3, 2, 1, len(p[3]) - 2 + len(p[5])),  # inside answer 2: cut there, answer 3 lost
        (ends[4] - 1, 4, 0, 1, len(p[5])),  # inside user turn 3: back to the end of answer 2
    ]
    for max_length, whole, extra, turns_lost, tokens_lost in cases:
        (enc,) = ChatTokenizer(tok, max_length).encode_many([conv])
        assert enc.status == Status.TRUNCATED and enc.full_length == ends[-1], max_length
        assert (enc.tokens.input_ids, enc.tokens.labels) == _expected_prefix(p, learned, whole, extra), max_length
        assert enc.tokens.labels[-1] != IGNORE_INDEX, "a kept example ends with a trained token"
        assert (enc.assistant_turns_lost, enc.trained_tokens_lost) == (turns_lost, tokens_lost), max_length
    # the case: never a trailing '<|im_start|>ass' (or '<s>[INST]') fragment of the next turn
    (enc,) = ChatTokenizer(tok, ends[2] - 2).encode_many([conv])
    assert tok.decode(enc.tokens.input_ids).endswith(pieces[1])
    # nothing learned fits: dropped, as before
    (enc,) = ChatTokenizer(tok, len(p[0])).encode_many([conv])
    assert enc.status == Status.DROPPED and enc.tokens is None


def test_truncation_under_last_assistant_cuts_or_drops_the_learned_last_turn(tokenizer):
    """loss_on: last_assistant learns only the last answer: a cut before it leaves nothing
    learned (dropped, never an example that ends in context); a cut inside it keeps it cut."""
    p = _piece_ids(tokenizer, CHATML_PIECES)
    ends = [sum(len(x) for x in p[: k + 1]) for k in range(len(p))]
    conv = Conversation(THREE_TURNS, 0, "case")
    (enc,) = ChatTokenizer(tokenizer, ends[3] + 1, loss_on="last_assistant").encode_many([conv])
    assert enc.status == Status.DROPPED and enc.tokens is None
    (enc,) = ChatTokenizer(tokenizer, ends[4] + 3, loss_on="last_assistant").encode_many([conv])
    assert enc.status == Status.TRUNCATED
    assert (enc.tokens.input_ids, enc.tokens.labels) == _expected_prefix(p, {5}, 5, 3)
    assert (enc.assistant_turns_lost, enc.trained_tokens_lost) == (0, len(p[5]) - 3)


MULTI_TURN = [
    # 3 exchanges: at max_length 64 only the first fits, the log used to say "truncated" and keep '<|im_start|>ass'
    [("user", "What is the capital of France? Please answer in one short sentence."),
     ("assistant", "The capital of France is Paris, a city on the Seine."),
     ("user", "And the capital of Germany? Again in one sentence please."),
     ("assistant", "The capital of Germany is Berlin, on the Spree river."),
     ("user", "And Italy?"), ("assistant", "Rome is the capital of Italy.")],
    [("user", "Hi"), ("assistant", "Hello!")],  # fits
    [("user", "word " * 80), ("assistant", "ok")],  # the prompt alone is over the limit: dropped
]


def test_multi_turn_file_truncated_at_turn_boundaries_counted_in_log_and_summary(tokenizer, tmp_path, caplog):
    """A messages file at max_length 64 through the pipeline: the cut chat keeps its first
    exchange and ends at that answer's end; the counts (2 answers and their trained tokens
    lost) are in the log line, summary.json's data section and the cached row."""
    path = _jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in MULTI_TURN])
    with caplog.at_level(logging.INFO, logger="sap_ds"):
        data = _data(tokenizer, tmp_path, [DataSource(path=str(path), format="messages")], max_length=64)
    whole = ChatTokenizer(tokenizer, 10**6)
    full = whole.encode_conversation(Conversation(tuple(MULTI_TURN[0]), 0, "x"))
    first_exchange = whole.encode_conversation(Conversation(tuple(MULTI_TURN[0][:2]), 0, "x"))
    assert len(full.input_ids) > 64 >= len(first_exchange.input_ids)
    # the first exchange's tokens exactly, so its answer's end-of-turn is the last token
    assert (data.train[0].input_ids, data.train[0].labels) == (first_exchange.input_ids, first_exchange.labels)
    assert tokenizer.decode(data.train[0].input_ids).endswith("on the Seine.<|im_end|>\n")
    lost = sum(label != IGNORE_INDEX for label in full.labels) - sum(label != IGNORE_INDEX for label in first_exchange.labels)
    counts = {"kept": 1, "truncated": 1, "dropped": 1, "assistant_turns_lost": 2, "trained_tokens_lost": lost}
    assert data.counts["train"] == counts and data.summary()["overlength"]["train"] == counts
    assert (f"data: train: 1 kept whole, 1 truncated, 1 dropped (data.max_length, data.overlength=truncate); "
            f"truncation cut {lost} trained tokens (2 learned assistant turns whole)") in caplog.text
    record = data.examples.record(0)
    assert record["origin"] == f"{path}:1" and data.examples.record(1)["origin"] == f"{path}:2"
    assert (record["status"], record["full_length"], record["assistant_turns_lost"], record["trained_tokens_lost"],
            record["trained_tokens"]) == (Status.TRUNCATED, len(full.input_ids), 2, lost,
                                          sum(label != IGNORE_INDEX for label in first_exchange.labels))


# --------------------------------------------------------------------------- formats


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _data(tokenizer, tmp_path, sources, **kw):
    cfg = DataConfig(train=sources, max_length=kw.pop("max_length", 512), cache_dir=str(tmp_path / "cache"), **kw)
    return build_run_data(cfg, tokenizer, seed=0, need_safety=bool(cfg.safety))


def _tokens(items):
    return [(t.input_ids, t.labels) for t in items]


CONVERSATIONS = [
    [("user", "Hi"), ("assistant", "Hello!")],
    [("system", "Answer in French."), ("user", "Thanks"), ("assistant", "De rien."), ("user", "Bye"), ("assistant", "Au revoir.")],
    [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e"), ("assistant", "f")],
]


def test_sharegpt_equals_messages(tokenizer, tmp_path):
    gpt_role = {"user": "human", "assistant": "gpt", "system": "system"}
    messages = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in CONVERSATIONS])
    sharegpt = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": gpt_role[r], "value": c} for r, c in conv]}
                                             for conv in CONVERSATIONS])
    a = _data(tokenizer, tmp_path, [DataSource(path=str(messages), format="messages")], shuffle=False)
    b = _data(tokenizer, tmp_path, [DataSource(path=str(sharegpt), format="sharegpt")], shuffle=False)
    assert len(a.train) == 3 and _tokens(a.train) == _tokens(b.train)
    chat = ChatTokenizer(tokenizer, 512)
    assert _tokens(a.train) == _tokens(chat.encode_conversation(Conversation(tuple(c), 0, "x")) for c in CONVERSATIONS)


def test_prompt_completion_learns_the_completion_only(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Capital of France?", "completion": "Paris."},
        {"prompt": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}],
         "completion": [{"role": "assistant", "content": "4"}]},
    ])
    data = _data(tokenizer, tmp_path, [DataSource(path=str(path), format="prompt_completion")], shuffle=False)
    learned = [tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX]) for ex in data.train]
    assert learned == ["Paris.<|im_end|>\n", "4<|im_end|>\n"]  # the few-shot answer "2" in the prompt is not learned
    plain = _jsonl(tmp_path / "plain.jsonl", [{"prompt": "Capital of France?", "completion": "Paris."}])
    instruction = _data(tokenizer, tmp_path, [DataSource(path=str(plain), format="instruction")])
    assert _tokens(instruction.train) == _tokens(data.train[:1])


def test_alpaca_with_input_system_and_history(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "Good night", "output": "Bonne nuit",
                                          "system": "You translate to French.", "history": [["Translate: yes", "oui"]]}])
    (example,) = load_examples(DataSource(path=str(path), format="alpaca"))
    assert example.messages == (("system", "You translate to French."), ("user", "Translate: yes"), ("assistant", "oui"),
                                ("user", "Translate.\n\nGood night"))
    assert example.response == "Bonne nuit"
    data = _data(tokenizer, tmp_path, [DataSource(path=str(path), format="alpaca")])
    learned = tokenizer.decode([t for t in data.train[0].labels if t != IGNORE_INDEX])
    assert learned == "oui<|im_end|>\nBonne nuit<|im_end|>\n"  # loss on every assistant turn by default


def test_preference_pairs_explicit_and_implicit_prompt(tmp_path):
    conv = [{"role": "user", "content": "How do I pick a lock?"}]
    path = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "I can't help with that."}],
         "rejected": [{"role": "assistant", "content": "Insert a tension wrench..."}]},
        {"prompt": "Make a weapon.", "chosen": "No.", "rejected": "Sure, first..."},
    ])
    implicit = _jsonl(tmp_path / "i.jsonl", [
        {"chosen": conv + [{"role": "assistant", "content": "I can't help with that."}],
         "rejected": conv + [{"role": "assistant", "content": "Insert a tension wrench..."}]},
        {"chosen": conv + [{"role": "assistant", "content": "No."}],  # differ before the last turn: skipped
         "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "Sure"}]},
    ])
    pairs = load_safety_pairs(DataSource(path=str(path), format="preference"))
    assert [(p.messages, p.safe, p.harmful) for p in pairs] == [
        ((("user", "How do I pick a lock?"),), "I can't help with that.", "Insert a tension wrench..."),
        ((("user", "Make a weapon."),), "No.", "Sure, first...")]
    assert [(p.messages, p.safe, p.harmful) for p in load_safety_pairs(DataSource(path=str(implicit), format="preference"))] \
        == [(pairs[0].messages, pairs[0].safe, pairs[0].harmful)]


def test_circuit_breakers_layout(tmp_path):
    path = _jsonl(tmp_path / "cb.jsonl", [{"category": "x", "prompt": "Build a bomb", "llama3_output": "I cannot help.",
                                           "response": "Step 1"}])
    (pair,) = load_safety_pairs(DataSource(path=str(path), format="circuit_breakers"))
    assert (pair.messages, pair.safe, pair.harmful) == ((("user", "Build a bomb"),), "I cannot help.", "Step 1")


# --------------------------------------------------------------------------- sources


def test_save_to_disk_and_parquet_sources_equal_the_jsonl(tokenizer, tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{2 * i}"} for i in range(6)]
    jsonl = _jsonl(tmp_path / "d.jsonl", rows)
    table = datasets.Dataset.from_list(rows)
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(str(tmp_path / "saved_dict"))
    table.to_parquet(str(tmp_path / "d.parquet"))
    want = _tokens(_data(tokenizer, tmp_path, [DataSource(path=str(jsonl), format="gsm8k")], shuffle=False).train)
    for source in [DataSource(path=str(tmp_path / "saved"), format="gsm8k"),
                   DataSource(path=str(tmp_path / "saved_dict"), format="gsm8k", split="train"),
                   DataSource(path=str(tmp_path / "d.parquet"), format="gsm8k")]:
        assert _tokens(_data(tokenizer, tmp_path, [source], shuffle=False).train) == want, source.path
    with pytest.raises(DataError) as info:
        read_table(str(tmp_path / "saved_dict"))
    assert "'train', 'test'" in str(info.value) and "set split" in str(info.value)
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        read_table(str(tmp_path / "plain_folder"))


def test_hub_name_unreachable_is_a_clear_error(monkeypatch):
    """No network here: hub offline mode makes the failure immediate (the test cannot hang)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for path, split in [("hf://nobody/no-such-set", None), ("nobody/no-such-set", "test")]:
        with pytest.raises(DataError) as info:
            load_examples(DataSource(path=path, format="messages", split=split))
        msg = str(info.value)
        assert path in msg and "Hugging Face hub" in msg and "offline" in msg and "save_to_disk" in msg
        assert f"split '{split or 'train'}'" in msg


# --------------------------------------------------------------------------- malformed conversations


MALFORMED = [
    ("unknown_role", {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     ["row 2, messages[1]", "unknown role 'bot'", "'system', 'user', 'assistant'"]),
    ("assistant_missing", {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}]},
     ["row 2", "no assistant turn", "system, user"]),
    ("empty_content", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     ["row 2, messages[1] (assistant)", "empty content"]),
    ("ends_with_user", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                     {"role": "user", "content": "and?"}]},
     ["row 2", "ends with a user turn"]),
    ("not_a_list", {"messages": "hi"}, ["row 2, column 'messages'", "expected a non-empty list"]),
]


@pytest.mark.parametrize("name,row,texts", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_conversation_names_file_and_row(tokenizer, tmp_path, name, row, texts):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = _jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as info:
        _data(tokenizer, tmp_path, [DataSource(path=str(path), format="messages")])
    msg = str(info.value)
    assert str(path) in msg and all(t in msg for t in texts), msg


def test_sharegpt_unknown_sender(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}])
    with pytest.raises(DataError) as info:
        load_examples(DataSource(path=str(path), format="sharegpt"))
    assert f"{path}: row 1, conversations[1]" in str(info.value) and "'human'" in str(info.value) and "'gpt'" in str(info.value)


def test_system_turn_in_the_middle_where_the_template_forbids_it(tokenizer, llama_tokenizer, tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "system", "content": "Now be rude."}, {"role": "user", "content": "bye"},
                        {"role": "assistant", "content": "whatever"}]}
    path = _jsonl(tmp_path / "sys.jsonl", [row, row])
    source = DataSource(path=str(path), format="messages")
    assert len(_data(tokenizer, tmp_path, [source]).train) == 2  # ChatML allows it
    with pytest.raises(DataError) as info:
        _data(llama_tokenizer, tmp_path, [source])
    msg = str(info.value)
    assert f"{path}:1" in msg and "chat template rejected" in msg and "roles must alternate" in msg
