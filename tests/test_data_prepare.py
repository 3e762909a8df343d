"""Preparing the data once (sap_ds/data/pipeline.py, cache.py, run.py): the same tokens
as the list-based pipeline sap-ds had before, the cache (a hit skips tokenizing; a new
tokenizer, max_length, seed or file misses; a failed build leaves nothing), the length
limit's counts for every policy, and two ranks sharing one build."""
from __future__ import annotations

import copy
import csv
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sap_ds.config.run import DataConfig, DataSource, load_config
from sap_ds.data import IGNORE_INDEX, ChatTokenizer, DataError, build_run_data, refusal_for
from sap_ds.data import run as run_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _tokens(items):
    return [(t.input_ids, t.labels) for t in items]


# --------------------------------------------------------------------------- same data as before


def _legacy_encode(tokenizer, prompt: str, response: str, max_length: int):
    """sap-ds's tokenization before conversations (commit f77f176): prompt with the
    generation prompt and the rest of the text, tokenized apart; None if no response token
    is left after cutting at max_length."""
    chat = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": response}], tokenize=False)
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    LEGACY_CUT.append(len(prompt_ids) + len(response_ids) > max_length)
    kept = None if all(x == IGNORE_INDEX for x in labels) else (ids, labels)
    LEGACY_LOST.append(len(response_ids) - sum(x != IGNORE_INDEX for x in labels) if kept else 0)
    return kept


LEGACY_CUT: list[bool] = []  # per _legacy_encode call: was the text longer than max_length
LEGACY_LOST: list[int] = []  # per _legacy_encode call: response tokens cut from a kept example


def test_demo_data_is_the_old_pipelines(tokenizer, tmp_path):
    """configs/demo.yaml's training, eval and safety sets, token for token and in order, as
    the list-based pipeline built them (plain-Python twin of it, from the raw files):
    `make demo`'s results depend on it."""
    cfg = load_config(REPO / "configs/demo.yaml", ["method=sap", f"data.cache_dir={tmp_path}"])
    data = build_run_data(cfg.data, tokenizer, cfg.seed, need_safety=True)
    d = cfg.data
    gsm = [json.loads(line) for line in Path("data/gsm8k/train.jsonl").read_text().splitlines()]
    task = [(r["question"].strip(), r["answer"].strip()) for r in gsm][: d.train[0].limit]
    test = [json.loads(line) for line in Path("data/gsm8k/test.jsonl").read_text().splitlines()][: d.eval[0].limit]
    with open("data/advbench/harmful_behaviors.csv", newline="") as handle:
        adv = [(r["goal"].strip(), r["target"].strip()) for r in csv.DictReader(handle)]
    harmful = adv[d.harmful.offset : d.harmful.offset + d.harmful.limit]
    rng = random.Random(cfg.seed)
    n_harmful = round(d.harmful_ratio * len(task))
    mixed = rng.sample(task, len(task) - n_harmful) + rng.sample(harmful, n_harmful)
    rng.shuffle(mixed)
    LEGACY_CUT.clear()
    LEGACY_LOST.clear()
    train = [e for e in (_legacy_encode(tokenizer, p, r, d.max_length) for p, r in mixed) if e]
    n_cut, n_lost = sum(LEGACY_CUT), sum(LEGACY_LOST)
    evals = [e for e in (_legacy_encode(tokenizer, r["question"].strip(), r["answer"].strip(), d.max_length) for r in test) if e]
    pairs = []
    for goal, target in adv[: d.safety[0].limit]:
        safe = _legacy_encode(tokenizer, goal, refusal_for(goal), d.safety_max_length)
        harm = _legacy_encode(tokenizer, goal, target, d.safety_max_length)
        if safe and harm:
            pairs.append((safe, harm))
    assert data.n_harmful == n_harmful == 20
    assert _tokens(data.train) == train and len(train) == 199  # one GSM8K prompt is longer than 160 tokens
    assert _tokens(data.eval) == evals
    assert [((p.safe.input_ids, p.safe.labels), (p.harmful.input_ids, p.harmful.labels)) for p in data.safety] == pairs
    # counted, not silent: 1 dropped (no response token left), the cut ones truncated, and the
    # response tokens they lost (one-turn: no whole turn is lost, the one learned turn is cut)
    assert n_lost > 0
    assert data.counts["train"] == {"kept": len(mixed) - n_cut, "truncated": n_cut - 1, "dropped": 1,
                                    "assistant_turns_lost": 0, "trained_tokens_lost": n_lost}


# --------------------------------------------------------------------------- the cache


