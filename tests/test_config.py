"""The run config (sap_ds/config/run.py): YAML + dotted overrides, and error messages that name
the key, the file and what would be valid. Pure Python, no model, no process group."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sap_ds.config.reading import parse_overrides, read_config_file, validate_tree
from sap_ds.config.run import RunConfig, build_config, load_config
from sap_ds.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SHIPPED = sorted({*REPO.glob("configs/*.yaml"), *REPO.glob("configs/*.yml"), *REPO.glob("configs/*.json"),
                  *REPO.glob("configs/*/*.yaml"), *REPO.glob("configs/*/*.yml"), *REPO.glob("configs/*/*.json")})

SAFETY = [{"path": "data/advbench/harmful_behaviors.csv", "format": "safety_pairs"}]
TRAIN = [{"path": "data/gsm8k/train.jsonl", "format": "gsm8k"}]


def _error(overrides=(), tree=None) -> str:
    with pytest.raises(ConfigError) as info:
        if tree is None:
            load_config(TINY, list(overrides))
        else:
            build_config(tree, list(overrides), source="cfg.yaml")
    return str(info.value)


# --------------------------------------------------------------------------- shipped configs


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 3, SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path):
    """Schema only (tests/test_shipped_configs.py runs them): each kind validates, and the
    files it names resolve against the config's folder (docs/design.md, "Paths")."""
    tree = read_config_file(path)
    if path.parent.name == "eval":  # evaluation configs (sap-ds eval) have their own schema
        eval_config = pytest.importorskip("sap_ds.evaluation.config")
        assert eval_config.load_eval_config(path) is not None
        return
    if path.parent.name == "sweeps":  # sweep configs (sap-ds sweep): every point of the sweep must validate
        from sap_ds.experiments.sweep_config import SweepConfig, expand_points

        from sap_ds.experiments.stage_config import split_start
        from sap_ds.experiments.stages import StartStages

        cfg = validate_tree(SweepConfig, read_config_file(path, schema=SweepConfig), [], str(path))
        for name, overrides in expand_points(cfg).items():  # start=<stage> picks a start model, not a train key
            load_config(cfg.train_config, [*cfg.overrides, *split_start(overrides)[1], "model.path=tiny-random"])
        if cfg.start_stages:  # every alignment stage's config too (writes nothing)
            assert set(StartStages(cfg, Path("runs/unused"), "test").runs) == set(cfg.start_stages)
        return
    if path.parent.name == "attack":  # attack configs (sap-ds attack): every run of the grid must validate
        from sap_ds.experiments.attack import AttackPlan, load_attack_config

        assert AttackPlan(load_attack_config(str(path)), "tiny-random", Path("runs/unused"), str(path)).runs  # writes nothing
        return
    if "train_config" in tree:  # comparison configs (sap-ds compare) name a run config and an eval config
        compare = pytest.importorskip("sap_ds.experiments.compare")
        eval_config = pytest.importorskip("sap_ds.evaluation.config")
        cfg = validate_tree(compare.CompareConfig, read_config_file(path, schema=compare.CompareConfig), [], str(path))
        load_config(cfg.train_config)
        eval_config.load_eval_config(cfg.eval_config)
        return
    if "bench" in tree:  # benchmark configs (sap-ds bench): a run config plus a bench section
        bench_runs = pytest.importorskip("sap_ds.experiments.bench_runs")
        _, cfg, _ = bench_runs.load_bench_config(str(path), [])
    else:
        cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.train, "a shipped config must name its training data"
    # the data files a shipped config names are shipped too (/path/to/... are the user's placeholders)
    for source in [*cfg.data.train, *cfg.data.eval, *cfg.data.safety, *([cfg.data.harmful] if cfg.data.harmful else [])]:
        assert "/path/to/" in source.path or Path(source.path).is_file(), source.path
    assert Path(cfg.deepspeed_config).is_file(), cfg.deepspeed_config


