"""Packing (sap_ds/data/packing.py; the forward, sap_ds/model/packed_forward.py): first-fit
decreasing packs, attention that never crosses an example (packed loss and gradients equal
the unpacked ones, fp32, 1e-5, for every attention path, and a packed row without
restarting positions does not), the error for a model that can do none of it, and SAP on
packed batches: 2-rank ZeRO-3 against the plain-PyTorch reference, which runs every pack's
examples unpacked (in tests/test_zero3_reference.py, whose single launch runs it with the
other reference runs)."""
from __future__ import annotations

import types

import pytest
import torch

from sap_ds.config.run import DataConfig, DataSource, ModelConfig
from sap_ds.data import (
    ChatTokenizer,
    Packed,
    build_run_data,
    collate,
    load_examples,
    pack,
    sequence_lengths,
)
from sap_ds.data.packing import first_fit_decreasing
from sap_ds.errors import ModelError
from sap_ds.model.loading import load_model
from sap_ds.model.losses import forward_logits, task_loss
from sap_ds.model.packed_forward import packed_forward, packing_attention
from tests.support.repo import REPO


@pytest.mark.parametrize("seed", [0, 1])
def test_first_fit_decreasing(seed):
    lengths = [int(x) for x in torch.randint(1, 100, (300,), generator=torch.Generator().manual_seed(seed))]
    packs = first_fit_decreasing(lengths, 128, seed)
    assert sorted(i for p in packs for i in p) == list(range(300))
    assert all(sum(lengths[i] for i in p) <= 128 for p in packs)
    assert packs == first_fit_decreasing(lengths, 128, seed)
    assert len(packs) <= -(-sum(lengths) // 128) * 11 // 9 + 1  # FFD's bound: 11/9 OPT + 1
    assert first_fit_decreasing([6, 5, 4, 3, 2, 2], 8, seed) in ([[0, 4], [1, 3], [2, 5]], [[0, 5], [1, 3], [2, 4]])


@pytest.fixture(scope="module")
def examples(tokenizer):
    chat = ChatTokenizer(tokenizer, 80)  # SST-2: 50-80 tokens, some cut at 80
    return [chat.encode(e.messages, e.response) for e in
            load_examples(DataSource(path=str(REPO / "data/sst2/train.tsv"), format="sst2", limit=6))]


def _loss_and_grads(model, batch, forward):
    model.zero_grad(set_to_none=True)
    loss = task_loss(forward(model, batch), batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model_path, tokenizer, examples, attn):
    torch.manual_seed(0)
    model = load_model(ModelConfig(path="tiny-random", dtype="fp32", attn_implementation=attn), tiny_model_path)
    assert packing_attention(model) == "position_ids"  # transformers' masking utilities read packed position ids
    pad = tokenizer.pad_token_id
    packs = [pack(examples[:3]), pack(examples[3:5]), pack(examples[5:])]  # 3, 2 and 1 examples: padding in two rows
    packed, unpacked = collate(packs, pad), collate(examples, pad)
    assert sequence_lengths(packed) == sequence_lengths(unpacked) == [len(e.input_ids) for e in examples]
    ref_loss, ref_grads = _loss_and_grads(model, unpacked, forward_logits)
    modes = ["position_ids", "block_mask"] + (["flash_varlen"] if attn == "sdpa" else [])  # flash's one-row layout
    for mode in modes:
        loss, grads = _loss_and_grads(model, packed, lambda m, b: packed_forward(m, b, mode))
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6), mode
        for name, g in ref_grads.items():
            assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item()), f"{mode}: {name}"
    crossed = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).repeat(len(packs), 1))
    with torch.no_grad():
        # the trainer's forward (losses.forward_logits) takes the model's own path
        assert task_loss(forward_logits(model, packed), packed["labels"]).item() == pytest.approx(ref_loss.item(), rel=1e-5)
        # control: the same rows as one causal sequence each (positions not restarting) attend across examples
        leaked = task_loss(model(input_ids=crossed["input_ids"], position_ids=crossed["position_ids"]).logits, packed["labels"])
    assert abs(leaked.item() - ref_loss.item()) > 1e-3


def test_model_that_cannot_pack_is_an_error_before_training():
    class Opaque(torch.nn.Module):  # takes no position ids
        config = types.SimpleNamespace(_attn_implementation="sdpa")

        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(ModelError) as info:
        packing_attention(Opaque())
    msg = str(info.value)
    assert "data.packing" in msg and "Opaque" in msg and "data.packing=false" in msg

    class OldStyle(torch.nn.Module):  # positions and a 4-D mask, but no transformers masking utilities
        config = types.SimpleNamespace(_attn_implementation="sdpa")

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return input_ids

    assert packing_attention(OldStyle()) == "block_mask"
    OldStyle.config = types.SimpleNamespace(_attn_implementation="flash_attention_2")
    assert packing_attention(OldStyle()) == "flash_varlen"


def test_run_data_packs_every_example_once(tokenizer, tmp_path):
    cfg = DataConfig(train=[DataSource(path=str(REPO / "data/alpaca/seed_tasks.jsonl"), format="alpaca_seed", limit=40)],
                     max_length=256, packing=True, cache_dir=str(tmp_path))
    data = build_run_data(cfg, tokenizer, 0, need_safety=False)
    plain = build_run_data(cfg.model_copy(update={"packing": False}), tokenizer, 0, need_safety=False)
    assert data.packed and len(data.examples) == len(plain.train) == 40 and len(data.train) < 25
    members = [(m.input_ids, m.labels) for p in data.train for m in p.members]
    assert sorted(members) == sorted((t.input_ids, t.labels) for t in plain.train)
    assert all(isinstance(p, Packed) and len(p.input_ids) <= 256 for p in data.train)
    assert int(data.train.lengths.sum()) == int(plain.train.lengths.sum())
    assert data.summary()["packs"] == len(data.train) and 0.5 < data.summary()["pack_fill"] <= 1.0
