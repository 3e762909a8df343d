"""``sap-ds data`` (sap_ds/data_cli.py) through the real CLI entry point: the shipped tiny
config and a multi-turn chat file, the trained tokens marked, each example's file:row, what
truncation and packing did, the cache shared with the training run, and bad arguments."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from sap_ds.cli import main as cli
from sap_ds.config.run import load_config
from sap_ds.data import IGNORE_INDEX, ChatTokenizer, Conversation, build_run_data
from sap_ds.data_cli import CLOSE, GREEN, OPEN
from tests.support.launch import run_single

REPO = Path(__file__).resolve().parents[1]
MARKED = re.compile(re.escape(OPEN) + "(.*?)" + re.escape(CLOSE), re.S)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _blocks(out: str) -> dict[int, str]:
    """Example index -> its block (header lines and decoded text)."""
    parts = re.split(r"\n\n(?==== )", out)
    return {int(re.match(r"=== \w+ (\d+) of", p).group(1)): p for p in parts if p.startswith("=== ")}


def _learned_text(tokenizer, labels) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_data_command_on_tiny_marks_trained_tokens_with_origin_and_shares_the_training_cache(tokenizer, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli(["data", "--config", "tiny", f"data.cache_dir={cache}", "--show", "2", "--start", "3"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("tiny", [f"data.cache_dir={cache}"])
    data = build_run_data(cfg.data, tokenizer, cfg.seed, need_safety=False)
    assert data.cache_hit, "the command prepared the cache of this config"
    c = data.counts["train"]
    assert (f"train: 37 of 64 kept: {c['kept']} whole, {c['truncated']} truncated, 27 dropped (data.max_length=96, "
            f"data.overlength=truncate); truncation cut {c['trained_tokens_lost']} trained tokens") in out
    assert f"cache: {data.cache_dir} (prepared now)" in out
    blocks = _blocks(out)
    assert sorted(blocks) == [3, 4]
    rows = [json.loads(line) for line in (REPO / "data/gsm8k/train.jsonl").read_text().splitlines()]
    for i, block in blocks.items():
        record = data.examples.record(i)
        file, row = record["origin"].rsplit(":", 1)
        assert f"=== train {i} of 37: {file}:{row} ===" in block and Path(file) == REPO / "data/gsm8k/train.jsonl"
        assert rows[int(row) - 1]["question"].strip() in block  # the origin is the row the text came from
        # the marked text is exactly the trained tokens, and nothing else is marked
        assert "".join(MARKED.findall(block)) == _learned_text(tokenizer, record["labels"])
        if record["status"] == 1:
            assert (f"truncated (it had {record['full_length']} tokens, data.max_length=96): cut "
                    f"{record['trained_tokens_lost']} trained tokens (0 learned assistant turns whole)") in block
    # the training run reads the folder the command prepared: same pipeline, tokenizer and fingerprint
    out_dir = tmp_path / "run"
    proc = run_single(["--config", "configs/tiny.yaml", f"output_dir={out_dir}", f"data.cache_dir={cache}",
                       "train.max_steps=1", "train.eval_every=0", "export.enabled=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())["data"]
    assert summary["cache_hit"] and summary["cache_dir"] == str(data.cache_dir)


CHATS = [
    [("user", "What is the capital of France? Please answer in one short sentence."),
     ("assistant", "The capital of France is Paris, a city on the Seine."),
     ("user", "And the capital of Germany? Again in one sentence please."),
     ("assistant", "The capital of Germany is Berlin, on the Spree river."),
     ("user", "And Italy?"), ("assistant", "Rome is the capital of Italy.")],
    [("user", "Hi"), ("assistant", "Hello!")],
    [("user", "Thanks"), ("assistant", "You are welcome.")],
]


SYSTEM = "Be brief."  # short, so that the two short chats fit one pack of 64 tokens


def _chat_config(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in CHATS]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"run_name": "chats", "output_dir": str(tmp_path / "run"), "model": {"path": "tiny-random", "dtype": "fp32"},
              "data": {"train": [{"path": "chats.jsonl", "format": "messages"}], "max_length": 64, "system_prompt": SYSTEM,
                       "cache_dir": str(tmp_path / "cache")}}
    path = tmp_path / "chats.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_data_command_on_a_multi_turn_file_notes_truncation_and_packing(tokenizer, tmp_path, capsys):
    config = _chat_config(tmp_path)
    assert cli(["data", "--config", str(config), "--show", "3"]) == 0
    out = capsys.readouterr().out
    chats = tmp_path / "chats.jsonl"
    whole = ChatTokenizer(tokenizer, 10**6, system_prompt=SYSTEM)
    full = whole.encode_conversation(Conversation(tuple(CHATS[0]), 0, "x"))
    kept = whole.encode_conversation(Conversation(tuple(CHATS[0][:2]), 0, "x"))
    trained = sum(t != IGNORE_INDEX for t in kept.labels)
    lost = sum(t != IGNORE_INDEX for t in full.labels) - trained
    assert (f"train: 3 of 3 kept: 2 whole, 1 truncated, 0 dropped (data.max_length=64, data.overlength=truncate); "
            f"truncation cut {lost} trained tokens (2 learned assistant turns whole)") in out
    blocks = _blocks(out)
    first = blocks[0]
    assert f"=== train 0 of 3: {chats}:1 ===" in first and f"=== train 2 of 3: {chats}:3 ===" in blocks[2]
    assert (f"{len(kept.input_ids)} tokens, {trained} trained; truncated (it had {len(full.input_ids)} tokens, "
            f"data.max_length=64): cut {lost} trained tokens (2 learned assistant turns whole)") in first
    # it ends with the first answer, marked, at its end of turn: no fragment of the next user turn
    assert first.endswith(f"{OPEN}The capital of France is Paris, a city on the Seine.<|im_end|>\n{CLOSE}")
    assert "Germany" not in first
    assert "kept whole" in blocks[1] and "kept whole" in blocks[2]

    # packed: each example says which pack it is in and who shares it
    assert cli(["data", "--config", str(config), "data.packing=true", "--show", "3"]) == 0
    packed = _blocks(capsys.readouterr().out)
    cfg = load_config(config, ["data.packing=true"])
    data = build_run_data(cfg.data, tokenizer, cfg.seed, need_safety=False)
    members = data.train.members
    assert data.cache_hit and len(members) < 3, "two examples share a pack"
    for p, pack in enumerate(members):
        for i in pack:
            others = ", ".join(str(j) for j in pack if j != i) or "none"
            assert (f"packed: pack {p} of {len(members)} ({int(data.train.lengths[p])} of 64 tokens), "
                    f"shared with train {others}") in packed[i]

    # on a terminal (or --color always): coloured, not bracketed
    assert cli(["data", "--config", str(config), "--show", "1", "--color", "always"]) == 0
    coloured = capsys.readouterr().out
    assert GREEN in coloured and OPEN not in coloured


def test_data_command_random_pick_safety_split_mixes_and_bad_arguments(tokenizer, tmp_path, capsys):
    config = _chat_config(tmp_path)
    assert cli(["data", "--config", str(config), "--show", "2", "--random", "--seed", "1"]) == 0
    assert len(_blocks(capsys.readouterr().out)) == 2
    assert cli(["data", "--config", str(config), "--start", "3"]) == 2
    assert "--start 3: the train split has 3 examples; give 0 to 2" in capsys.readouterr().err
    assert cli(["data", "--config", str(config), "--split", "safety"]) == 2
    assert "--split safety: data.safety is empty; give it a source" in capsys.readouterr().err
    assert cli(["data", "--config", "tiny", f"data.cache_dir={tmp_path / 'cache'}", "--split", "safety"]) == 2
    assert "--split safety: method sft trains on no safety pairs" in capsys.readouterr().err
    # SAP's pairs: both answers shown, each with its trained tokens marked
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert cli(["data", "--config", "tiny", cache, "method=sap", "--split", "safety", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "safety pairs: 16 of 16 kept" in out
    block = _blocks(out)[0]
    assert "--- safe answer" in block and "--- harmful answer" in block and len(MARKED.findall(block)) == 2
    assert "harmful_behaviors.csv:1 ===" in block
    # the harmful mix and safety_mix's refusal demonstrations are named as such
    mix = ["method=safety_mix", "safety_mix.ratio=0.05", "data.harmful_ratio=0.25",
           "data.harmful={path: data/advbench/harmful_behaviors.csv, format: advbench, offset: 100, limit: 40}"]
    assert cli(["data", "--config", "tiny", cache, *mix, "--show", "100"]) == 0
    blocks = _blocks(capsys.readouterr().out)
    cfg = load_config("tiny", [cache, *mix])
    data = build_run_data(cfg.data, tokenizer, cfg.seed, need_safety=False, safety_mix=0.05)
    assert data.cache_hit and len(blocks) == len(data.examples) and data.n_safety_mix > 0
    demos = {i for i, b in blocks.items() if "refusal demonstration added by method safety_mix" in b}
    harmful = {i for i, b in blocks.items() if "harmful example mixed in (data.harmful" in b}
    assert demos == set(data.safety_mix_rows)
    assert harmful == {i for i in range(len(data.examples)) if i not in demos and "harmful_behaviors.csv" in
                       data.examples.record(i)["origin"]} and len(harmful) == data.n_harmful
    assert cli(["--help"]) == 0 and "\n  data " in capsys.readouterr().out
