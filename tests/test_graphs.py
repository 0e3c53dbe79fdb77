"""The GPU training path: fixed-shape loss, padding to few shapes, and CUDA-graph replay.

On a CPU these check that the fixed-shape pieces compute exactly the plain loss; the graph replay itself needs CUDA
(``pytest tests/test_graphs.py`` on the GPU host runs it; CI has no GPU and skips that one test).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_llama_lab.data.masking import IGNORE_INDEX
from lit_llama_lab.data.packing import document_mask, pad_packed_batch
from lit_llama_lab.fast import fast_label_loss, linear_cross_entropy
from lit_llama_lab.module import label_loss
from tests.test_module import emoji_batch, make_module


def test_linear_cross_entropy_ignores_unlabelled_rows_exactly():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(100, 16, requires_grad=True)
    targets = torch.randint(0, 100, (37,))
    targets[::3] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, targets, chunk=5)
    (3 * loss).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)
    (3 * expected).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    assert grads[0][::3].abs().max() == 0  # ignored rows get no gradient
    torch.testing.assert_close(grads[1], weight.grad)


def test_fixed_shape_loss_equals_labelled_position_loss(tiny_base):
    model, tok = tiny_base
    batch = emoji_batch(tok, 8)
    torch.testing.assert_close(fast_label_loss(model, batch), label_loss(model, batch)[0], rtol=1e-6, atol=1e-6)


def test_padding_a_packed_batch_keeps_its_loss_and_isolates_the_padding(tiny_base):
    model, tok = tiny_base
    batch = emoji_batch(tok, 8)
    width = batch["input_ids"].shape[1]
    padded = pad_packed_batch(batch, 128, tok.pad_token_id)
    assert padded["input_ids"].shape[1] % 128 == 0 and padded["input_ids"].shape[1] > width
    # the padded mask is the one the collator would build for the widened rows
    assert torch.equal(padded["attention_mask"], document_mask(padded["document_ids"]))
    assert (padded["labels"][:, width:] == IGNORE_INDEX).all()
    torch.testing.assert_close(label_loss(model, padded)[0], label_loss(model, batch)[0], rtol=1e-6, atol=1e-6)
    assert pad_packed_batch(padded, 128, tok.pad_token_id) is padded  # already a multiple: untouched


def test_training_loss_reaches_every_adapter():
    module = make_module()
    device = next(module.model.parameters()).device  # the GPU host's tests run this on CUDA
    batch = {k: v.to(device) for k, v in emoji_batch(module.tokenizer, 4).items()}
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    loss = module.training_loss(batch)
    loss.backward()
    assert (module._graphed is not None) == (device.type == "cuda")  # graphs on a GPU, the eager loss elsewhere
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # B starts at zero, so only B has a gradient at the first step (A's is B-weighted)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU host)")
def test_graph_replay_gives_the_eager_losses_and_gradients():
    """Three AdamW steps over two batch shapes, graphed vs eager, from the same adapter init (tiny 4-bit model)."""

    def run(graphs: bool) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        module = make_module(quantize="nf4", compute_dtype="bfloat16", cuda_graphs=graphs)
        module.model.cuda()
        optimizer = module.configure_optimizers()
        tok = module.tokenizer
        batches = [emoji_batch(tok, n) for n in (8, 16, 8)]
        losses = []
        for batch in batches:
            batch = {k: v.cuda() for k, v in pad_packed_batch(batch, 128, tok.pad_token_id).items()}
            loss = module.training_loss(batch) if graphs else fast_label_loss(module.model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        if graphs:
            assert len(module._graphed.graphs) == 2 and module._graphed.eager_calls == 0
        return losses, module.adapter_state_dict()

    eager_losses, eager_weights = run(False)
    graph_losses, graph_weights = run(True)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(graph_weights[name], weight, rtol=1e-5, atol=1e-6)
