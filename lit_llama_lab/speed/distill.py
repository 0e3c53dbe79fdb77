"""KL to the frozen base on replay tokens: the training loss plus ``weight`` × KL(base ‖ model) at every position
that predicts a token of a replay chat (``batch["distill_mask"]``).

Replay alone trains on the base's greedy answer, one token per position; the KL term keeps the model's whole
next-token distribution on those chats at the base's (the base is the same model with its adapters disabled, so
nothing else is loaded). Shapes never depend on the data, so the step can still be replayed from CUDA graphs.
"""

from __future__ import annotations

import torch

from lit_llama_lab.data.masking import IGNORE_INDEX
from lit_llama_lab.speed.loss import final_hidden, linear_cross_entropy


class LinearKL(torch.autograd.Function):
    """Mean over masked rows of KL(softmax(base @ W.T) ‖ softmax(hidden @ W.T)), chunk by chunk over rows.

    As :class:`lit_llama_lab.speed.loss.LinearCrossEntropy`: the gradient wrt ``hidden`` is computed in the forward pass
    (``(softmax(model) - softmax(base)) @ W`` per chunk), so no ``[rows, vocab]`` tensor is kept for backward.
    Only ``hidden`` gets a gradient (the base and the vocabulary projection are frozen here).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                chunk: int) -> torch.Tensor:
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        count = mask.sum().clamp(min=1).float()  # a tensor: no host sync
        w = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            keep = mask[rows].float()[:, None]
            logq = torch.log_softmax((hidden[rows] @ w.T).float(), dim=-1)
            logp = torch.log_softmax((base[rows].to(hidden.dtype) @ w.T).float(), dim=-1)
            p = logp.exp()
            total += ((p * (logp - logq)).sum(-1, keepdim=True) * keep).sum()
            grad[rows] = ((logq.exp_() - p) * (keep / count)).to(hidden.dtype) @ w
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def linear_kl(hidden: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
              chunk: int = 0) -> torch.Tensor:
    """KL(base ‖ model) of the vocabulary distributions ``softmax(x @ weight.T)`` for rows ``x`` of ``base`` and
    ``hidden`` (``[rows, d]``), averaged over the rows where ``mask`` (``[rows]`` bool) is True; 0 when none is.
    ``chunk`` rows per step (0: about 2**24 logits a chunk)."""
    chunk = chunk or max(1, 2**24 // weight.shape[0])
    return LinearKL.apply(hidden, base.detach(), weight.detach(), mask, chunk)


def distilled_label_loss(model, batch: dict, weight: float, chunk: int = 0) -> torch.Tensor:
    """:func:`lit_llama_lab.speed.loss.fast_label_loss` (mean cross-entropy over labelled positions) plus ``weight`` ×
    KL(base ‖ model) over the labelled positions of replay tokens (``batch["distill_mask"]``). The base runs first,
    with the adapters disabled and without gradients; then the model, once, for both terms."""
    with torch.no_grad(), model.disable_adapter():
        _, base = final_hidden(model, batch)
    causal_lm, hidden = final_hidden(model, batch)
    d = hidden.shape[-1]
    targets = batch["labels"][:, 1:].reshape(-1)
    rows, base_rows = hidden[:, :-1].reshape(-1, d), base[:, :-1].reshape(-1, d)
    vocab = causal_lm.get_output_embeddings().weight
    mask = (batch["distill_mask"][:, 1:].reshape(-1) & (targets != IGNORE_INDEX))
    return linear_cross_entropy(rows, vocab, targets, chunk) + weight * linear_kl(rows, base_rows, vocab, mask, chunk)
