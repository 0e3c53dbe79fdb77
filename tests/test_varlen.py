"""FlashAttention varlen in training: fixed-size offsets from document ids, the sdpa fallback (validation),
generation through sdpa, the attention choice and the data module's part.

The kernel needs CUDA: the tests marked ``cuda`` run on the GPU host (``pytest tests/test_varlen.py`` there) and are
skipped elsewhere. On a CPU the offsets are checked against our block mask with a reference attention written out
per segment.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lit_llama_lab.data.emoji import build_emoji_rows, emoji_messages
from lit_llama_lab.data.masking import assistant_labels
from lit_llama_lab.data.packing import collate_packed, document_mask, pack_best_fit, pad_packed_batch
from lit_llama_lab.fast import (
    VARLEN,
    check_documents,
    register_varlen_attention,
    unwrap_peft,
    varlen_attention_forward,
    varlen_keys,
)
from lit_llama_lab.generation import generate
from lit_llama_lab.module import label_loss
from tests.test_module import emoji_batch, make_module

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention varlen needs a GPU (run on the GPU host)")

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
    assert module.hparams.attn_implementation == "auto" and module.attention == ("varlen" if on_gpu else "sdpa")
    assert unwrap_peft(module.model).config._attn_implementation == (VARLEN if on_gpu else "sdpa")
    assert make_module(compute_dtype="float32").attention == "sdpa"  # FlashAttention has no fp32 kernels
    reason = "the compute dtype is torch.float32" if on_gpu else "the model is not on a CUDA GPU"
    with pytest.raises(ValueError, match=f"varlen cannot run here: {reason}"):
        make_module(attn_implementation="varlen", compute_dtype="float32")


def test_data_module_with_varlen_builds_the_bool_mask_and_the_document_bound(tmp_path):
    from tests.test_datamodule import module

    data = module(tmp_path, attn_implementation="varlen", max_seq_length=512)
    data.setup()
    raw = next(iter(data.train_dataloader()))
    batch = data.on_before_batch_transfer(dict(raw), 0)
    assert batch["max_documents"] == 4 and isinstance(batch["max_documents"], int)  # batch_size: a host int
    assert torch.equal(batch["attention_mask"], document_mask(batch["document_ids"]))  # validation's sdpa mask
    assert data.on_after_batch_transfer(dict(batch), 0)["attention_mask"] is batch["attention_mask"]
    data.hparams.batch_size = 2  # a bound the batch breaks is refused before the transfer
    with pytest.raises(ValueError, match="holds 4 documents, more than max_documents=2"):
        data.on_before_batch_transfer(dict(raw), 0)
    unpacked = module(tmp_path, attn_implementation="varlen", packing=False)
    unpacked.setup()
    assert "max_documents" not in unpacked.on_before_batch_transfer(next(iter(unpacked.train_dataloader())), 0)


# ---- GPU host ---------------------------------------------------------------------------------------------------


def packed_cuda_batch(tokenizer, first: int, n: int, spare: int = 3) -> dict:
    """``n`` emoji chats packed three or so to a row (rows of different fill, so with padding), widened to a
    multiple of 128 as the graphed step does, with ``max_documents`` ``spare`` above the ``n`` documents (empty
    segments), on the GPU."""
    examples = []
    for row in build_emoji_rows()[first:first + n]:
        chat = assistant_labels(tokenizer, emoji_messages(row))
        examples.append({"input_ids": chat.input_ids, "labels": chat.labels})
    lengths = [len(e["input_ids"]) for e in examples]
    bins = pack_best_fit(lengths, 3 * max(lengths))
    batch = pad_packed_batch(collate_packed([[examples[i] for i in b] for b in bins], tokenizer.pad_token_id), 128,
                             tokenizer.pad_token_id)
    assert len(bins) > 1 and (batch["document_ids"] < 0).any(1).all()  # several rows, each with padding
    return {**{k: v.cuda() for k, v in batch.items()}, "max_documents": n + spare}


@cuda
def test_varlen_kernel_matches_our_mask_with_empty_segments_and_gqa():
    """The kernel on offsets with empty segments (a row without padding, unused documents) and 4 query heads over 2
    key/value heads: outputs at real tokens and all input gradients equal sdpa with our mask (computed in fp32)."""
    torch.manual_seed(0)
    ids = torch.full((3, 256), -1)
    ids[0, :100], ids[0, 100:180] = 0, 1  # two documents, then padding
    ids[1, :] = 0  # one document, no padding: an empty padding segment in the middle of the offsets
    ids[2, :7], ids[2, 7:150], ids[2, 150:151] = 0, 1, 2  # a one-token document
    ids = ids.cuda()
    keys = varlen_keys(ids, max_documents=9)  # 6 documents: 3 empty segments at the end
    q = torch.randn(3, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(3, 2, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out, _ = varlen_attention_forward(None, q, k, v, None, scaling=0.125, **keys)  # [rows, width, heads, dim]
    assert torch.isfinite(out).all()  # every token, padding included, lies in a segment
    reference = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1),
                                               attn_mask=document_mask(ids), scale=0.125).transpose(1, 2)
    real = ids >= 0
    torch.testing.assert_close(out[real].float(), reference[real], atol=2e-2, rtol=2e-2)
    weight = torch.randn(out[real].shape, device="cuda")
    grads = torch.autograd.grad((out[real].float() * weight).sum(), (q, k, v))
    expected = torch.autograd.grad((reference[real] * weight).sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        assert ((got.float() - want).norm() / want.norm()).item() < 3e-2


def adapter_grads(module) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for _, p in sorted(module.model.named_parameters()) if p.requires_grad])


@cuda
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphed"])
def test_varlen_training_gives_the_sdpa_masks_loss_and_gradients(graphs):
    """Tiny bf16 4-bit model, two packed batches of different shapes (padding, empty segments): ``training_loss``
    through varlen offsets and through our sdpa mask, from the same adapter weights, eagerly and from CUDA graphs.

    The loss alone cannot tell (on a random model, attending across documents moved it by 5e-4 relative on CPU); the
    adapters' gradients can (50% relative there)."""
    modules = {}
    for attention in ("auto", "sdpa"):
        torch.manual_seed(0)
        modules[attention] = make_module(quantize="nf4", compute_dtype="bfloat16", cuda_graphs=graphs,
                                         attn_implementation=attention)
        modules[attention].model.cuda()
    varlen, sdpa = modules["auto"], modules["sdpa"]
    assert varlen.attention == "varlen" and unwrap_peft(varlen.model).config._attn_implementation == VARLEN
    assert sdpa.attention == "sdpa"
    generator = torch.Generator().manual_seed(1)
    for name, p in varlen.model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which leaves A without gradient
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    optimizer = varlen.configure_optimizers()
    tok = varlen.tokenizer
    for batch in (packed_cuda_batch(tok, 0, 12), packed_cuda_batch(tok, 40, 20)):
        weights = dict(varlen.model.named_parameters())
        for name, p in sdpa.model.named_parameters():
            if p.requires_grad:
                p.data.copy_(weights[name].data)
                p.grad = None
        losses = []
        for module in (varlen, sdpa):
            loss = module.training_loss(batch)
            loss.backward()
            losses.append(float(loss))
        assert math.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-2)
        got, want = adapter_grads(varlen), adapter_grads(sdpa)
        assert want.norm() > 0 and ((got - want).norm() / want.norm()).item() < 5e-2
        optimizer.step()
        optimizer.zero_grad()
    if graphs:  # both replayed their steps; varlen's graphs take offsets, not the mask
        for module, key in ((varlen, "cu_seq_lens_q"), (sdpa, "attention_mask")):
            assert len(module._graphed.graphs) == 2 and module._graphed.eager_calls == 0
            assert all(key in {entry[0] for entry in shape} for shape in module._graphed.graphs)
        assert not any("attention_mask" in {entry[0] for entry in shape} for shape in varlen._graphed.graphs)


