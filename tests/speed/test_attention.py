"""The one batch → attention conversion (``speed/attention.py``): block masks in each form, FlashAttention varlen's
fixed-size offsets from document ids, the sdpa fallback (validation), generation through sdpa, the attention choice
and the data module's part (a neutral batch with its document bound).

The varlen kernel needs CUDA: its tests are in ``tests/gpu/test_varlen.py`` (the GPU host runs them). On a CPU the
offsets are checked against our block mask with a reference attention written out per segment.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_llama_lab.data.packing import document_ids, pad_packed_batch
from lit_llama_lab.generation import generate
from lit_llama_lab.model.adapters import unwrap_peft
from lit_llama_lab.speed.attention import (
    VARLEN,
    attention_inputs,
    block_causal_mask,
    check_documents,
    document_mask,
    packed_attention_mask,
    register_varlen_attention,
    varlen_keys,
)
from lit_llama_lab.speed.loss import label_loss
from tests.helpers import emoji_batch, make_module

# three rows of 8: two documents and padding; one document filling the row; three documents and padding
IDS = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1],
                    [0, 0, 0, 0, 0, 0, 0, 0],
                    [0, 1, 1, 2, 2, 2, -1, -1]])


def spans(ids: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` in the flattened batch of each document and of each row's padding, in order."""
    rows, width = ids.shape
    out = []
    for r in range(rows):
        for d in [*range(int(ids[r].max()) + 1), -1]:
            where = (ids[r] == d).nonzero().flatten()
            if len(where):
                assert torch.equal(where, torch.arange(int(where[0]), int(where[-1]) + 1)), "not contiguous"
                out.append((r * width + int(where[0]), r * width + int(where[-1]) + 1))
    return out


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """What FlashAttention varlen computes: causal attention within each ``[cu[i], cu[i+1])`` of ``[tokens, heads,
    dim]`` inputs, one segment at a time (empty segments skipped)."""
    out = torch.zeros_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if end > start:
            seg = [x[start:end].transpose(0, 1) for x in (q, k, v)]
            out[start:end] = F.scaled_dot_product_attention(*seg, is_causal=True).transpose(0, 1)
    return out