def _cfg(tmp_path, **kw):
    return DataConfig(train=[DataSource(path="data/gsm8k/train.jsonl", format="gsm8k", limit=8)],
                      eval=[DataSource(path="data/gsm8k/test.jsonl", format="gsm8k", limit=3)],
                      safety=[DataSource(path="data/advbench/harmful_behaviors.csv", format="safety_pairs", limit=4)],
                      max_length=128, safety_max_length=64, cache_dir=str(tmp_path / "cache"), **kw)


def test_cache_hit_skips_tokenizing_and_what_invalidates_it(tokenizer, tmp_path, monkeypatch, caplog):
    calls = []
    encode_many = ChatTokenizer.encode_many
    monkeypatch.setattr(ChatTokenizer, "encode_many", lambda self, convs: calls.append(len(convs)) or encode_many(self, convs))
    cfg = _cfg(tmp_path)
    first = build_run_data(cfg, tokenizer, 0, need_safety=True)
    assert not first.cache_hit and sum(calls) == 8 + 3 + 2 * 4  # every example once, both sides of each pair
    calls.clear()
    with caplog.at_level(logging.INFO, logger="sap_ds"):
        again = build_run_data(cfg, tokenizer, 0, need_safety=True)
    assert again.cache_hit and calls == [], "a cache hit tokenized again"
    assert "data: loaded from cache" in caplog.text and str(again.cache_dir) in caplog.text
    assert _tokens(again.train) == _tokens(first.train) and _tokens(again.eval) == _tokens(first.eval)
    assert [p.harmful.input_ids for p in again.safety] == [p.harmful.input_ids for p in first.safety]
    # memory-mapped from the cache folder, not read into memory
    assert all(Path(f["filename"]).is_relative_to(again.cache_dir) for f in again.examples.table.cache_files)

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<new-token>"])
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(Path("data/gsm8k/train.jsonl").read_text().splitlines(keepends=True)[:3]))
    changes = {
        "max_length": (cfg.model_copy(update={"max_length": 100}), tokenizer, 0),
        "tokenizer": (cfg, other, 0),
        "seed": (cfg, tokenizer, 1),
        "loss_on": (cfg.model_copy(update={"loss_on": "last_assistant"}), tokenizer, 0),
        "system_prompt": (cfg.model_copy(update={"system_prompt": "Be brief."}), tokenizer, 0),
    }
    for name, (changed, tok, seed) in changes.items():
        calls.clear()
        assert not build_run_data(changed, tok, seed, need_safety=True).cache_hit and calls, name
    file_cfg = cfg.model_copy(update={"train": [DataSource(path=str(data_file), format="gsm8k")]})
    assert not build_run_data(file_cfg, tokenizer, 0, need_safety=True).cache_hit
    assert build_run_data(file_cfg, tokenizer, 0, need_safety=True).cache_hit
    data_file.write_text(data_file.read_text().replace("?", "??"))  # new content, new size and mtime
    assert not build_run_data(file_cfg, tokenizer, 0, need_safety=True).cache_hit


def test_pipeline_version_is_part_of_the_cache_key(tokenizer, tmp_path, monkeypatch):
    """A new pipeline version (cache.VERSION, raised when the tokens or the rows' columns
    change, e.g. turn-boundary truncation) misses the caches an older one wrote; and the
    cached rows carry what the current pipeline records (file:row and the length limit's
    record), so a folder of version 1 could not serve `sap-ds data`."""
    from sap_ds.data import cache as cache_module
    from sap_ds.data.pipeline import RECORD_COLUMNS

    cfg = _cfg(tmp_path)
    first = build_run_data(cfg, tokenizer, 0, need_safety=True)
    assert set(RECORD_COLUMNS) <= set(first.examples.table.column_names) and set(RECORD_COLUMNS) <= set(
        first.safety.table.column_names)
    assert cache_module.VERSION >= 2  # version 1 truncated mid-turn and kept no record per row
    assert build_run_data(cfg, tokenizer, 0, need_safety=True).cache_hit
    monkeypatch.setattr(cache_module, "VERSION", cache_module.VERSION + 1)
    again = build_run_data(cfg, tokenizer, 0, need_safety=True)
    assert not again.cache_hit and again.cache_dir != first.cache_dir


