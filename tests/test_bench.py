"""The throughput benchmark: the FLOPs model by hand, the config, and one real 2-rank launch."""
from __future__ import annotations

import json

import pytest
import yaml

from sap_ds import version
from sap_ds.cost import flops
from sap_ds.cost.model_spec import NAMED_MODELS, ModelSpec
from sap_ds.methods import all_phases
from tests.support.launch import launch
from tests.support.repo import REPO

# A tiny Llama: h=8, I=16, L=4, 2 heads of 4 (q_dim 8), 1 kv head (kv_dim 4), V=32.
TINY = ModelSpec("hand", hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=32)
# Per token and layer, base linears: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate/up/down 3*8*16 = 576 weights -> M = 1152
M, H = 1152, 2 * 32 * 8  # lm_head H = 512
# LoRA r=2 on q (8->8) and v (8->4): M_a = 2 * 2 * (16 + 12) = 112
MA = 112
# Attention core per layer and sequence: A(n) = 2 * q_dim * n^2 = 16 n^2 (causal half)
TASK = [3, 5]  # sum n = 8, sum n^2 = 34
SAFETY = [4, 4]  # sum n = 8, sum n^2 = 32


def test_flops_full_fine_tuning_by_hand():
    fm = flops.FlopsModel(TINY)
    assert fm.layer_matmul() == M and fm.head() == H and fm.attention(5) == 16 * 25
    f_task = 8 * (4 * M + H) + 4 * 16 * 34  # 40960 + 2176
    assert fm.forward(TASK) == f_task == 43136
    assert fm.backward(TASK) == 2 * f_task  # full FT: activation + weight grads
    # probe above layer 1: Lp = 4 - 1 - 1 = 2 blocks + lm_head, activation grads only (attention core 2x)
    assert fm.probe_backward(TASK, 1) == 8 * (2 * M + H) + 2 * 2 * 16 * 34 == 24704
    f_safe = 8 * (4 * M + H) + 4 * 16 * 32  # 43008
    sft = fm.step(TASK)
    sap = fm.step(TASK, SAFETY, safety=1, probe=1, lowest_probe_layer=1)
    assert sft.total == 3 * f_task == 129408
    assert sap.total == 3 * f_task + 3 * f_safe + f_task + 24704 == 326272
    assert sap.parts["safety_backward"] == 2 * f_safe and sap.parts["probe_forward"] == f_task
    assert flops.ideal_ratio(fm, TASK, SAFETY, lowest_probe_layer=1) == pytest.approx(129408 / 326272)
    # safety_every / probe_fraction weight the extra passes
    half = fm.step(TASK, SAFETY, safety=0.25, probe=0.5, lowest_probe_layer=1)
    assert half.total == pytest.approx(3 * f_task + 0.25 * 3 * f_safe + 0.5 * (f_task + 24704))
    assert fm.forward_per_token(5) == pytest.approx(4 * M + H + 4 * 16 * 5)


def test_flops_lora_by_hand():
    fm = flops.FlopsModel(TINY, lora_r=2, lora_targets=("q_proj", "v_proj"))
    assert fm.layer_lora() == MA
    f_task = 8 * (4 * (M + MA) + H) + 4 * 16 * 34  # 44544 + 2176
    assert fm.forward(TASK) == f_task == 46720
    # frozen weights: activation grads only (1x), adapters 2x, attention core 2x
    assert fm.backward(TASK) == 8 * (4 * (M + 2 * MA) + H) + 2 * 4 * 16 * 34 == 52480
    assert fm.probe_backward(TASK, 1) == 8 * (2 * (M + MA) + H) + 2 * 2 * 16 * 34 == 26496
    assert fm.step(TASK).total == f_task + 52480


def test_ideal_ratios_match_design():
    """docs/design.md, "Cost": ~0.38 (full) and ~0.34 (LoRA) at equal safety and task tokens,
    for a deep model with the probe near the bottom. Deep limit: 3/(3+3+1+1) and 2/(2+2+1+1)."""
    spec = NAMED_MODELS["llama2-70b"]  # L = 80, probe layers [3, 9] -> Lp = 76
    lengths = [128] * 8
    full = flops.ideal_ratio(flops.FlopsModel(spec), lengths, lengths, lowest_probe_layer=3)
    lora = flops.ideal_ratio(flops.FlopsModel(spec, 8, ("q_proj", "v_proj")), lengths, lengths, lowest_probe_layer=3)
    assert full == pytest.approx(0.38, abs=0.01) and full > 3 / 8
    assert lora == pytest.approx(0.34, abs=0.01) and lora > 1 / 3
    # with the probe at the very bottom and negligible attention/head the limits are exact
    deep = ModelSpec("deep", 4096, 11008, 4000, 32, 32, 8)
    assert flops.ideal_ratio(flops.FlopsModel(deep), [8], [8], lowest_probe_layer=0) == pytest.approx(3 / 8, abs=2e-3)
    assert flops.ideal_ratio(flops.FlopsModel(deep, 8, ("q_proj", "v_proj")), [8], [8],
                             lowest_probe_layer=0) == pytest.approx(1 / 3, abs=2e-3)


