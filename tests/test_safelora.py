"""SafeLoRA (sap_ds/methods/safelora.py) against the authors' code (tests/support/reference_safelora.py), its
properties, the export step of a real run, the CLI on that run's adapter, and bad input.

The models: tiny-random is the unaligned base; the "aligned" model is it plus a rank-2
change of every q_proj and v_proj weight, so V = W_aligned - W_base has rank 2 and the
alignment matrices are non-trivial. Everything runs in one process except the training
run of the export test."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
import torch
from safetensors.torch import load_file, save_file

from sap_ds.config.reading import read_config_file
from sap_ds.config.run import build_config
from sap_ds.errors import ConfigError
from sap_ds.methods.safelora import (
    SafeLoraError,
    alignment_matrices,
    apply_safelora,
    check_export_config,
    lora_layers,
    project_lora,
    weight_name,
)
from tests.support.launch import run_single
from tests.support.reference_safelora import safelora_reference
from tests.support.repo import REPO

ALIGN_RANK = 2
LORA_R = 8
# fp32 arithmetic in another order (the reference forms C = V V^T / ||V||, sap-ds V (V^T B) / ||V||):
# measured max |difference| 7.5e-8 on B entries up to 0.34, where a projection moves the largest
# entry of each B by 0.27 or more, so the tolerance is far below what a wrong projection gives.
ATOL, RTOL = 1e-6, 1e-5


def _cfg(select="number", threshold=0.5, num_layers=10, projection="published"):
    return SimpleNamespace(select=select, threshold=threshold, num_layers=num_layers, projection=projection)


@pytest.fixture(scope="module")
def aligned_dir(tmp_path_factory, tiny_model_path, tokenizer) -> Path:
    """tiny-random plus a seeded rank-2 change of every q_proj / v_proj weight (with tokenizer,
    so that a run can fine-tune it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                out, inp = param.shape
                param += 0.05 * torch.randn(out, ALIGN_RANK, generator=gen) @ torch.randn(ALIGN_RANK, inp, generator=gen)
    folder = tmp_path_factory.mktemp("aligned")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _random_lora(aligned_dir: Path, seed: int = 0, r: int = LORA_R):
    """A peft LoRA (r 8 unless given, q/v) over the aligned model with random non-zero A and B."""
    from transformers import AutoModelForCausalLM

    from sap_ds.config.run import LoraConfig
    from sap_ds.model.loading import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32),
                       LoraConfig(enabled=True, r=r, alpha=16, dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, aligned_dir) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    _random_lora(aligned_dir).save_pretrained(folder, safe_serialization=True)
    return folder


def _reference(aligned_dir, tiny_model_path, with_terms=False, **kwargs):
    model, cos, count, pdst, cutoff, terms = safelora_reference(_random_lora(aligned_dir), tiny_model_path, aligned_dir,
                                                                **kwargs)
    lora_b = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    return (lora_b, cos, count, pdst, cutoff, terms) if with_terms else (lora_b, cos, count, pdst, cutoff)


# --------------------------------------------------------------------------- (a) the authors' code


