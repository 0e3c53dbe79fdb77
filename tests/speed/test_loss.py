"""The training loss in its two forms: the chunked fixed-shape linear cross-entropy computes plain cross-entropy and
its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_llama_lab.speed.loss import linear_cross_entropy


def test_linear_cross_entropy_matches_plain_cross_entropy_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(100, 16, requires_grad=True)
    targets = torch.randint(0, 100, (37,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk=5)  # 8 chunks, the last one short
    (2 * loss).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.T, targets)
    (2 * expected).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_the_compiled_chunks_compute_the_eager_loss_and_gradients():
    """``compiled=True`` (the plan's ``compile``: wide models on a GPU) runs each chunk through ``torch.compile``; here
    on a CPU, bf16 logits as on the GPU, a short last chunk and unlabelled rows."""
    from lit_llama_lab.speed.loss import chunk_kernel, chunk_loss_and_grad

    assert chunk_kernel(False) is chunk_loss_and_grad and chunk_kernel(True) is not chunk_loss_and_grad
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(100, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 100, (37,))
    targets[::4] = -100
    runs = []
    for compiled in (False, True):
        loss = linear_cross_entropy(hidden, weight, targets, chunk=8, compiled=compiled)
        runs.append((loss, *torch.autograd.grad(loss, hidden)))
    (eager, eager_grad), (fused, fused_grad) = runs
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-5)
    assert not fused_grad[::4].any() and fused_grad[1::4].any()  # unlabelled rows get no gradient, the others do


def test_linear_cross_entropy_rejects_unselected_rows():
    with pytest.raises(ValueError, match="select labelled rows"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))


def test_the_eager_training_loss_is_label_loss_chunked_with_the_same_gradients(tiny_base):
    from lit_llama_lab.speed.loss import chunked_label_loss, label_loss

    model = tiny_base[0]  # (model, tokenizer)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 24))
    labels = ids.clone()
    labels[:, :9] = -100  # prompts
    labels[1, 15:] = -100  # a shorter answer
    batch = {"input_ids": ids, "labels": labels}
    params = [p for p in model.parameters() if p.dtype.is_floating_point][:3] + [model.get_output_embeddings().weight]
    was = [p.requires_grad for p in params]  # a shared fixture: left as found
    grads = []
    for fn in (lambda: chunked_label_loss(model, batch, chunk=7), lambda: label_loss(model, batch)[0]):
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in params]))
    for p, flag in zip(params, was, strict=True):
        p.grad = None
        p.requires_grad_(flag)
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == 4 and all(g.abs().sum() > 0 for g in grads[1][1])
    for got, expected in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