# --------------------------------------------------------------------------- overrides


def test_yaml_file_values_and_defaults():
    cfg = load_config(TINY)
    assert cfg.model.path == "tiny-random" and cfg.model.dtype == "fp32"
    assert cfg.train.micro_batch_size == 2 and cfg.train.lr == pytest.approx(3e-3)
    assert cfg.sap.probe_layers == [1, 2]
    assert cfg.train.resume == "auto"  # not in the file: the default


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(TINY, [
        "train.lr=1e-4", "train.grad_accum=3", "lora.enabled=true", "data.shuffle=false",
        "sap.probe_layers=[0, 3]", "lora.target_modules=[q_proj, k_proj]", "sap.rho=0.5",
        "method=sap", "train.adam_betas=[0.8, 0.95]",
    ])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_accum == 3 and isinstance(cfg.train.grad_accum, int)
    assert cfg.lora.enabled is True and cfg.data.shuffle is False
    assert cfg.sap.probe_layers == [0, 3]
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.sap.rho == 0.5 and cfg.method == "sap"
    assert cfg.train.adam_betas == (0.8, 0.95)


def test_parse_overrides_types():
    pairs = dict(parse_overrides(["a=1", "b=1.5", "c=true", "d=[1, 2]", "e=text", "f=", "g=x=y", "h={k: 1}"]))
    assert pairs == {"a": 1, "b": 1.5, "c": True, "d": [1, 2], "e": "text", "f": "", "g": "x=y", "h": {"k": 1}}


def test_numeric_override_of_a_text_key():
    cfg = load_config(TINY, ["run_name=123", "output_dir=2024"])
    assert cfg.run_name == "123" and cfg.output_dir == "2024"


def test_list_index_override():
    cfg = load_config(TINY, ["data.train.0.limit=5", "data.safety.0.offset=3"])
    assert cfg.data.train[0].limit == 5 and cfg.data.train[0].path == str(REPO / "data/gsm8k/train.jsonl")
    assert cfg.data.safety[0].offset == 3 and cfg.data.safety[0].limit == 16


def test_list_index_out_of_range():
    msg = _error(["data.train.3.limit=5"])
    assert "data.train.3.limit" in msg and "'3' is not an index" in msg and "1 items" in msg


def test_override_creates_missing_section():
    cfg = load_config(TINY, ["data.harmful.path=data/advbench/harmful_behaviors.csv", "data.harmful.format=advbench",
                             "data.harmful_ratio=0.25"])
    assert cfg.data.harmful.path == "data/advbench/harmful_behaviors.csv" and cfg.data.harmful_ratio == 0.25


def test_override_into_a_value():
    msg = _error(["train.lr.x=1"])
    assert "'train.lr' is a value, not a section" in msg