@pytest.mark.parametrize("select", ["number", "threshold"])
def test_projection_matches_ibm_safelora_code(select, tmp_path, adapter_dir, aligned_dir, tiny_model_path):
    """The adapter sap-ds writes equals the one the authors' algorithm gives, layer by layer:
    same cosines (5 decimals, as the code rounds), same selected layers, same projected B
    within fp32 tolerance, the untouched tensors bit-identical, the same Pdst."""
    if select == "number":
        kwargs, cfg = {"num_proj_layers": 3}, _cfg("number", num_layers=3)
    else:  # a threshold between the cosines, so that some layers are projected and some not
        _, cos, *_ = _reference(aligned_dir, tiny_model_path, select_layers_type="number", num_proj_layers=3)
        threshold = float(sorted(cos)[len(cos) // 2])
        kwargs, cfg = {"threshold": threshold}, _cfg("threshold", threshold=threshold)
    ref_b, ref_cos, ref_count, ref_pdst, ref_cutoff = _reference(aligned_dir, tiny_model_path,
                                                                 select_layers_type=select, **kwargs)
    report = apply_safelora(adapter_dir, tiny_model_path, aligned_dir, tmp_path / "out", cfg)
    ours, original = load_file(str(tmp_path / "out" / "adapter_model.safetensors")), load_file(
        str(adapter_dir / "adapter_model.safetensors"))

    rows = report["per_layer"]
    assert len(rows) == len(ref_cos) == 8  # 4 layers x (q_proj, v_proj)
    assert [round(r["cosine"], 5) for r in rows] == pytest.approx(list(ref_cos), abs=1.5e-5)
    assert 0 < report["projected"] == ref_count < len(rows)
    assert report["cutoff"] == pytest.approx(ref_cutoff)
    assert report["pdst"] == pytest.approx(ref_pdst, abs=1e-6)
    for row in rows:
        key_b = f"base_model.model.{row['name']}.lora_B.weight"
        torch.testing.assert_close(ours[key_b], ref_b[key_b], atol=ATOL, rtol=RTOL)
        if row["projected"]:
            assert (ours[key_b] - original[key_b]).abs().max() > 1e3 * ATOL
        else:
            assert torch.equal(ours[key_b], original[key_b])
    for key in original:
        if "lora_A" in key:
            assert torch.equal(ours[key], original[key])
    assert json.loads((tmp_path / "out" / "safelora.json").read_text())["projected"] == ref_count
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == json.loads(
        (adapter_dir / "adapter_config.json").read_text())


# Layers the alignment leaves as they are (V = 0): 3 of the 8 LoRA layers.
UNCHANGED = ("model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.v_proj", "model.layers.3.self_attn.q_proj")


@pytest.fixture(scope="module")
def partly_aligned_dir(tmp_path_factory, aligned_dir, tiny_model_path) -> Path:
    """aligned_dir with the weights of ``UNCHANGED`` put back to the base model's: a fine-tune
    that targets modules the alignment did not change."""
    base = load_file(str(tiny_model_path / "model.safetensors"))
    folder = tmp_path_factory.mktemp("partly_aligned") / "model"
    return _fake_model(folder, aligned_dir, lambda t: {k: (base[k] if k.removesuffix(".weight") in UNCHANGED else v)
                                                       for k, v in t.items()})


@pytest.mark.parametrize("select", ["number", "threshold"])
def test_layers_the_alignment_did_not_change_are_left_as_the_authors_code_leaves_them(
        select, tmp_path, partly_aligned_dir, tiny_model_path, caplog):
    """V = 0: the authors' cosine is NaN and the layer is never projected, in either mode, and
    in ``number`` mode it takes none of the num_layers places (the code sorts NaN last). sap-ds
    the same: the same layers projected, the same B, those layers' B bit-identical, their
    cosine None, the log naming them, Pdst the mean of the code's finite terms (the code's is NaN)."""
    adapter = tmp_path / "adapter"
    _random_lora(partly_aligned_dir).save_pretrained(adapter, safe_serialization=True)
    if select == "number":
        kwargs, cfg = {"num_proj_layers": 3}, _cfg("number", num_layers=3)
    else:
        _, cos, *_ = _reference(partly_aligned_dir, tiny_model_path, select_layers_type="number", num_proj_layers=3)
        threshold = float(numpy.median([c for c in cos if not numpy.isnan(c)]))
        kwargs, cfg = {"threshold": threshold}, _cfg("threshold", threshold=threshold)
    ref_b, ref_cos, ref_count, ref_pdst, ref_cutoff, ref_terms = _reference(
        partly_aligned_dir, tiny_model_path, with_terms=True, select_layers_type=select, **kwargs)
    with caplog.at_level("WARNING", logger="sap_ds"):
        report = apply_safelora(adapter, tiny_model_path, partly_aligned_dir, tmp_path / "out", cfg)
    ours, original = (load_file(str(folder / "adapter_model.safetensors")) for folder in (tmp_path / "out", adapter))

    rows = report["per_layer"]
    nan = [bool(numpy.isnan(c)) for c in ref_cos]
    assert sum(nan) == len(UNCHANGED) and math.isnan(ref_pdst)  # the authors' code: NaN cosines, NaN Pdst
    assert [r["cosine"] is None for r in rows] == nan == [r["name"] in UNCHANGED for r in rows]
    assert [round(r["cosine"], 5) for r in rows if r["cosine"] is not None] == pytest.approx(
        [c for c in ref_cos if not numpy.isnan(c)], abs=1.5e-5)
    assert 0 < report["projected"] == ref_count < len(rows) - len(UNCHANGED)
    assert report["aligned_unchanged"] == len(UNCHANGED) and report["cutoff"] == pytest.approx(ref_cutoff)
    assert report["pdst"] == pytest.approx(float(numpy.nanmean(ref_terms)), abs=1e-6)
    for row in rows:
        key_b = f"base_model.model.{row['name']}.lora_B.weight"
        torch.testing.assert_close(ours[key_b], ref_b[key_b], atol=ATOL, rtol=RTOL)
        if row["name"] in UNCHANGED:
            assert not row["projected"] and row["pdst"] is None and torch.equal(ours[key_b], original[key_b])
    assert "3 of 8 LoRA layers are the same in the base and aligned models" in caplog.text
    assert all(name in caplog.text for name in UNCHANGED)


def test_more_layers_than_the_alignment_changed_is_an_error(tmp_path, partly_aligned_dir, tiny_model_path):
    """num_layers above the 5 changed layers: the authors' cutoff is then NaN and the code
    projects nothing, silently; sap-ds refuses, naming the count and why."""
    adapter = tmp_path / "adapter"
    _random_lora(partly_aligned_dir).save_pretrained(adapter, safe_serialization=True)
    *_, count, pdst, cutoff = _reference(partly_aligned_dir, tiny_model_path, select_layers_type="number",
                                         num_proj_layers=6)
    assert count == 0 and math.isnan(cutoff)
    with pytest.raises(SafeLoraError, match=r"num_layers: 6 is more than the adapter's 5 projectable LoRA layers \(3 of "
                                            r"its 8 are unchanged by the alignment, V = 0, and never projected\); give 0..5"):
        apply_safelora(adapter, tiny_model_path, partly_aligned_dir, tmp_path / "out", _cfg("number", num_layers=6))
    assert not (tmp_path / "out").exists()


def test_a_layer_whose_output_size_is_r_breaks_the_authors_code_not_sap_ds(tmp_path, aligned_dir, tiny_model_path):
    """r 32 = v_proj's output size (2 key-value heads x 16): the code takes that lora_B for a
    lora_A (``shape[0] == r``) and pairs the next q_proj with v_proj's 32 x 32 matrix, a
    shape error. sap-ds matches layers by name and projects every layer."""
    adapter = tmp_path / "adapter"
    _random_lora(aligned_dir, r=32).save_pretrained(adapter, safe_serialization=True)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        safelora_reference(_random_lora(aligned_dir, r=32), tiny_model_path, aligned_dir, "threshold", 1.0)
    report = apply_safelora(adapter, tiny_model_path, aligned_dir, tmp_path / "out", _cfg("threshold", threshold=1.0))
    assert report["layers"] == report["projected"] == 8


# --------------------------------------------------------------------------- (b) properties


def test_threshold_below_zero_or_zero_layers_leave_the_adapter_unchanged(adapter_dir, aligned_dir, tiny_model_path):
    """C is positive semi-definite, so cos(C B A, B A) >= 0: threshold -1 projects nothing;
    neither does num_layers 0."""
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    names = [weight_name(m) for m in lora_layers(state)]
    matrices = alignment_matrices(tiny_model_path, aligned_dir, ["q_proj", "v_proj"], names)
    for kwargs in ({"select": "threshold", "threshold": -1.0}, {"select": "number", "num_layers": 0}):
        new, report = project_lora(state, matrices, **kwargs)
        assert report["projected"] == 0 and all(r["cosine"] >= 0 for r in report["per_layer"])
        assert all(torch.equal(new[k], state[k]) for k in state)


def test_update_inside_the_alignment_subspace_is_kept(adapter_dir, aligned_dir, tiny_model_path):
    """B along V's top left singular vector is an eigenvector of C = V V^T / ||V||: cosine 1,
    not projected at threshold 0.5, and C B = (sigma_1^2 / ||V||_F) B (the published C scales,
    it is not idempotent). The orthogonal projector keeps any B in V's column space, at full size."""
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    layers = lora_layers(state)
    names = [weight_name(m) for m in layers]
    published = alignment_matrices(tiny_model_path, aligned_dir, ["q_proj", "v_proj"], names)
    orthogonal = alignment_matrices(tiny_model_path, aligned_dir, ["q_proj", "v_proj"], names, projection="orthogonal")
    gen = torch.Generator().manual_seed(3)
    inside_top, inside_span, gains = dict(state), dict(state), {}
    for module, (_, key_b) in layers.items():
        delta = published[weight_name(module)].delta
        u, s, _ = torch.linalg.svd(delta, full_matrices=False)
        inside_top[key_b] = u[:, :1] @ torch.randn(1, LORA_R, generator=gen)
        inside_span[key_b] = u[:, :ALIGN_RANK] @ torch.randn(ALIGN_RANK, LORA_R, generator=gen)
        gains[module.removeprefix("base_model.model.")] = float(s[0] ** 2 / torch.linalg.matrix_norm(delta))
    new, report = project_lora(inside_top, published, select="threshold", threshold=0.5)
    assert report["projected"] == 0
    for row in report["per_layer"]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert row["norm_ratio"] == pytest.approx(gains[row["name"]], rel=1e-4)
    assert all(torch.equal(new[k], inside_top[k]) for k in state)
    C = published[names[0]].matrix()
    assert not torch.allclose(C @ C, C, atol=1e-3)  # not a projector
    _, report = project_lora(inside_span, orthogonal, select="threshold", threshold=0.5)
    assert report["projected"] == 0
    assert all(r["cosine"] == pytest.approx(1.0, abs=1e-5) and r["norm_ratio"] == pytest.approx(1.0, abs=1e-4)
               for r in report["per_layer"])


# --------------------------------------------------------------------------- (c) export, (d) CLI


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, aligned_dir, tiny_model_path) -> Path:
    out = tmp_path_factory.mktemp("run")
    proc = run_single(["--config", "configs/tiny.yaml", f"output_dir={out}", f"model.path={aligned_dir}",
                       "lora.enabled=true", "train.max_steps=2", "train.eval_every=0", "train.lr=1e-2",
                       "export.safelora.enabled=true", "export.safelora.base_model=tiny-random",
                       f"export.safelora.aligned_model={aligned_dir}", "export.safelora.num_layers=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "export"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_export_writes_projected_adapter_and_merges_it(exported_run, aligned_dir, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert {p.name for p in exported_run.iterdir()} >= {"adapter", "adapter_unprojected", "model", "safelora.json"}
    report = json.loads((exported_run / "safelora.json").read_text())
    assert report["select"] == "number" and report["projected"] == 3 and report["layers"] == 8
    projected = load_file(str(exported_run / "adapter" / "adapter_model.safetensors"))
    trained = load_file(str(exported_run / "adapter_unprojected" / "adapter_model.safetensors"))
    matrices = alignment_matrices(tiny_model_path, aligned_dir, ["q_proj", "v_proj"],
                                  [weight_name(m) for m in lora_layers(trained)])
    expected, _ = project_lora(trained, matrices, select="number", num_layers=3)
    changed = {k for k in trained if not torch.equal(projected[k], trained[k])}
    assert len(changed) == 3 and all("lora_B" in k for k in changed)
    for key in trained:
        torch.testing.assert_close(projected[key], expected[key], atol=ATOL, rtol=RTOL)

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(exported_run / "model", dtype=torch.float32)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32),
                                       exported_run / "adapter").merge_and_unload()
    torch.testing.assert_close(_logits(model, ids), _logits(merged, ids), atol=1e-4, rtol=0)
    # model/ holds the projected update, not the trained one: its q/v weights differ from the
    # unprojected merge by far more than the tolerance in the projected layers
    unprojected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32),
                                            exported_run / "adapter_unprojected").merge_and_unload()
    ours, theirs, other = model.state_dict(), merged.state_dict(), unprojected.state_dict()
    for row in report["per_layer"]:
        key = f"{row['name']}.weight"
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)
        assert ((ours[key] - other[key]).abs().max() > 1e-4) == row["projected"]