def test_nominal_shares_follow_the_trainer_schedule():
    from sap_ds.sap import step as sap_step

    assert sap_step.nominal_shares(1, 1.0) == (1.0, 1.0)
    assert sap_step.nominal_shares(4, 0.5) == (0.25, 0.5)
    assert sap_step.nominal_shares(3, 0.5) == (0.25, 0.5)  # probe steps are odd: due at 4, runs at 5
    assert sap_step.nominal_shares(1, 0.5) == (0.5, 0.5)  # safety only runs on probe steps
    assert all(sap_step.runs_probe(s, 0.3) == (int((s + 1) * 0.3) > int(s * 0.3)) for s in range(50))


def test_fast_preset_is_demo_plus_fast_knobs():
    from sap_ds.config.methods import SAP_FAST_OVERRIDES
    from sap_ds.config.reading import parse_overrides
    from sap_ds.config.run import load_config

    fast = load_config(REPO / "configs/sap_fast.yaml")
    demo = load_config(REPO / "configs/demo.yaml")
    for key, value in parse_overrides(SAP_FAST_OVERRIDES):
        node = fast
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
    a, b = fast.model_dump(), demo.model_dump()
    for key in ("run_name", "output_dir", "method"):
        a.pop(key), b.pop(key)
    a["sap"].pop("safety_every"), a["sap"].pop("probe_fraction"), b["sap"].pop("safety_every"), b["sap"].pop("probe_fraction")
    assert a == b  # everything else is demo.yaml's


def test_bench_config_errors(tmp_path):
    from sap_ds.bench import parse_args, select
    from sap_ds.errors import ConfigError
    from sap_ds.experiments.bench_runs import load_bench_config

    tree = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tree, "bench": {"timed_step": 3}}))
    with pytest.raises(ConfigError, match="bench"):
        load_bench_config(str(bad), [])
    bad.write_text(yaml.safe_dump({**tree, "bench": {"variants": [{"name": "x", "overrides": ["sap.nope=1"]}]}}))
    with pytest.raises(ConfigError, match="(?s)variant 'x'.*sap.nope"):
        load_bench_config(str(bad), [])
    bench, base, _ = load_bench_config(str(REPO / "configs/bench_cpu.yaml"), [])
    assert base.model.dtype == "fp32" and base.lora.enabled and [v.name for v in bench.variants][:3] == ["sft", "paper", "fast"]
    assert "safety_mix" in [v.name for v in bench.variants]
    with pytest.raises(ConfigError, match="unknown"):
        select(bench, parse_args(["--config", "c", "--out", "o", "--variants", "sft,nope"]))
    picked = select(bench, parse_args(["--config", "c", "--out", "o", "--variants", "paper,sft", "--steps", "3"]))
    assert [v.name for v in picked.variants] == ["paper", "sft"] and picked.timed_steps == 3


@pytest.mark.parametrize("installed", [False, True])
def test_bench_record_names_the_commit_sap_ds_version_names(installed, tmp_path, monkeypatch):
    """The bench JSON's git_commit and git_dirty are ``sap_ds.version.commit()``'s (what
    ``sap-ds --version`` prints), in a checkout and in an installed package (no git; the
    build record setup.py writes), where the bench once wrote null."""
    from sap_ds import version
    from sap_ds.config.run import load_config
    from sap_ds.experiments.bench_report import bench_result
    from sap_ds.experiments.bench_runs import BenchSection

    if installed:  # a package folder with its build record and no checkout around it
        package = tmp_path / "site" / "sap_ds"
        package.mkdir(parents=True)
        (package / "_build_info.json").write_text(json.dumps({"version": "0.1.0", "commit": "0123abc", "dirty": True}))
        monkeypatch.setattr(version, "PACKAGE_DIR", package)
        monkeypatch.setattr(version, "BUILD_INFO", package / "_build_info.json")
    found = version.commit()
    assert found.hash and (found.source == "recorded at build time") == installed
    result = bench_result([], date="2026-01-01T00:00:00+00:00", world=1, command="sap-ds bench", peak={},
                          bench=BenchSection(variants=[]), base=load_config(REPO / "configs/tiny.yaml"))
    assert (result["git_commit"], result["git_dirty"]) == (found.hash, found.dirty)
    named = result["git_commit"] + ("+dirty" if result["git_dirty"] else "")
    assert f"(commit {named}, {found.source})" in version.version_line()
    if installed:
        assert (result["git_commit"], result["git_dirty"]) == ("0123abc", True)


