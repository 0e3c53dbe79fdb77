"""The GPU training path: fixed-shape loss, padding to few shapes, and CUDA-graph replay.

On a CPU these check that the fixed-shape pieces compute exactly the plain loss; the graph replay itself needs CUDA
(``tests/gpu/test_graphs.py``: the GPU host runs it; CI has no GPU and skips it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_llama_lab.data.masking import IGNORE_INDEX
from lit_llama_lab.data.packing import pad_packed_batch
from lit_llama_lab.speed.attention import attention_inputs, document_mask
from lit_llama_lab.speed.loss import fast_label_loss, label_loss, linear_cross_entropy
from tests.helpers import emoji_batch, make_module


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
    padded = attention_inputs(pad_packed_batch(batch, 128, tok.pad_token_id), "sdpa")
    assert padded["input_ids"].shape[1] % 128 == 0 and padded["input_ids"].shape[1] > width
    # the padded batch's mask is the one the widened rows' document ids give
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
