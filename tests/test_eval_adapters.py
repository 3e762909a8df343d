"""A LoRA adapter folder is evaluated on its base model, merged in memory: the same
answers and test loss as the merged model saved to disk, and not those of the base
alone (the adapter's B matrices are non-zero, so it changes the model). Nothing is
trained: the adapter is a random PEFT LoRA on the tiny model."""
import json

import pytest
import yaml

from sap_ds.eval import main
from tests.support.repo import with_repo_paths

EVAL = {
    "seed": 3,
    "harmful": [{"name": "advbench", "path": "data/advbench/harmful_behaviors.csv", "offset": 300, "limit": 3}],
    "benign": [{"name": "harmless", "path": "data/adversariallm/refusal_direction/harmless_val.json", "limit": 3}],
    "generation": {"max_new_tokens": 6, "batch_size": 3},
    "tasks": [{"kind": "test_loss", "name": "loss", "path": "data/gsm8k/test.jsonl", "format": "gsm8k", "limit": 3,
               "max_length": 96}],
}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    from tests.support.repo import REPO

    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory, tiny_model_path):
    """(adapter folder, merged folder) of one random LoRA on the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sap_ds.model.loading import load_tokenizer

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    # init_lora_weights=False: B is random too (PEFT's default B = 0 would change nothing)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)  # large enough to change greedy answers of the random model
    model.save_pretrained(root / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    load_tokenizer(tiny_model_path).save_pretrained(root / "merged")
    return root / "adapter", root / "merged"


def _evaluate(tmp_path, model, name, *extra):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(with_repo_paths(EVAL)))
    assert main(["--model", str(model), "--config", str(config), "--out", str(tmp_path / name), *extra]) == 0
    return json.loads((tmp_path / name / "eval.json").read_text())


def test_adapter_equals_merged(tmp_path, lora_folders, tiny_model_path):
    adapter, merged = lora_folders
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_path)
    from_adapter = _evaluate(tmp_path, adapter, "adapter")
    from_merged = _evaluate(tmp_path, merged, "merged")
    base = _evaluate(tmp_path, tiny_model_path, "base")
    assert from_adapter["adapter"] == str(adapter) and from_adapter["model_path"] == str(tiny_model_path)
    assert "adapter on" in (tmp_path / "adapter" / "eval.md").read_text()

    def answers(result):
        return [r["response"] for part in ("harmful", "benign") for r in result["records"][part]]

    assert answers(from_adapter) == answers(from_merged)
    loss = from_adapter["metrics"]["tasks"]["loss"]["loss"]
    assert loss == pytest.approx(from_merged["metrics"]["tasks"]["loss"]["loss"], rel=1e-5)
    assert loss != pytest.approx(base["metrics"]["tasks"]["loss"]["loss"], rel=1e-3)  # the adapter does something
    assert answers(base) != answers(from_adapter)
    assert from_adapter["metrics"]["over_refusal"]["n"] == 3  # the benign set is part of every eval


def test_adapter_base_errors(tmp_path, lora_folders, tiny_model_path, capsys):
    """A base that is not a local folder (moved, or a hub name) names the file and --base;
    --base fixes it; nothing is written on failure."""
    adapter, _ = lora_folders
    moved = tmp_path / "moved_adapter"
    moved.mkdir()
    for f in adapter.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    settings = json.loads((moved / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = "meta-llama/Llama-2-7b-chat-hf"
    (moved / "adapter_config.json").write_text(json.dumps(settings))
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(with_repo_paths({**EVAL, "tasks": []})))
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text("previous")
    assert main(["--model", str(moved), "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json: base_model_name_or_path 'meta-llama/Llama-2-7b-chat-hf'" in err and "--base" in err
    assert (out / "eval.json").read_text() == "previous"
    assert main(["--model", str(moved), "--base", str(tmp_path / "nope"), "--config", str(config), "--out", str(out)]) == 2
    assert "--base '" in capsys.readouterr().err
    assert main(["--model", str(tiny_model_path), "--base", str(tiny_model_path), "--config", str(config)]) == 2
    assert "is not an adapter folder" in capsys.readouterr().err
    from sap_ds.evaluation.adapters import resolve_source

    source = resolve_source(str(moved), base="tiny-random")
    assert source.path == tiny_model_path and source.adapter == moved and source.lora_rank == 4
