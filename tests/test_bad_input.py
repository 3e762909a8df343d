"""Bad input through the real CLI (``python sap_ds/train.py --config ...``): every case exits
with code 2, prints one ``sap-ds: error:`` message to stderr that names the key, file or
line and what would be valid, prints no traceback, and leaves an existing output_dir
(a previous run's files and checkpoints) exactly as it was.

Config errors fail before torch is even imported (under a second each); model, data-file,
DeepSpeed-config, checkpoint and probe-layer errors in sap_ds.train.fail_fast, before any
process group exists (probe layers against config.json's depth; the check on the built model
stays as a backstop); a malformed data file once the data is read. Each case is its own short process; the selected cases run two at a
time (they are import-bound), which halves the wall time on an otherwise idle 2-core machine."""
from __future__ import annotations

import importlib.util
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.support.launch import run_single
from tests.support.repo import REPO

TINY = "configs/tiny.yaml"
PARALLEL = 2


@dataclass(frozen=True)
class Case:
    """``setup(folder)`` writes what the case needs and returns (config, overrides, texts the
    error message must contain)."""

    name: str
    setup: Callable[[Path], tuple[str, list[str], list[str]]]
    skip: str | None = None


def _ds_config(folder: Path, **changes) -> Path:
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    for key, value in changes.items():
        if key == "stage":
            ds["zero_optimization"]["stage"] = value
        else:
            ds[key] = value
    path = folder / "ds.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


def _typo_config(folder: Path):
    config = folder / "typo.yaml"
    config.write_text((REPO / TINY).read_text().replace("  micro_batch_size: 2", "  micro_bach_size: 2"))
    return str(config), [], [str(config), "unknown key 'train.micro_bach_size'", "did you mean 'train.micro_batch_size'"]


def _broken_yaml(folder: Path):
    config = folder / "broken.yaml"
    config.write_text("train: {lr: 1\nmethod: sft\n")
    return str(config), [], [str(config), "not valid YAML"]


def _missing_config(folder: Path):
    return str(folder / "nope.yaml"), [], [str(folder / "nope.yaml"), "not found"]


def _model_without_config(folder: Path):
    model = folder / "not-a-model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    return TINY, [f"model.path={model}"], ["model.path", str(model), "no config.json"]


def _model_without_weights(folder: Path):
    model = folder / "no-weights"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return TINY, [f"model.path={model}"], ["model.path", str(model), "no weights", "model.from_config"]


def _malformed_data(folder: Path):
    data = folder / "bad.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n{"question": "e", "answer": }\n')
    return TINY, [f"data.train.0.path={data}"], [f"{data}:3:", "invalid JSON"]


def _missing_data(folder: Path):
    data = folder / "missing.jsonl"
    return TINY, [f"data.train.0.path={data}"], [str(data), "not found"]


def _micro_batch_mismatch(folder: Path):
    ds = _ds_config(folder, train_micro_batch_size_per_gpu=3)
    return TINY, [f"deepspeed_config={ds}", "train.micro_batch_size=2"], [
        str(ds), "'train_micro_batch_size_per_gpu' is 3", "gives 2", "train.micro_batch_size", '"auto"']


def _nvme_offload(folder: Path):
    """NVMe offload (refused for every method, on any machine: DeepSpeed keeps swapped shards out of memory)."""
    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": "/local_nvme"}
    path = folder / "ds_nvme.json"
    path.write_text(json.dumps(ds, indent=1))
    return TINY, [f"deepspeed_config={path}"], [str(path), "'zero_optimization.offload_param.device' is nvme", '"cpu"']


def _zero_stage_2(folder: Path):
    ds = _ds_config(folder, stage=2)
    return TINY, [f"deepspeed_config={ds}"], [str(ds), "'zero_optimization.stage' must be 3", "got 2"]


def _zero_plus_plus_with_sap(folder: Path):
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["zero_hpz_partition_size"] = 2
    path = folder / "ds_hpz.json"
    path.write_text(json.dumps(ds, indent=1))
    return TINY, [f"deepspeed_config={path}", "method=sap"], [
        str(path), "'zero_optimization.zero_hpz_partition_size' is 2", "probe pass would run at W", "set it to 1"]


def _offload_with_triton(folder: Path):
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    path = folder / "ds_offload.json"
    path.write_text(json.dumps(ds, indent=1))
    return TINY, [f"deepspeed_config={path}", "method=sap", "sap.kernels=triton"], [
        "sap.kernels is 'triton'", str(path), "'zero_optimization.offload_optimizer.device' is cpu", "'auto' or 'torch'"]


