"""The training loss on a GPU with each chunk's cross-entropy and gradient compiled, as the 1B plan runs it (GPU
only; ``tests/speed/test_loss.py`` checks the compiled chunk on a CPU and the eager one everywhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_llama_lab.speed.loss import chunk_kernel, chunk_loss_and_grad, linear_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU host runs it)")]


def test_the_compiled_chunk_computes_the_eager_chunk():
    """Llama-3's vocabulary, bf16 logits, some rows weighted 0 (unlabelled), two chunk heights (the last chunk of a
    step is shorter)."""
    torch.manual_seed(0)
    kernel = chunk_kernel(compiled=True)
    assert kernel is not chunk_loss_and_grad
    for rows in (261, 101):
        logits = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16) * 4
        targets = torch.randint(0, 128256, (rows,), device="cuda")
        weight = torch.rand(rows, device="cuda") * (torch.rand(rows, device="cuda") > 0.3)
        loss, grad = kernel(logits.clone(), targets, weight, torch.bfloat16)
        eager_loss, eager_grad = chunk_loss_and_grad(logits.clone(), targets, weight, torch.bfloat16)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.float(), eager_grad.float(), rtol=2e-2, atol=1e-6)  # one bf16 rounding apart
        assert not grad[weight == 0].any()


def test_linear_cross_entropy_on_a_gpu_is_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(600, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32000, 256, device="cuda", dtype=torch.bfloat16) / 16
    targets = torch.randint(0, 32000, (600,), device="cuda")
    targets[::3] = -100
    loss = linear_cross_entropy(hidden, weight, targets, compiled=True)  # 1,048 rows a chunk: one chunk
    (grad,) = torch.autograd.grad(loss, hidden)
    chunked = linear_cross_entropy(hidden, weight, targets, chunk=100, compiled=True)  # 6 of 100, the last short
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    expected = F.cross_entropy((hidden @ weight.T).float(), targets)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    for value, g in ((loss, grad), (chunked, chunked_grad)):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.float(), expected_grad.float(), rtol=2e-2, atol=1e-5)
