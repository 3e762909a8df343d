"""``sap-ds eval`` end to end on the tiny model, and the errors a user can make."""
import json

import pytest
import yaml

from sap_ds.eval import main
from tests.support.repo import REPO

TINY = "configs/eval/tiny.yaml"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    from tests.support.repo import REPO

    monkeypatch.chdir(REPO)  # configs name data/ relative to the repository


def test_eval_end_to_end(tmp_path, tiny_model_path, capsys):
    assert main(["--model", str(tiny_model_path), "--config", TINY, "--out", str(tmp_path), "generation.max_new_tokens=6"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "eval.md").read_text().startswith("# Evaluation of")
    assert result["model"] == str(tiny_model_path) and result["date"] and result["config"]["generation"]["max_new_tokens"] == 6
    harmful = result["metrics"]["harmful"]
    assert harmful["n"] == 6 and set(harmful["sets"]) == {"advbench", "harmbench"}
    assert 0 <= harmful["harmful_score"] <= 100 and harmful["harmful_score_classifier"] is None
    record = result["records"]["harmful"][0]
    assert {"prompt", "response", "verdict", "refusal", "degenerate", "harmful", "set", "origin"} <= set(record)
    assert record["origin"].endswith("harmful_behaviors.csv:301")  # offset 300: rows not used in training
    tasks = result["metrics"]["tasks"]
    assert set(tasks) == {"gsm8k", "sst2", "gsm8k_test_loss"}
    assert tasks["gsm8k"]["n"] == 3 and "accuracy" in tasks["sst2"] and tasks["gsm8k_test_loss"]["loss"] > 0
    assert {"prompt", "response", "reference", "prediction", "correct"} <= set(result["records"]["tasks"]["gsm8k"][0])
    losses = result["records"]["tasks"]["gsm8k_test_loss"]  # per example, for paired comparisons
    assert len(losses) == tasks["gsm8k_test_loss"]["n"] and sum(r["tokens"] for r in losses) == tasks["gsm8k_test_loss"]["tokens"]
    assert sum(r["nll"] for r in losses) / sum(r["tokens"] for r in losses) == pytest.approx(tasks["gsm8k_test_loss"]["loss"])
    assert result["metrics"]["generation"]["tokens"] > 0
    # over-refusal on the benign set, beside the harmful score
    over = result["metrics"]["over_refusal"]
    assert over["n"] == 2 and 0 <= over["over_refusal_rate"] <= 100 and set(over["sets"]) == {"harmless"}
    assert {"prompt", "response", "refusal", "degenerate", "set", "origin"} <= set(result["records"]["benign"][0])
    assert "over-refusal **" in (tmp_path / "eval.md").read_text()
    # dtype auto is fp32 on CPU; the backend and why it was chosen are recorded
    assert result["config"]["dtype"] == "auto" and result["runtime"]["dtype"] == "fp32"
    assert result["runtime"]["backend"] == "hf" and "no CUDA device" in result["runtime"]["reason"]
    assert "wrote" in capsys.readouterr().out


def _write(tmp_path, tree) -> str:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_missing_model_folder(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--config", TINY, "--out", str(tmp_path)]) == 2
    assert "is not a local folder" in capsys.readouterr().err


def test_unknown_config_key(tmp_path, tiny_model_path, capsys):
    config = _write(tmp_path, {"harmful": [{"path": "x.csv"}], "generation": {"max_new_token": 8}})
    assert main(["--model", str(tiny_model_path), "--config", config]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'generation.max_new_token'" in err and "did you mean 'generation.max_new_tokens'" in err
    assert config in err


def test_unknown_override_key(tiny_model_path, capsys):
    assert main(["--model", str(tiny_model_path), "--config", TINY, "scorer.kinds=refusal"]) == 2
    assert "unknown key 'scorer.kinds'" in capsys.readouterr().err


def test_missing_prompt_column(tmp_path, tiny_model_path, capsys):
    # a path in a config file is relative to the file's folder (docs/design.md, "Paths"): name it absolutely
    config = _write(tmp_path, {"harmful": [{"path": str(REPO / "data/advbench/harmful_behaviors.csv"), "column": "question"}]})
    assert main(["--model", str(tiny_model_path), "--config", config, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "harmful_behaviors.csv" in err and "'question'" in err and "'goal'" in err


def test_classifier_scorer_needs_a_path(tmp_path, tiny_model_path, capsys):
    config = _write(tmp_path, {"harmful": [{"path": str(REPO / "data/advbench/harmful_behaviors.csv")}], "scorer": {"kind": "classifier"}})
    assert main(["--model", str(tiny_model_path), "--config", config]) == 2
    assert "scorer.classifier.path" in capsys.readouterr().err


def test_prompt_files_of_every_kind(tmp_path):
    from sap_ds.evaluation.config import PromptSet
    from sap_ds.evaluation.prompts import load_prompts

    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "p.jsonl").write_text('{"query": "a"}\n{"query": "b"}\n')
    assert [p.prompt for p in load_prompts(PromptSet(path=str(tmp_path / "p.txt")))] == ["first prompt", "second prompt"]
    assert [p.prompt for p in load_prompts(PromptSet(path=str(tmp_path / "p.jsonl"), column="query", offset=1))] == ["b"]
    refusal_dir = load_prompts(PromptSet(path="data/adversariallm/refusal_direction/harmful_val.json", limit=2))
    assert len(refusal_dir) == 2 and refusal_dir[0].prompt.startswith("Give detailed instructions")
    harmbench = PromptSet(path="data/adversariallm/behavior_datasets/harmbench_behaviors_text_val.csv",
                          context_column="ContextString", exclude={"FunctionalCategory": ["copyright"]})
    prompts = load_prompts(harmbench)
    assert len(prompts) == 60 and any("\n\n---\n\n" in p.prompt for p in prompts)


def test_two_ranks_give_the_single_process_result(tmp_path, tiny_model_path):
    """Sharded over 2 ranks by the DeepSpeed launcher: same records, same order."""
    from tests.support.launch import launch

    args = ["--model", str(tiny_model_path), "--config", TINY, "tasks=[]"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = launch(["sap_ds/eval.py", *args, "--out", str(tmp_path / "two")], nproc=2, timeout=300)
    assert proc.returncode == 0
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2
    assert two["records"] == one["records"] and two["metrics"]["harmful"] == one["metrics"]["harmful"]


# --------------------------------------------------------------------------- a training run folder as --model


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A real tiny LoRA run (1 step, `sap-ds train`): its output_dir holds config.json,
    checkpoints, summary.json and export/model (LoRA merged in) beside export/adapter."""
    from tests.support.launch import run_single

    run = tmp_path_factory.mktemp("run") / "lora"
    proc = run_single(["--config", "configs/tiny.yaml", f"output_dir={run}", "lora.enabled=true", "train.max_steps=1",
                       "train.eval_every=0", "data.eval=[]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "export" / "model").is_dir() and (run / "export" / "adapter").is_dir()
    return run


def _copy_run(run, folder, drop=(), **config):
    """A copy of ``run`` without the files ``drop``, with ``config`` laid over its config.json sections."""
    import shutil

    shutil.copytree(run, folder)
    for name in drop:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    saved = json.loads((folder / "config.json").read_text())
    for section, values in config.items():
        saved[section].update(values)
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


def _eval_error(model, tmp_path, capsys) -> str:
    assert main(["--model", str(model), "--config", TINY, "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


def test_eval_of_a_run_folder_names_its_exports(lora_run, tmp_path, capsys):
    """`sap-ds eval --model RUN_DIR` says it is a run folder and which export folder to give, not
    "set from_config=true" (its config.json is the run's config); likewise for RUN_DIR/export."""
    err = _eval_error(lora_run, tmp_path, capsys)
    assert f"--model: '{lora_run}' is a sap-ds training run folder" in err and "from_config" not in err
    assert f"use {lora_run / 'export' / 'model'} (" in err and f" or {lora_run / 'export' / 'adapter'} (" in err
    err = _eval_error(lora_run / "export", tmp_path, capsys)
    assert "export folder" in err and str(lora_run / "export" / "model") in err
    # a run without LoRA exports export/model only: only that is named
    full = _copy_run(lora_run, tmp_path / "full", drop=["export/adapter"])
    err = _eval_error(full, tmp_path, capsys)
    assert f"use {full / 'export' / 'model'} (" in err and str(full / "export" / "adapter") not in err
    # the folder a user names is the one that works
    from sap_ds.evaluation.adapters import resolve_source

    assert resolve_source(str(lora_run / "export" / "model")).path == lora_run / "export" / "model"
    assert resolve_source(str(lora_run / "export" / "adapter")).adapter == lora_run / "export" / "adapter"


def test_eval_of_a_run_folder_without_export_says_why(lora_run, tmp_path, capsys):
    unfinished = _copy_run(lora_run, tmp_path / "unfinished", drop=["export", "summary.json"])
    err = _eval_error(unfinished, tmp_path, capsys)
    assert "no export yet: the run is unfinished" in err and str(unfinished / "export" / "model") in err
    disabled = _copy_run(lora_run, tmp_path / "disabled", drop=["export"], export={"enabled": False})
    err = _eval_error(disabled, tmp_path, capsys)
    assert "finished with export.enabled false" in err and "export.enabled=true" in err
    # the same advice for a run folder given as a training run's model.path
    from sap_ds.config.run import ModelConfig
    from sap_ds.errors import ModelError
    from sap_ds.model.loading import resolve_model_path

    with pytest.raises(ModelError, match=r"model.path: .* is a sap-ds training run folder.*use .*export/model"):
        resolve_model_path(ModelConfig(path=str(lora_run)))
    with pytest.raises(ModelError, match=r"does not exist yet: .*unfinished.* no export yet: the run is unfinished"):
        resolve_model_path(ModelConfig(path=str(unfinished / "export" / "model")))