@cuda
def test_fit_on_a_gpu_trains_with_varlen_by_default(tmp_path):
    """A few Lightning steps with the defaults (attention auto, CUDA graphs), validation (sdpa fallback) and the
    sample callback (generation through sdpa) on the tiny model."""
    import lightning as L

    from callbacks import SampleGenerations
    from lit_llama_lab.data.datamodule import ChatDataModule
    from lit_llama_lab.module import LoraArgs, QLoRAModule

    source = tmp_path / "chats.jsonl"
    source.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"What comes after {i}?"},
                                                         {"role": "assistant", "content": f"{i + 1} does."}]})
                                for i in range(40)))
    model = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(r=8, alpha=16))
    data = ChatDataModule(source=str(source), tokenizer="tiny-random", batch_size=8, max_seq_length=128,
                          test_fraction=0, val_fraction=0.2, cache_dir=str(tmp_path / "datasets"))
    samples = SampleGenerations(emoji=["🐼"], max_new_tokens=4)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=4, val_check_interval=2, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[samples])
    trainer.fit(model, data)
    assert model.attention == "varlen" and trainer.global_step == 4
    assert unwrap_peft(model.model).config._attn_implementation == VARLEN  # back after the sample generations
    assert samples.rows  # generation ran
    graphed = model._graphed
    assert graphed is not None and graphed.graphs and graphed.eager_calls == 0
    assert all("cu_seq_lens_q" in {entry[0] for entry in shape} for shape in graphed.graphs)
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))
