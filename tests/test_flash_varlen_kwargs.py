"""Packed batches under flash-attention (issue 31, item 12): sap-ds computes the varlen
boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``) once per batch and passes them to the
model's forward, instead of letting transformers rebuild them from the position ids, with
host syncs, in every attention layer of every forward and recompute.

On CPU there is no flash-attn, so transformers' ``flash_attention_2`` entry is replaced by a
spy that records what each layer's attention receives and computes varlen attention from
those boundaries with plain torch (causal sdpa on each segment): the boundaries must equal
what transformers' own ``prepare_fa_kwargs_from_position_ids`` computes from the same
position ids, be the same objects in every layer, and give the loss of the examples run
unpacked."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from sap_ds.config.run import DataSource, ModelConfig
from sap_ds.data import ChatTokenizer, collate, load_examples, pack
from sap_ds.model.loading import load_model
from sap_ds.model.losses import task_loss
from sap_ds.model.packed_forward import packed_forward
from tests.support.repo import REPO

VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _varlen_attention(calls):
    """An attention function with flash_attention_2's interface: records its varlen kwargs and
    attends causally within each [cu[i], cu[i+1]) segment of the one packed row."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append({k: kwargs.get(k) for k in VARLEN})
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:  # what a model gets without the kwargs: one causal sequence over the whole row
            cu = torch.tensor([0, query.shape[2]])
        out = torch.empty_like(query)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            out[:, :, start:end] = F.scaled_dot_product_attention(
                query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling,
                enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    return attend


@pytest.fixture()
def flash_spy(monkeypatch):
    # Imported here, not at collection: transformers.modeling_utils imports triton, and
    # tests/test_kernels.py must set TRITON_INTERPRET=1 before anything in its worker does.
    from transformers.modeling_utils import AttentionInterface

    calls: list[dict] = []
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", _varlen_attention(calls))
    return calls


def test_flash_forward_gets_varlen_kwargs_once_per_batch(tiny_model_path, tokenizer, flash_spy):
    torch.manual_seed(0)
    chat = ChatTokenizer(tokenizer, 80)
    examples = [chat.encode(e.messages, e.response) for e in
                load_examples(DataSource(path=str(REPO / "data/sst2/train.tsv"), format="sst2", limit=6))]
    model = load_model(ModelConfig(path="tiny-random", dtype="fp32", attn_implementation="sdpa"), tiny_model_path)
    pad = tokenizer.pad_token_id
    packed = collate([pack(examples[:3]), pack(examples[3:5]), pack(examples[5:])], pad)  # padding in two rows
    with torch.no_grad():
        reference = task_loss(model(input_ids=(u := collate(examples, pad))["input_ids"],
                                    attention_mask=u["attention_mask"], use_cache=False).logits, u["labels"])
        model.config._attn_implementation = "flash_attention_2"  # what load_model gives with flash-attn installed
        loss = task_loss(packed_forward(model, packed, "flash_varlen"), packed["labels"])

    layers = model.config.num_hidden_layers
    assert len(flash_spy) == layers
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(packed["position_ids"].reshape(1, -1))
    first = flash_spy[0]
    assert first["cu_seq_lens_q"] is not None, "the model rebuilds the boundaries in every layer"
    assert torch.equal(first["cu_seq_lens_q"], cu_q) and torch.equal(first["cu_seq_lens_k"], cu_k)
    assert first["cu_seq_lens_q"].dtype == cu_q.dtype == torch.int32
    assert isinstance(first["max_length_q"], int) and isinstance(first["max_length_k"], int)  # no sync per layer
    assert first["max_length_q"] == int(max_q) and first["max_length_k"] == int(max_k)
    assert all(call[k] is first[k] for call in flash_spy for k in VARLEN), "computed more than once per batch"
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_sdpa_forward_gets_no_varlen_kwargs(tiny_model_path, tokenizer, monkeypatch):
    """The varlen kwargs are flash-attention's: a model on sdpa (even in the one-row layout)
    gets only the position ids, as before."""
    seen = []
    model = load_model(ModelConfig(path="tiny-random", dtype="fp32", attn_implementation="sdpa"), tiny_model_path)
    original = type(model).forward

    def spy(self, *args, **kwargs):
        seen.append(set(kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "position_ids": torch.tensor([[0, 1, 0, 1]]),
             "sequence_ids": torch.tensor([[0, 0, 1, 1]])}
    with torch.no_grad():
        for mode in ("flash_varlen", "position_ids"):
            packed_forward(model, batch, mode)
    assert all(not (keys & set(VARLEN)) for keys in seen), seen