def _ds_batch_not_a_multiple(folder: Path):
    ds = _ds_config(folder, train_batch_size=6)  # one process, micro-batch 2: 6 needs grad_accum 3
    return TINY, [f"deepspeed_config={ds}", "train.grad_accum=2"], [
        str(ds), "'train_batch_size' is 6", "gives 4", "needs train.grad_accum=3"]


def _checkpoint_of_another_model(folder: Path):
    """output_dir's latest checkpoint was written for another model: refused, naming the
    checkpoint and the key, before anything is loaded or written."""
    step = folder / "out" / "checkpoints" / "step_5"
    step.mkdir(parents=True)
    (step / "sap_ds_meta.json").write_text(json.dumps({"method": "sft", "model_path": "/models/other-model", "lora": False,
                                                       "trainable_params": 1, "world_size": 1, "step": 5}))
    return TINY, [], [str(step), "model_path='/models/other-model'", "model_path='tiny-random'", "output_dir",
                      "train.resume=never"]


def _overrides(overrides: list[str], *texts: str):
    return lambda folder: (TINY, overrides, list(texts))


CASES = [
    # ---- config: fails before distributed init
    Case("unknown_key", _overrides(["train.warmup_step=2"], str(TINY), "unknown key 'train.warmup_step'",
                                   "did you mean 'train.warmup_steps'", "valid keys here:", "micro_batch_size")),
    Case("unknown_key_in_file", _typo_config),
    Case("mistyped_value", _overrides(["train.micro_batch_size=two"], "train.micro_batch_size", "valid integer", "'two'")),
    Case("wrong_choice", _overrides(["model.dtype=fp16"], "model.dtype", "'bf16' or 'fp32'")),
    Case("harmful_ratio_above_1", _overrides(["data.harmful_ratio=1.5"], "data.harmful_ratio", "less than or equal to 1", "1.5")),
    Case("negative_rho", _overrides(["method=sap", "sap.rho=-0.1"], "sap.rho", "greater than or equal to 0", "-0.1")),
    Case("malformed_override", _overrides(["train.lr"], "'train.lr'", "key=value")),
    Case("safety_mix_without_safety_data", _overrides(["method=safety_mix", "data.safety=[]"], "method 'safety_mix'",
                                                      "set data.safety")),
    Case("booster_without_harmful_set", _overrides(["method=booster", "data.safety=[]"], "method 'booster' needs a harmful "
                                                   "set", "set data.safety")),
    Case("repnoise_without_pairs", _overrides(["method=repnoise", "data.safety=[]"], "method 'repnoise'",
                                              "set data.safety", "safety_pairs")),
    Case("vaccine_rho_not_positive", _overrides(["method=vaccine", "vaccine.rho=0"], "vaccine.rho", "greater than 0")),
    Case("missing_config_file", _missing_config),
    Case("invalid_yaml_config", _broken_yaml),
    # ---- model, data, DeepSpeed config, output_dir's checkpoint: sap_ds.train.fail_fast (most)
    Case("missing_model_path", _overrides(["model.path=/nonexistent"], "model.path", "'/nonexistent'", "not a local folder",
                                          "embedded")),
    Case("model_folder_without_config_json", _model_without_config),
    Case("model_folder_without_weights", _model_without_weights),
    Case("flash_attention_not_installed",
         _overrides(["model.attn_implementation=flash_attention_2", "model.dtype=bf16"],  # fp32 is refused first
                    "model.attn_implementation", "flash-attn", "'sdpa'", "'eager'"),
         skip="flash-attn is installed here" if importlib.util.find_spec("flash_attn") else None),
    Case("malformed_data_file", _malformed_data),
    Case("missing_data_file", _missing_data),
    Case("micro_batch_disagrees_with_ds_config", _micro_batch_mismatch),
    Case("ds_config_zero_stage_2", _zero_stage_2),
    Case("nvme_offload", _nvme_offload),
    Case("zero_plus_plus_hpz_with_sap", _zero_plus_plus_with_sap),
    Case("offload_with_triton_kernels", _offload_with_triton),
    Case("ds_batch_size_no_grad_accum_gives", _ds_batch_not_a_multiple),
    Case("checkpoint_of_another_model", _checkpoint_of_another_model),
    Case("probe_layer_out_of_range", _overrides(["method=sap", "sap.probe_layers=[0,99]"], "sap.probe_layers", "[99]",
                                                "4 decoder layers", "0..3")),
    Case("probe_layer_band_deeper_than_model", _overrides(["method=sap", "sap.probe_layers=11-20"], "sap.probe_layers",
                                                          "[11, 12,", "4 decoder layers", "0..3")),
]
BY_NAME = {case.name: case for case in CASES}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _previous_run(out: Path) -> None:
    """An output_dir holding a previous run: a sentinel file and a checkpoint pointer."""
    (out / "checkpoints" / "step_5").mkdir(parents=True, exist_ok=True)
    (out / "SENTINEL").write_text("do not touch\n")
    (out / "checkpoints" / "latest").write_text("step_5\n")
    (out / "checkpoints" / "step_5" / "meta.json").write_text('{"step": 5}\n')