def test_cli_projects_an_exported_adapter(exported_run, aligned_dir, tmp_path):
    from sap_ds.cli import main

    out = tmp_path / "cli"
    args = ["safelora", "--adapter", str(exported_run / "adapter_unprojected"), "--base", "tiny-random",
            "--aligned", str(aligned_dir), "--out", str(out), "--num-layers", "3", "--merge"]
    assert main(args) == 0
    written = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for key, value in load_file(str(exported_run / "adapter" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(written[key], value, atol=ATOL, rtol=RTOL)
    rows = zip(json.loads((out / "safelora.json").read_text())["per_layer"],
               json.loads((exported_run / "safelora.json").read_text())["per_layer"], strict=True)
    assert all(a["name"] == b["name"] and a["projected"] == b["projected"] and a["cosine"] == pytest.approx(b["cosine"])
               for a, b in rows)
    exported = load_file(str(exported_run / "model" / "model.safetensors"))
    merged = load_file(str(out / "model" / "model.safetensors"))
    assert exported.keys() == merged.keys()
    for key in exported:
        torch.testing.assert_close(merged[key], exported[key], atol=1e-5, rtol=0)
    # threshold mode: every layer with cosine <= 0.5; an existing --out is refused, untouched
    before = sorted(p.name for p in out.iterdir())
    assert main([*args[:-3], "--select", "threshold", "--threshold", "0.5"]) == 2
    assert sorted(p.name for p in out.iterdir()) == before
    assert main([*args[:8], str(tmp_path / "t"), "--select", "threshold", "--threshold", "0.5"]) == 0
    report = json.loads((tmp_path / "t" / "safelora.json").read_text())
    assert report["projected"] == sum(round(r["cosine"], 5) <= 0.5 for r in report["per_layer"])


# --------------------------------------------------------------------------- (e) bad input


def _fake_model(folder: Path, source: Path, change=None) -> Path:
    """A model folder with source's config.json and its tensors, edited by ``change``."""
    folder.mkdir(parents=True)
    shutil.copy(source / "config.json", folder / "config.json")
    tensors = load_file(str(source / "model.safetensors"))
    save_file(change(tensors) if change else tensors, str(folder / "model.safetensors"))
    return folder


def test_bad_input_is_reported_with_the_key_and_nothing_is_written(tmp_path, adapter_dir, aligned_dir, tiny_model_path):
    def fails(expected: list[str], base=tiny_model_path, aligned=aligned_dir, adapter=adapter_dir, **cfg):
        out = tmp_path / "out"
        with pytest.raises(SafeLoraError) as info:
            apply_safelora(adapter, base, aligned, out, _cfg(**cfg))
        for text in expected:
            assert text in str(info.value), str(info.value)
        assert not out.exists() and not list(tmp_path.glob(".out-*"))

    fails(["base_model", "nowhere", "not a local folder"], base=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    fails(["aligned_model", "no config.json"], aligned=tmp_path / "empty")
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text("{}")
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    fails(["base_model", "pytorch_model.bin", "safetensors"], base=bin_only)
    narrow = lambda t: {k: (v[:16] if k.endswith("layers.1.self_attn.q_proj.weight") else v) for k, v in t.items()}
    fails(["model.layers.1.self_attn.q_proj.weight", "[16, 64]", "[64, 64]"],
          base=_fake_model(tmp_path / "narrow", tiny_model_path, narrow))
    no_v = lambda t: {k: v for k, v in t.items() if "v_proj" not in k}
    fails(["aligned_model", "target modules ['v_proj']"], aligned=_fake_model(tmp_path / "no_v", aligned_dir, no_v))
    fails(["num_layers", "0..8"], num_layers=9)
    fails(["select", "threshold, number"], select="all")
    fails(["same folder"], aligned=tiny_model_path)
    fails(["full model", "lora.enabled"], adapter=aligned_dir)  # a full fine-tuning export
    not_lora = tmp_path / "not_lora"
    shutil.copytree(adapter_dir, not_lora)
    save_file({"base_model.model.lm_head.weight": torch.zeros(2, 2)}, str(not_lora / "adapter_model.safetensors"))
    fails(["not_lora", "no LoRA weights", "lm_head.weight"], adapter=not_lora)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(SafeLoraError, match="already exists"):
        apply_safelora(adapter_dir, tiny_model_path, aligned_dir, tmp_path / "out", _cfg())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_config_needs_lora_and_both_models_and_checks_them_before_training(tmp_path, aligned_dir):
    tree = read_config_file(REPO / "configs" / "tiny.yaml")
    with pytest.raises(ConfigError, match="export.safelora.base_model and export.safelora.aligned_model"):
        build_config(tree, ["lora.enabled=true", "export.safelora.enabled=true"])
    with pytest.raises(ConfigError, match="needs lora.enabled true"):
        build_config(tree, ["export.safelora.enabled=true", "export.safelora.base_model=tiny-random",
                            f"export.safelora.aligned_model={aligned_dir}"])
    enabled = ["lora.enabled=true", "export.safelora.enabled=true", "export.safelora.base_model=tiny-random"]
    with pytest.raises(SafeLoraError, match=f"export.safelora.aligned_model: '{tmp_path / 'gone'}' is not a local folder"):
        check_export_config(build_config(tree, [*enabled, f"export.safelora.aligned_model={tmp_path / 'gone'}"]))
    with pytest.raises(SafeLoraError, match="export.safelora.base_model: .* in the run's model.path"):
        check_export_config(build_config(tree, [*enabled, f"export.safelora.aligned_model={aligned_dir}",
                                                "model.path=embedded"]))
    check_export_config(build_config(tree, [*enabled, f"export.safelora.aligned_model={aligned_dir}"]))