RECORD_FIELDS = {"variant", "method", "overrides", "tokens_per_s", "task_tokens_per_s", "padded_tokens_per_s", "step_time_s", "phase_time_s",
                 "mfu", "model_flops_per_step", "model_flops_breakdown", "peak_mem_bytes", "ratio_vs_sft",
                 "safety_passes", "probe_passes"}
TOP_FIELDS = {"schema", "date_utc", "git_commit", "versions", "machine", "world_size", "peak_flops_per_s", "config",
              "bench", "flops_model", "variants"}


def test_bench_end_to_end_two_ranks(tmp_path):
    """Four variants in one 2-rank launch (so later deepspeed.initialize calls run in the
    same processes); the JSON has its fields and one record per variant; no timing asserted.
    safety_mix (the data-mixing baseline) is SFT's step on other batches: measured all the same."""
    out = tmp_path / "bench.json"
    proc = launch(["sap_ds/bench.py", "--config", "configs/tiny.yaml", "--out", str(out), "--warmup", "1", "--steps", "2",
                   "--variants", "sft,paper,lisa,safety_mix"], timeout=360)
    assert proc.returncode == 0
    result = json.loads(out.read_text())
    assert TOP_FIELDS <= set(result) and result["world_size"] == 2
    assert result["versions"]["torch"] and result["versions"]["deepspeed"]
    assert result["machine"]["device"] == "cpu" and result["peak_flops_per_s"]["total"] > 0
    code = version.commit()  # the commit `sap-ds --version` names
    assert (result["git_commit"], result["git_dirty"]) == (code.hash, code.dirty) and code.hash
    sft, paper, lisa, mix = result["variants"]
    assert (sft["variant"], sft["method"], paper["variant"], paper["method"]) == ("sft", "sft", "paper", "sap")
    assert (mix["variant"], mix["method"]) == ("safety_mix", "safety_mix") and mix["settings"]["safety_mix_examples"] == 1
    assert mix["ratio_vs_sft"] == pytest.approx(mix["tokens_per_s"] / sft["tokens_per_s"]) and mix["safety_passes"] == 0
    for r in (sft, paper, mix):
        assert RECORD_FIELDS <= set(r)
        assert r["tokens_per_s"] > 0 and r["padded_tokens_per_s"] >= r["tokens_per_s"]
        assert len(r["step_time_s"]["per_step"]) == 2 and r["peak_mem_bytes"] > 0 and 0 < r["mfu"]
        assert tuple(r["phase_time_s"]) == all_phases()  # every method's phases, in every record
        assert r["engine_released"]  # teardown freed the engine: no model leaks into the next variant
    assert sft["ratio_vs_sft"] == 1.0 and sft["model_flops_breakdown"]["probe_forward"] == 0
    assert paper["safety_passes"] == 2 and paper["probe_passes"] == 2
    assert 0 < paper["ideal_ratio"] < 1 and paper["ideal_ratio"] == pytest.approx(paper["ideal_ratio_nominal"])
    assert paper["ratio_vs_sft"] == pytest.approx(paper["tokens_per_s"] / sft["tokens_per_s"])
    # the same task batches: SFT's FLOPs are the first two parts of SAP's
    assert paper["model_flops_breakdown"]["task_forward"] == sft["model_flops_breakdown"]["task_forward"]
    assert paper["phase_time_s"]["safety"] > 0 and sft["phase_time_s"]["safety"] == 0
    # Lisa (2 alignment steps, then 14 task steps): timed steps 1 and 2 are one alignment step
    # (its safe responses counted as trained tokens, not task tokens) and one task step
    assert lisa["method"] == "lisa" and lisa["steps_on_other_data"] == 1 and RECORD_FIELDS <= set(lisa)
    assert 0 < lisa["task_tokens_per_s"] < lisa["tokens_per_s"]
    assert lisa["ratio_vs_sft"] == pytest.approx(lisa["task_tokens_per_s"] / sft["task_tokens_per_s"])
    assert sft["task_tokens_per_s"] == sft["tokens_per_s"] and lisa["phase_time_s"]["probe"] == 0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