def test_failed_preparation_leaves_no_folder(tokenizer, tmp_path, monkeypatch):
    """Atomic: a build that dies after writing its tables leaves neither the cache folder
    nor its temporary folder, and the next run builds from scratch."""
    real = run_module.build

    def dies_at_the_end(folder, *args):
        real(folder, *args)
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "build", dies_at_the_end)
    with pytest.raises(OSError, match="disk full"):
        build_run_data(_cfg(tmp_path), tokenizer, 0, need_safety=True)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(run_module, "build", real)
    assert not build_run_data(_cfg(tmp_path), tokenizer, 0, need_safety=True).cache_hit


def test_two_ranks_share_one_build_and_one_error(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(5)))
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": ""}\n')
    proc = subprocess.run([sys.executable, "tests/support/data_rank_runner.py", str(tmp_path), str(tmp_path / "cache"), str(good), str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["n"] == r1["n"] == 5 and r0["tokens"] == r1["tokens"]
    assert (r0["builds"], r1["builds"]) == (2, 0), "only the node's first rank prepares the data"
    assert r0["error"] == r1["error"] and f"{bad}: row 2: empty response" in r0["error"]


# --------------------------------------------------------------------------- the length limit


def _lengths_file(tmp_path) -> Path:
    rows = [{"question": "Hi?", "answer": "Hello."},  # fits
            {"question": "Count.", "answer": " ".join(str(i) for i in range(80))},  # response cut
            {"question": "word " * 120, "answer": "ok"},  # prompt alone is over the limit
            {"question": "And?", "answer": "Fine."}]
    path = tmp_path / "lengths.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("policy,train,safety", [
    ("truncate", {"kept": 2, "truncated": 1, "dropped": 1}, {"kept": 1, "truncated": 1, "dropped": 1}),
    ("drop", {"kept": 2, "truncated": 0, "dropped": 2}, {"kept": 1, "truncated": 0, "dropped": 2}),
])
def test_overlength_counts(tokenizer, tmp_path, caplog, policy, train, safety):
    path = _lengths_file(tmp_path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("goal,target\nDo harm,Sure\nExplain harm," + "very " * 60 + "harmful\n" + "word " * 120 + ",Sure\n")
    cfg = DataConfig(train=[DataSource(path=str(path), format="gsm8k")], eval=[DataSource(path=str(path), format="gsm8k")],
                     safety=[DataSource(path=str(pairs), format="safety_pairs")], max_length=64, safety_max_length=64,
                     overlength=policy, eval_max_examples=3, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="sap_ds"):
        data = build_run_data(cfg, tokenizer, 0, need_safety=True)
    # what the truncated ones lost: the cut one-turn response's tail (its one learned turn is cut, not lost whole)
    whole = ChatTokenizer(tokenizer, 10**6)
    cut_response = whole.encode((("user", "Count."),), " ".join(str(i) for i in range(80)))
    cut_answer = whole.encode((("user", "Explain harm"),), ("very " * 60 + "harmful").strip())
    lost = {"train": len(cut_response.input_ids) - 64 if policy == "truncate" else 0,
            "safety": len(cut_answer.input_ids) - 64 if policy == "truncate" else 0}
    train = {**train, "assistant_turns_lost": 0, "trained_tokens_lost": lost["train"]}
    safety = {**safety, "assistant_turns_lost": 0, "trained_tokens_lost": lost["safety"]}
    assert data.counts["train"] == train and data.counts["safety"] == safety
    assert len(data.train) == train["kept"] + train["truncated"] and len(data.safety) == safety["kept"] + safety["truncated"]
    assert max(len(t.input_ids) for t in data.train) <= 64
    summary = data.summary()
    assert summary["overlength"]["train"] == train and summary["eval_available"] == 4
    assert json.loads(json.dumps(summary)) == summary  # goes into summary.json as is
    cut = f"; truncation cut {lost['train']} trained tokens (0 learned assistant turns whole)" if policy == "truncate" else ""
    assert (f"data: train: {train['kept']} kept whole, {train['truncated']} truncated, {train['dropped']} dropped "
            f"(data.max_length, data.overlength={policy}){cut}\n") in caplog.text
    assert "the first 3 of 4 eval examples are used (data.eval_max_examples=3)" in caplog.text


def test_overlength_error_names_the_examples(tokenizer, tmp_path):
    path = _lengths_file(tmp_path)
    cfg = DataConfig(train=[DataSource(path=str(path), format="gsm8k")], max_length=64, overlength="error",
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        build_run_data(cfg, tokenizer, 0, need_safety=False)
    msg = str(info.value)
    assert "data.train: 2 of 4 examples are longer than data.max_length=64" in msg
    assert f"{path}:2 (" in msg and f"{path}:3 (" in msg and "data.overlength" in msg and "'truncate'" in msg
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