def test_varlen_keys_give_each_document_and_each_rows_padding_one_segment():
    keys = varlen_keys(IDS, max_documents=8)  # 6 documents: two empty segments at the end
    cu = keys["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu is keys["cu_seq_lens_k"]
    assert cu.tolist() == [0, 3, 5, 8, 16, 16, 17, 19, 22, 24, 24, 24]  # row 1 has no padding: an empty segment
    assert cu.numel() == 8 + IDS.shape[0] + 1  # max_documents + one padding segment a row, whatever the data
    assert keys["max_length_q"] == keys["max_length_k"] == IDS.shape[1]  # a Python int: the graph's static input
    segments = set(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
    assert set(spans(IDS)) <= segments  # every document (and padding) is exactly one segment
    assert varlen_keys(IDS, 6)["cu_seq_lens_q"].tolist() == cu.tolist()[:-2]  # the size follows max_documents only


def test_varlen_segments_attend_like_our_block_mask_at_every_real_token():
    torch.manual_seed(0)
    rows, width = IDS.shape
    q, k, v = (torch.randn(rows, 2, width, 8) for _ in range(3))
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(IDS)).transpose(1, 2)
    flat = [x.transpose(1, 2).reshape(rows * width, 2, 8) for x in (q, k, v)]
    varlen = reference_varlen(*flat, varlen_keys(IDS, 8)["cu_seq_lens_q"]).reshape(rows, width, 2, 8)
    real = IDS >= 0
    torch.testing.assert_close(varlen[real], masked[real])


def test_too_many_documents_are_refused_on_the_cpu():
    with pytest.raises(ValueError, match="holds 6 documents, more than max_documents=5"):
        varlen_keys(IDS, 5)
    with pytest.raises(ValueError, match="max_documents=5"):
        check_documents(IDS, 5)
    check_documents(IDS, 6)


def test_padding_a_varlen_batch_widens_only_the_padding_segments():
    batch = {"input_ids": torch.ones(3, 8, dtype=torch.long), "labels": torch.ones(3, 8, dtype=torch.long),
             "position_ids": torch.zeros(3, 8, dtype=torch.long), "document_ids": IDS}  # no mask: varlen's batch
    padded = pad_packed_batch(batch, 16, pad_id=0)
    assert padded["input_ids"].shape == (3, 16) and (padded["document_ids"][:, 8:] == -1).all()
    assert "attention_mask" not in padded
    cu = varlen_keys(padded["document_ids"], 8)["cu_seq_lens_q"]
    assert cu.tolist() == [0, 3, 5, 16, 24, 32, 33, 35, 38, 48, 48, 48]


def test_lit_varlen_without_offsets_is_sdpa_with_our_mask(tiny_base):
    """Validation: a packed batch with our 4-D mask gives sdpa's logits and label loss through ``lit_varlen``."""
    model, tok = tiny_base
    batch = emoji_batch(tok, 8)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        sdpa_logits, sdpa_loss = model(**inputs).logits, label_loss(model, batch)[0]
        model.set_attn_implementation(register_varlen_attention())
        try:
            assert model.config._attn_implementation == VARLEN
            varlen_logits, varlen_loss = model(**inputs).logits, label_loss(model, batch)[0]
        finally:
            model.set_attn_implementation("sdpa")
    torch.testing.assert_close(varlen_logits, sdpa_logits)
    torch.testing.assert_close(varlen_loss, sdpa_loss)


def test_generation_switches_varlen_to_sdpa_and_back():
    module = make_module()  # peft-wrapped, as the sample callback generates
    model, tok = module.model, module.tokenizer
    causal_lm = unwrap_peft(model)
    chats = [[{"role": "user", "content": "Which emoji shows a birthday cake?"}], [{"role": "user", "content": "Hi"}]]
    causal_lm.set_attn_implementation("sdpa")  # (on the GPU host auto chose varlen)
    expected = [g.token_ids for g in generate(model, tok, chats, max_new_tokens=6)]
    causal_lm.set_attn_implementation(register_varlen_attention())
    model.train()
    got = [g.token_ids for g in generate(model, tok, chats, max_new_tokens=6)]
    assert got == expected
    assert causal_lm.config._attn_implementation == VARLEN and model.training  # both restored
    # why it must switch: transformers drops the 2-D (left) padding mask for an implementation it builds no mask for
    device = next(model.parameters()).device
    ids = torch.tensor([[tok.pad_token_id] * 3 + [5, 6, 7]], device=device)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]], device=device)
    with torch.no_grad():
        varlen_logits = model(input_ids=ids, attention_mask=mask).logits[0, -1]
        causal_lm.set_attn_implementation("sdpa")
        sdpa_logits = model(input_ids=ids, attention_mask=mask).logits[0, -1]
    assert not torch.allclose(varlen_logits, sdpa_logits)


def test_auto_attention_is_varlen_only_where_flash_attention_runs():
    module = make_module()  # on the GPU host: CUDA and bf16
    on_gpu = next(module.model.parameters()).is_cuda
    assert module.speed.attention == "auto" and module.attention == ("varlen" if on_gpu else "sdpa")
    assert unwrap_peft(module.model).config._attn_implementation == (VARLEN if on_gpu else "sdpa")
    assert make_module(compute_dtype="float32").attention == "sdpa"  # FlashAttention has no fp32 kernels
    reason = "the compute dtype is torch.float32" if on_gpu else "the model is not on a CUDA GPU"
    with pytest.raises(ValueError, match=f"varlen cannot run here: {reason}"):
        make_module(attention="varlen", compute_dtype="float32")


def test_data_module_batches_are_neutral_with_the_document_bound_and_validation_gets_the_bool_mask(tmp_path):
    from tests.data.test_datamodule import module

    data = module(tmp_path, max_seq_length=512)
    data.setup()
    raw = next(iter(data.train_dataloader()))
    batch = data.on_before_batch_transfer(dict(raw), 0)
    assert batch["max_documents"] == 4 and isinstance(batch["max_documents"], int)  # batch_size: a host int
    assert "attention_mask" not in batch  # the data layer builds no attention form
    validation = attention_inputs(batch, "sdpa")  # a varlen plan's validation attention (tests/train/test_plan.py)
    assert torch.equal(validation["attention_mask"], document_mask(batch["document_ids"]))  # validation's sdpa mask
    data.hparams.batch_size = 2  # a bound the batch breaks is refused before the transfer
    with pytest.raises(ValueError, match="holds 4 documents, more than max_documents=2"):
        data.on_before_batch_transfer(dict(raw), 0)
    unpacked = module(tmp_path, packing=False)
    unpacked.setup()
    assert "max_documents" not in unpacked.on_before_batch_transfer(next(iter(unpacked.train_dataloader())), 0)


