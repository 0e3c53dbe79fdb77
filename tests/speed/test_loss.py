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


def test_linear_cross_entropy_rejects_unselected_rows():
    with pytest.raises(ValueError, match="select labelled rows"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))