@dataclass
class Started:
    out: Path
    before: dict
    must_contain: list[str]
    future: object


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Start every selected case (``PARALLEL`` at a time) before the first one is checked."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params]
    started: dict[str, Started] = {}
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        for name in selected:
            case = BY_NAME[name]
            if case.skip or name in started:
                continue
            folder = tmp_path_factory.mktemp(name)
            config, overrides, must_contain = case.setup(folder)
            out = folder / "out"
            _previous_run(out)
            args = ["--config", config, f"output_dir={out}", *overrides]
            started[name] = Started(out, _snapshot(out), must_contain, pool.submit(run_single, args, 300))
        yield started
        for s in started.values():
            s.future.cancel()
    for s in started.values():
        shutil.rmtree(s.out.parent, ignore_errors=True)


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_bad_input_exits_2_with_a_clear_message(name, runs):
    if BY_NAME[name].skip:
        pytest.skip(BY_NAME[name].skip)
    run = runs[name]
    proc = run.future.result()
    stderr = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
    assert "Traceback" not in stderr, stderr[-5000:]
    errors = [line for line in stderr.splitlines() if line.startswith("sap-ds: error:")]
    assert len(errors) == 1, stderr[-5000:]
    message = stderr[stderr.index("sap-ds: error:"):]
    for text in run.must_contain:
        assert text in message, f"{text!r} not in:\n{message}"
    assert "== sap-ds summary ==" not in proc.stdout
    assert _snapshot(run.out) == run.before, "the failed run changed the existing output_dir"


# --------------------------------------------------------------------------- the same checks in-process


def test_model_folder_checks(tmp_path, tiny_model_path):
    from sap_ds.config.run import ModelConfig
    from sap_ds.errors import ModelError
    from sap_ds.model.loading import load_tokenizer, resolve_model_path

    assert resolve_model_path(ModelConfig(path=str(tiny_model_path))) == tiny_model_path
    assert resolve_model_path(ModelConfig(path="tiny-random")) == tiny_model_path
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_model_path / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        resolve_model_path(ModelConfig(path=str(bare)))
    assert resolve_model_path(ModelConfig(path=str(bare), from_config=True)) == bare  # random weights need none
    with pytest.raises(ModelError) as info:
        load_tokenizer(bare)
    assert "no usable tokenizer" in str(info.value) and str(bare) in str(info.value)
    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    with pytest.raises(ModelError, match="not a local folder"):
        resolve_model_path(ModelConfig(path=str(a_file)))


def test_lora_target_modules_not_in_model(tiny_model_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sap_ds.config.run import LoraConfig
    from sap_ds.errors import ModelError
    from sap_ds.model.loading import apply_lora

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_path), dtype=torch.float32)
    with pytest.raises(ModelError) as info:
        apply_lora(model, LoraConfig(enabled=True, target_modules=["q_proj", "c_attn"]))
    assert "['c_attn']" in str(info.value) and "q_proj" in str(info.value) and "down_proj" in str(info.value)


def test_demo_before_align_says_to_run_align_first(tmp_path, monkeypatch):
    """`sap-ds train --config demo` in a fresh folder: configs/demo.yaml's model.path is the
    export of configs/align.yaml, which has not run here. The error names the command that makes
    it (found from the shipped config whose output_dir it is under) and the override."""
    import os
    import subprocess
    import sys

    from sap_ds.config.reading import read_config_file
    from sap_ds.config.run import load_config

    demo = load_config("demo")
    assert demo.model.path == "runs/align/export/model" and read_config_file("align")["output_dir"] == "runs/align"

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sap_ds.cli", "train", "--config", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.path: 'runs/align/export/model' does not exist yet" in proc.stderr
    assert "the shipped config 'align' (output_dir runs/align)" in proc.stderr
    assert "`sap-ds train --config align`" in proc.stderr and "pass model.path=/your/model/folder" in proc.stderr
    assert not (tmp_path / "runs").exists()
    # align started here but did not finish: the same command resumes it (the same check, in-process)
    from sap_ds.errors import ModelError
    from sap_ds.model.loading import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "align" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ModelError, match=r"`sap-ds train --config align`.*runs/align holds an unfinished run of it: "
                                         r"that command resumes it"):
        resolve_model_path(demo.model)