def test_block_causal_mask_is_block_diagonal_and_causal():
    mask = block_causal_mask([[2, 3]], 6)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:2, :2] = torch.ones(2, 2).tril().bool()
    expected[2:5, 2:5] = torch.ones(3, 3).tril().bool()
    expected[5, 5] = True  # padding attends only to itself (no NaN rows)
    assert torch.equal(mask, expected)


def test_eager_mask_is_additive_in_the_model_dtype():
    ids = document_ids([[2, 3]], 6)
    for dtype in (torch.float32, torch.bfloat16):
        mask = packed_attention_mask(ids, "eager", dtype)
        assert mask.dtype == dtype
        assert set(mask.unique().tolist()) == {0.0, torch.finfo(dtype).min}
        assert torch.equal(mask == 0, block_causal_mask([[2, 3]], 6))


def test_flex_block_mask_is_accepted_as_attention_mask(no_compile):
    from torch.nn.attention.flex_attention import BlockMask

    mask = packed_attention_mask(document_ids([[40, 30], [50]], 70), "flex_attention")
    assert isinstance(mask, BlockMask) and tuple(mask.shape) == (2, 1, 70, 70)


def test_eager_and_flex_masks_are_built_on_the_batchs_device_from_neutral_batches(tmp_path):
    """What the data module's after-transfer hook did, now the step's conversion: an eager float mask, a flex
    BlockMask (which neither pickles nor moves devices, so the loader's batches hold only tensors)."""
    from torch.nn.attention.flex_attention import BlockMask

    from tests.data.test_datamodule import module

    data = module(tmp_path)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert all(isinstance(v, torch.Tensor) for v in batch.values())  # picklable for worker processes
    eager = attention_inputs(batch, "eager", torch.float32)
    assert eager["attention_mask"].dtype == torch.float32 and eager["attention_mask"].ndim == 4
    assert isinstance(attention_inputs(batch, "flex_attention")["attention_mask"], BlockMask)
    with pytest.raises(ValueError, match="Unknown attention 'flash'"):
        attention_inputs(batch, "flash")


def test_varlen_inputs_split_the_flattened_batch_where_positions_restart():
    """The bench and training build the same offsets (``speed.attention.varlen_keys``): without document ids a
    restart of the positions starts a document (a padding token is one of its own), each row ends with a padding
    segment (empty here)."""
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long),
             "position_ids": torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0]]), "attention_mask": torch.ones(2, 1, 4, 4)}
    out = attention_inputs(batch, "varlen")
    assert "attention_mask" not in out
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 4, 4, 6, 7, 8, 8]
    assert out["max_length_q"] == 4  # the row width: a bound fixed by the shape
    # with the collator's document ids the padding (-1) is one segment a row
    batch["document_ids"] = torch.tensor([[0, 0, 0, 1], [0, 0, -1, -1]])
    assert attention_inputs(batch, "varlen")["cu_seq_lens_q"].tolist() == [0, 3, 4, 4, 6, 8]


def test_padded_batches_keep_their_2d_mask():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    for attention in ("sdpa", "eager", "flex_attention", "varlen"):
        assert attention_inputs(batch, attention) is batch


def test_data_module_shares_the_system_prompt_once_a_row_when_asked_and_refuses_it_unpacked(tmp_path):
    from tests.data.test_datamodule import module

    data = module(tmp_path, max_seq_length=512, share_prefix=True)
    data.setup()
    batch = data.on_before_batch_transfer(dict(next(iter(data.train_dataloader()))), 0)
    assert "max_documents" not in batch and batch["prefix_lengths"].min() > 0  # varlen does not train these
    same = module(tmp_path, max_seq_length=512)
    same.setup()
    plain = next(iter(same.train_dataloader()))
    assert torch.equal(batch["labels"][batch["labels"] != -100], plain["labels"][plain["labels"] != -100])
    assert (batch["document_ids"] >= 0).sum() < (plain["document_ids"] >= 0).sum()
    with pytest.raises(ValueError, match="needs packing"):
        module(tmp_path, packing=False, share_prefix=True)