@pytest.mark.parametrize("bad", ["foo", "=5", "train.lr"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [bad])
    assert f"'{bad}'" in str(info.value) and "key=value" in str(info.value)


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("override,key,hint,valid", [
    ("trian.lr=1", "trian", "train", ["data", "method", "sap", "train"]),
    ("train.learning_rate=1", "train.learning_rate", "train.lr", ["lr", "micro_batch_size", "warmup_steps"]),
    ("train.lrr=1", "train.lrr", "train.lr", ["lr", "micro_batch_size"]),
    ("sap.probe_layer=[1]", "sap.probe_layer", "sap.probe_layers", ["probe_layers", "rho"]),
    ("data.train.0.limt=5", "data.train.0.limt", "data.train.0.limit", ["format", "limit", "offset", "path"]),
    ("model.dtyp=fp32", "model.dtyp", "model.dtype", ["dtype", "path"]),
])
def test_unknown_key_names_full_key_suggests_and_lists(override, key, hint, valid):
    msg = _error([override])
    assert f"unknown key '{key}'" in msg
    if hint:
        assert f"did you mean '{hint}'" in msg
    listed = msg.split("valid keys here:")[1]
    for name in valid:
        assert name in listed


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("method: sft\ndata:\n  train: [{path: x.jsonl}]\n  max_lenght: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "unknown key 'data.max_lenght'" in msg and "did you mean 'data.max_length'" in msg


# --------------------------------------------------------------------------- other toolkits' names


def _train_cli(args: list[str], capsys) -> str:
    """``sap-ds train ARGS`` as a user runs it: exit 2, and the message on stderr."""
    from sap_ds.cli import main

    assert main(["train", *args]) == 2
    return capsys.readouterr().err


def test_learning_rate_suggests_train_lr_on_the_command_line_and_in_a_file(tmp_path, capsys):
    err = _train_cli(["--config", str(TINY), "train.learning_rate=1e-4"], capsys)
    assert "unknown key 'train.learning_rate' (did you mean 'train.lr'?)" in err
    config = tmp_path / "mine.yaml"
    config.write_text(TINY.read_text().replace("  lr: 3.0e-3", "  learning_rate: 3.0e-3"))
    err = _train_cli(["--config", str(config)], capsys)
    assert str(config) in err and "unknown key 'train.learning_rate' (did you mean 'train.lr'?)" in err


@pytest.mark.parametrize("override,key,hint", [
    # other toolkits' names for sap-ds keys, in their section or at the top level
    ("learning_rate=1e-4", "learning_rate", "'train.lr'"),
    ("train.gradient_accumulation_steps=4", "train.gradient_accumulation_steps", "'train.grad_accum'"),
    ("train.lr_scheduler_type=linear", "train.lr_scheduler_type", "'train.lr_schedule' (cosine, constant or linear)"),
    ("train.per_device_train_batch_size=2", "train.per_device_train_batch_size", "'train.micro_batch_size' (examples "
     "per rank per micro-batch; the global batch is train.micro_batch_size x train.grad_accum x ranks)"),
    ("num_train_epochs=3", "num_train_epochs", "'train.epochs'"),
    ("train.max_grad_norm=1", "train.max_grad_norm", "'train.grad_clip'"),
    ("train.warmup_ratio=0.1", "train.warmup_ratio", "'train.warmup_steps' (a number of optimizer steps, not a fraction"),
    ("train.logging_steps=5", "train.logging_steps", "'train.log_every'"),
    ("train.save_steps=5", "train.save_steps", "'train.save_every'"),
    ("train.eval_steps=5", "train.eval_steps", "'train.eval_every'"),
    ("model_name_or_path=/m", "model_name_or_path", "'model.path'"),
    ("model.model_name_or_path=/m", "model.model_name_or_path", "'model.path'"),
    ("data.max_seq_length=64", "data.max_seq_length", "'data.max_length'"),
    ("data.cutoff_len=64", "data.cutoff_len", "'data.max_length'"),
    ("data.train.0.seq_len=64", "data.train.0.seq_len", "'data.max_length'"),
    ("lora.lora_r=4", "lora.lora_r", "'lora.r'"),
    ("lora_alpha=8", "lora_alpha", "'lora.alpha'"),
    ("sap.grad_rate=1e-3", "sap.grad_rate", "'sap.rho'"),
    # a sap-ds name in the wrong section
    ("train.output_dir=/tmp/x", "train.output_dir", "'output_dir'"),
    ("weight_decay=0.1", "weight_decay", "'train.weight_decay'"),
    ("train.gradient_checkpointing=true", "train.gradient_checkpointing", "'model.gradient_checkpointing'"),
    ("rho=0.1", "rho", "'sap.rho' or 'lisa.rho'"),
])
def test_other_toolkits_names_suggest_the_sap_ds_key(override, key, hint):
    assert f"unknown key '{key}' (did you mean {hint}" in _error([override])


def test_key_synonyms_name_real_keys_and_no_real_key():
    """Every synonym's target is a key of the run config, and no synonym is itself a key name
    anywhere in it (it would then be suggested for the wrong section)."""
    from sap_ds.config.reading import _dotted_keys
    from sap_ds.config.run import KEY_SYNONYMS

    keys = {key for dotted in _dotted_keys(RunConfig).values() for key in dotted}
    assert "train.lr" in keys and "logging.wandb.project" in keys
    for name, target in KEY_SYNONYMS.items():
        assert target.partition(": ")[0] in keys, (name, target)
        assert name not in _dotted_keys(RunConfig), name


# --------------------------------------------------------------------------- wrong types and values


@pytest.mark.parametrize("override,key,valid", [
    ("sap.rho=-1", "sap.rho", "greater than or equal to 0"),
    ("data.harmful_ratio=1.5", "data.harmful_ratio", "less than or equal to 1"),
    ("data.harmful_ratio=-0.1", "data.harmful_ratio", "greater than or equal to 0"),
    ("model.dtype=fp16", "model.dtype", "'bf16' or 'fp32'"),
    ("method=foo", "method", "'sft', 'sap', 'lisa', 'safety_mix', 'booster', 'repnoise' or 'vaccine'"),
    ("safety_mix.ratio=0", "safety_mix.ratio", "greater than 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size", "greater than 0"),
    ("train.micro_batch_size=abc", "train.micro_batch_size", "valid integer"),
    ("lora.enabled=maybe", "lora.enabled", "valid boolean"),
    ("sap.safety_loss=kl", "sap.safety_loss", "'contrastive' or 'difference'"),
    ("model.attn_implementation=flash", "model.attn_implementation", "'sdpa', 'eager' or 'flash_attention_2'"),
    ("train.lr_schedule=step", "train.lr_schedule", "'cosine', 'constant' or 'linear'"),
    ("data.train.0.format=parquet", "data.train.0.format", "'gsm8k'"),
    ("sap.probe_layers=3", "sap.probe_layers", "valid list"),
])
def test_wrong_value_names_key_and_valid_values(override, key, valid):
    msg = _error([override])
    assert str(TINY) in msg
    assert f"key '{key}'" in msg
    assert valid in msg
    assert repr(override.split("=", 1)[1]) in msg or override.split("=", 1)[1] in msg  # what was given


def test_all_problems_are_reported_together():
    msg = _error(["sap.rho=-1", "model.dtype=fp16", "trian.lr=1"])
    assert "sap.rho" in msg and "model.dtype" in msg and "trian" in msg


def test_sap_without_safety_data():
    msg = _error(tree={"method": "sap", "data": {"train": TRAIN}})
    assert "method 'sap' needs safety pairs" in msg and "data.safety" in msg
    msg = _error(["method=sap", "data.safety=[]"])
    assert "data.safety" in msg
    assert build_config({"method": "sap", "data": {"train": TRAIN, "safety": SAFETY}}).method == "sap"
    assert build_config({"method": "sft", "data": {"train": TRAIN}}).method == "sft"


def test_harmful_ratio_without_harmful_file():
    msg = _error(["data.harmful_ratio=0.1"])
    assert "data.harmful_ratio" in msg and "data.harmful" in msg


def test_duplicate_probe_layers():
    assert "duplicates" in _error(["sap.probe_layers=[1, 1]"])


def test_empty_output_dir():
    assert "output_dir" in _error(["output_dir=' '"])


# --------------------------------------------------------------------------- the file itself


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)


@pytest.mark.parametrize("text,what", [
    ("- a\n- b\n", "list"),
    ("just a string\n", "str"),
    ("42\n", "int"),
])
def test_file_not_a_mapping(tmp_path, text, what):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "mapping" in str(info.value) and what in str(info.value)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("method: sft\ntrain: {lr: 1\n  micro_batch_size: [2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value)


def test_invalid_json(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"method": "sft",}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not valid JSON" in str(info.value)


def test_json_config(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"method": "sft", "data": {"train": [{"path": "x.jsonl", "format": "gsm8k"}]}}')
    assert load_config(path, ["train.lr=0.5"]).train.lr == 0.5


def test_non_utf8_config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"run_name: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "UTF-8" in str(info.value)


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("# nothing\n")
    assert read_config_file(path) == {}
    cfg = load_config(path)
    assert cfg.method == "sft" and cfg.model.path == "embedded"


# --------------------------------------------------------------------------- base: one config built on another


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_lays_the_file_over_its_base_section_by_section(tmp_path, monkeypatch):
    _write(tmp_path / "presets" / "root.yaml",
           "run_name: root\nmethod: sft\ntrain: {lr: 1.0e-3, max_steps: 24}\n"
           "sap: {rho: 0.1, probe_layers: [3, 9, 15]}\ndata: {safety: [{path: pairs.csv, format: safety_pairs}]}\n")
    _write(tmp_path / "presets" / "mid.yaml", "base: root.yaml\nmethod: sap\nsap: {probe_layers: [5]}\n")
    leaf = _write(tmp_path / "leaf" / "leaf.yaml", "base: ../presets/mid.yaml\ntrain: {lr: 2.0e-4}\n")
    monkeypatch.chdir(tmp_path / "leaf")  # the base path is relative to the file, not the working directory
    tree = read_config_file(leaf)
    assert "base" not in tree
    assert tree == {"run_name": "root", "method": "sap", "train": {"lr": 2.0e-4, "max_steps": 24},
                    "sap": {"rho": 0.1, "probe_layers": [5]},
                    "data": {"safety": [{"path": "pairs.csv", "format": "safety_pairs"}]}}  # a list replaces, it does not extend
    cfg = load_config(leaf, ["sap.rho=0.2"])  # overrides go on top of the merged file
    assert (cfg.method, cfg.train.lr, cfg.train.max_steps, cfg.sap.rho, cfg.sap.probe_layers) == ("sap", 2.0e-4, 24, 0.2, [5])


@pytest.mark.parametrize("text, expected", [
    ("base: missing.yaml\n", "key 'base': file not found"),
    ("base: [a.yaml]\n", "key 'base': expected the path of the config file this one builds on"),
    ("base: ''\n", "key 'base': expected the path"),
    ("base: self.yaml\n", "the bases form a loop"),
])
def test_base_errors_name_the_file_and_the_key(tmp_path, text, expected):
    path = _write(tmp_path / "self.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_base_loop_through_two_files_is_reported(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    path = _write(tmp_path / "b.yaml", "base: a.yaml\nmethod: sap\n")
    with pytest.raises(ConfigError, match=r"loop: .*b\.yaml -> .*a\.yaml -> .*b\.yaml"):
        read_config_file(path)


def test_an_error_in_the_base_names_the_base_file(tmp_path):
    _write(tmp_path / "root.yaml", "train: [not, a, section\n")
    path = _write(tmp_path / "child.yaml", "base: root.yaml\n")
    with pytest.raises(ConfigError, match="root.yaml: not valid YAML"):
        load_config(path)


# --------------------------------------------------------------------------- the DeepSpeed JSON (sap_ds/parallel/ds_config.py)


def _ds(tmp_path, ds: dict | str, overrides=(), world_size=2) -> dict:
    from sap_ds.parallel.ds_config import load_ds_config

    path = tmp_path / "ds.json"
    path.write_text(ds if isinstance(ds, str) else json.dumps(ds))
    cfg = load_config(TINY, [f"deepspeed_config={path}", *overrides])
    return load_ds_config(cfg, world_size=world_size)


def _ds_error(tmp_path, ds, overrides=(), world_size=2) -> str:
    with pytest.raises(ConfigError) as info:
        _ds(tmp_path, ds, overrides, world_size)
    assert str(tmp_path / "ds.json") in str(info.value)
    return str(info.value)


def _zero3(**extra) -> dict:
    return {"zero_optimization": {"stage": 3}, **extra}


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_shipped_ds_configs_are_completed(name):
    from sap_ds.parallel.ds_config import load_ds_config

    cfg = load_config(TINY, [f"deepspeed_config=ds_configs/{name}", "train.grad_accum=3", "train.grad_clip=0.5"])
    ds = load_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # tiny.yaml is fp32
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == pytest.approx(3e-3)
    assert not any(key.startswith("_") for key in ds)


def test_ds_values_that_agree_are_accepted(tmp_path):
    ds = _ds(tmp_path, _zero3(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, train_batch_size=4,
                              gradient_clipping=1.0, bf16={"enabled": False}))
    assert ds["train_batch_size"] == 4


@pytest.mark.parametrize("key,value,run_key", [
    ("train_micro_batch_size_per_gpu", 3, "train.micro_batch_size"),
    ("gradient_accumulation_steps", 4, "train.grad_accum"),
    ("train_batch_size", 8, "world size"),
    ("gradient_clipping", 0.0, "train.grad_clip"),
])
def test_ds_values_that_disagree(tmp_path, key, value, run_key):
    msg = _ds_error(tmp_path, _zero3(**{key: value}))
    assert f"'{key}' is {value}" in msg and run_key in msg and '"auto"' in msg


def test_ds_zero_stage_must_be_3(tmp_path):
    assert "'zero_optimization.stage' must be 3 (got 2)" in _ds_error(tmp_path, {"zero_optimization": {"stage": 2}})
    assert "must be 3 (got None)" in _ds_error(tmp_path, {})


@pytest.mark.parametrize("ds,expected", [
    (_zero3(optimizer={"type": "Adam"}), "'optimizer' is set by sap-ds"),
    (_zero3(scheduler={"type": "WarmupLR"}), "'scheduler' is set by sap-ds"),
    (_zero3(fp16={"enabled": True}), "'fp16.enabled' is not supported"),
    (_zero3(bf16={"enabled": True}), "'bf16.enabled' is True but model.dtype is fp32"),
    (_zero3(train_micro_batch_size_per_gpu="two"), "'train_micro_batch_size_per_gpu' must be a number or \"auto\""),
    ([1, 2], "top level must be a JSON object"),
    ({"zero_optimization": 3}, "'zero_optimization' must be a JSON object"),
    ('{"zero_optimization": {"stage": 3},\n}', ":2: not valid JSON"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "'zero_optimization.offload_param.device' is nvme"),
])
def test_ds_config_errors(tmp_path, ds, expected):
    assert expected in _ds_error(tmp_path, ds)


def test_ds_config_missing(tmp_path):
    from sap_ds.parallel.ds_config import load_ds_config

    cfg = load_config(TINY, [f"deepspeed_config={tmp_path / 'nope.json'}"])
    with pytest.raises(ConfigError, match="deepspeed_config: file not found"):
        load_ds_config(cfg, world_size=1)


def test_recommended_preset_is_demo_with_sap_and_per_tensor_radius():
    """configs/sap_recommended.yaml is the sweep's sap_scaled_per_tensor point on demo.yaml's run:
    a drift between the two would make docs/results.md describe a preset nobody ships."""
    recommended = load_config(REPO / "configs/sap_recommended.yaml").model_dump()
    demo = load_config(REPO / "configs/demo.yaml", ["method=sap", "sap.perturb_norm=per_tensor"]).model_dump()
    for key in ("run_name", "output_dir"):
        recommended.pop(key), demo.pop(key)
    assert recommended == demo
    assert recommended["sap"]["probe_scale"] == 0.05 and recommended["sap"]["rho"] == 0.1


# --------------------------------------------------------------------------- paths (docs/design.md, "Paths")


def test_relative_paths_resolve_against_the_file_that_names_them(tmp_path, monkeypatch):
    """Data paths in a file are relative to that file's folder (each file of a base chain
    its own); on the command line, to the working directory; output and model folders
    always to the working directory."""
    _write(tmp_path / "presets" / "base.yaml",
           "data:\n  train: [{path: ../data/a.jsonl, format: gsm8k}]\n  safety: [{path: pairs.csv, format: safety_pairs}]\n"
           "output_dir: runs/x\nmodel: {path: models/m}\n")
    leaf = _write(tmp_path / "exp" / "leaf.yaml", "base: ../presets/base.yaml\ndata:\n  eval: [{path: held.jsonl}]\n")
    monkeypatch.chdir(tmp_path / "exp")
    cfg = load_config(leaf)
    assert cfg.data.train[0].path == str(tmp_path / "data" / "a.jsonl")
    assert cfg.data.safety[0].path == str(tmp_path / "presets" / "pairs.csv")
    assert cfg.data.eval[0].path == str(tmp_path / "exp" / "held.jsonl")
    assert cfg.output_dir == "runs/x" and cfg.model.path == "models/m"  # the working directory's
    assert load_config(leaf, ["data.eval.0.path=mine.jsonl"]).data.eval[0].path == "mine.jsonl"


def test_shipped_configs_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = load_config("demo")
    assert by_name == load_config("configs/demo.yaml") == load_config(REPO / "configs" / "demo.yaml")
    assert by_name.data.train[0].path == str(REPO / "data" / "gsm8k" / "train.jsonl")
    assert load_config("70b/llama2_70b_chat_lora").lora.enabled
    assert load_config("tiny", ["deepspeed_config=zero3_bf16.json"]).deepspeed_config == str(REPO / "ds_configs" / "zero3_bf16.json")
    _write(tmp_path / "mine.yaml", "base: demo\nmethod: sap\n")  # a user's config on a shipped one
    assert load_config(tmp_path / "mine.yaml").data.harmful.path == by_name.data.harmful.path
    with pytest.raises(ConfigError, match=r"config file not found: nodemo.*shipped: .*70b/llama2_70b_chat_lora.*sap-ds configs"):
        load_config("nodemo")


def test_placeholders_name_the_override_to_pass():
    from sap_ds.config.run import missing_inputs

    cfg = load_config("paper_llama2_7b_lora")
    problems = missing_inputs(cfg)
    assert [p.split(":")[0] for p in problems] == ["data.train.0.path", "data.eval.0.path"]
    assert "(a placeholder); pass data.train.0.path=/your/alpaca_data.json" in problems[0]
    assert missing_inputs(load_config("demo")) == []


def test_keys_that_cannot_change_training_are_no_config_change():
    from sap_ds.config.run import config_changes, config_to_dict

    saved = config_to_dict(load_config(TINY))
    same = load_config(TINY, ["logging.wandb.project=p", "train.save_every=5", "train.resume=never", "output_dir=elsewhere"])
    assert config_changes(saved, same) == []
    assert config_changes(saved, load_config(TINY, ["train.lr=1e-3"])) == ["train.lr: 0.003 → 0.001"]


def test_configs_copy_is_self_contained(tmp_path, monkeypatch, capsys):
    """`sap-ds configs copy NAME` writes a file that loads to the same run from anywhere:
    base chain merged, paths absolute; `sap-ds configs` lists the names."""
    from sap_ds.configs_cli import main

    monkeypatch.chdir(tmp_path)
    assert main([]) == 0 and "70b/llama2_70b_chat_lora" in capsys.readouterr().out
    assert main(["copy", "sap_fast", "mine.yaml"]) == 0
    assert load_config(tmp_path / "mine.yaml") == load_config("sap_fast")
    assert main(["copy", "sap_fast", "mine.yaml"]) == 2 and "exists" in capsys.readouterr().err


def test_version_names_the_commit_in_a_checkout():
    import subprocess

    from sap_ds.version import version_line

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert version_line().startswith(f"sap-ds 0.1.0 (commit {head}") and "git checkout" in version_line()
