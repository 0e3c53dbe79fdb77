"""FlashAttention varlen on the GPU: the kernel against our mask, training through varlen offsets against the sdpa
mask (eager and CUDA-graphed), and a Lightning fit with the defaults (GPU only; the CPU checks of the offsets are in
``tests/speed/test_attention.py``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lit_llama_lab.data.masking import assistant_labels
from lit_llama_lab.data.packing import collate_packed, pack_best_fit, pad_packed_batch
from lit_llama_lab.model.adapters import unwrap_peft
from lit_llama_lab.speed.attention import VARLEN, document_mask, varlen_attention_forward, varlen_keys
from lit_llama_lab.tasks.emoji.rows import build_emoji_rows, emoji_messages
from tests.helpers import make_module

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention varlen needs a GPU (run on the GPU host)")]


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
                                         attention=attention)
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


def test_fit_on_a_gpu_trains_with_varlen_by_default(tmp_path):
    """A few Lightning steps with the defaults (attention auto, CUDA graphs), validation (sdpa fallback) and the
    sample callback (generation through sdpa) on the tiny model."""
    import lightning as L

    from lit_llama_lab.data.datamodule import ChatDataModule
    from lit_llama_lab.train.args import LoraArgs
    from lit_llama_lab.train.callbacks import SampleGenerations
    from lit_llama_lab.train.module import QLoRAModule

    source = tmp_path / "chats.jsonl"
    source.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"What comes after {i}?"},
                                                         {"role": "assistant", "content": f"{i + 1} does."}]})
                                for i in range(40)))
    model = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(r=8, alpha=16))
    data = ChatDataModule(source=str(source), tokenizer="tiny-random", batch_size=8, max_seq_length=128,
                          test_fraction=0, val_fraction=0.2, cache_dir=str(tmp_path / "datasets"))
    samples = SampleGenerations(task="emoji", items=["🐼"], max_new_tokens=4)
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
