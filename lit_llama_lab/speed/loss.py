"""The training loss: next-token cross-entropy over labelled (assistant) positions only.

Three forms of one math. :func:`label_loss` projects to the vocabulary only where a label exists and returns the
logits (validation's perplexity). :func:`chunked_label_loss` does the same in chunks that never hold all the logits
(eager training steps). :func:`fast_label_loss` keeps every shape fixed (a chunked linear cross-entropy that weighs
unlabelled positions by zero), so a CUDA graph can capture the whole step. ``tests/speed/test_loss.py`` checks they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_llama_lab.data.masking import IGNORE_INDEX
from lit_llama_lab.model.adapters import unwrap_peft

DECODER_KEYS = ("position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of :class:`LinearCrossEntropy`: ``(sum of weight x cross-entropy, gradient wrt the logits in
    dtype)`` for ``logits [rows, vocab]`` (overwritten), ``targets [rows]`` (any valid index where ``weight`` is 0)
    and per-row ``weight``. The logits are upcast to fp32 first, as Hugging Face's loss does; the gradient is
    ``weight x (softmax - one-hot)``, computed in place over one fp32 copy of the logits."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, targets[:, None]).squeeze(1)) * weight).sum()
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, targets[:, None], -torch.ones_like(lse)[:, None])
    return loss, probs.mul_(weight[:, None]).to(dtype)


_compiled_chunk = None


def chunk_kernel(compiled: bool):
    """:func:`chunk_loss_and_grad`, compiled by ``torch.compile`` when ``compiled`` (the plan's ``compile``: wide
    models on a GPU). Eager, its kernels are separate passes over each chunk's logits (the fp32 copy, the
    log-sum-exp's, the exponent, the scaling and the cast: about 9 ms of the 1B step's 150 on an H200, over 31 chunks
    of 261 x 128,256); compiled, they read the bf16 logits directly. Small models, whose steps are short and whose
    runs would pay the compilation, keep the eager form."""
    global _compiled_chunk
    if not compiled:
        return chunk_loss_and_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(chunk_loss_and_grad, fullgraph=True)
    return _compiled_chunk


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk over rows.

    Rows whose target is ``IGNORE_INDEX`` count for nothing; the mean is over the other rows. Shapes never depend
    on the data (no row selection, no host sync), so the function can be captured in a CUDA graph.
    The gradient is computed in the forward pass (:func:`chunk_loss_and_grad`, then one matmul per chunk), so
    neither the full ``[rows, vocab]`` logits nor their fp32 copy ever exist at once and nothing is recomputed in
    backward.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compiled: bool) -> torch.Tensor:
        rows = hidden.shape[0]
        ctx.weight_dtype = weight.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        keep = (targets != IGNORE_INDEX).float()
        row_weight = keep / keep.sum().clamp(min=1)  # a tensor: no host sync
        kernel = chunk_kernel(compiled)
        w = weight.to(hidden.dtype)
        for start in range(0, rows, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk].clamp(min=0)
            loss, g = kernel(h @ w.T, t, row_weight[start:start + chunk], hidden.dtype)
            total += loss
            if need_h:
                grad_h[start:start + chunk] = g @ w
            if need_w:
                grad_w += g.T.float() @ h.float()
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0,
                         compiled: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden [rows, d] @ weight [vocab, d].T`` against ``targets [rows]``, over
    the rows whose target is not ``IGNORE_INDEX`` (-100).

    ``chunk`` rows per step (0: about 2**25 logits per chunk, 128 MiB in fp32: with a 128k vocabulary a chunk is
    256 rows, still one large matmul, and the loss's transient memory stays a small part of a 1B model's step).
    ``compiled``: each chunk's cross-entropy and gradient run compiled (:func:`chunk_kernel`).
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets {targets.shape[0]}: select labelled rows "
                         "or pass one target per row.")
    chunk = chunk or max(1, 2**25 // weight.shape[0])
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk, compiled)


def final_hidden(model, batch: dict, decoder_keys: tuple[str, ...] = DECODER_KEYS) -> tuple:
    """Run the decoder (no vocabulary projection) on ``batch``: ``(causal_lm, hidden [batch, seq, d])``.

    ``decoder_keys`` present in ``batch`` go to the decoder; ``causal_lm`` is the model under any peft wrapper (its
    ``get_output_embeddings`` is the vocabulary projection).
    """
    causal_lm = unwrap_peft(model)
    extra = {k: batch[k] for k in decoder_keys if k in batch}
    return causal_lm, causal_lm.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **extra).last_hidden_state


def fast_label_loss(model, batch: dict, chunk: int = 0, compiled: bool = False) -> torch.Tensor:
    """:func:`label_loss`'s math (mean CE over labelled positions) with fixed shapes: the
    decoder runs on the whole batch and :func:`linear_cross_entropy` weighs unlabelled positions by zero, so no
    step depends on the data and the whole loss (forward and backward) can be captured in a CUDA graph.

    The keys of :data:`DECODER_KEYS` present in ``batch`` (e.g. varlen's ``cu_seq_lens_q``) go to the decoder.
    Costs vocabulary logits at unlabelled positions too (chunked, never all at once). ``compiled``: as
    :func:`linear_cross_entropy`.
    """
    causal_lm, hidden = final_hidden(model, batch)
    targets = batch["labels"][:, 1:].reshape(-1)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return linear_cross_entropy(hidden, causal_lm.get_output_embeddings().weight, targets, chunk, compiled)


def labelled_hidden(model, batch: dict, decoder_keys: tuple[str, ...] = DECODER_KEYS):
    """Run the decoder and keep the final hidden states of positions whose next token is labelled.

    ``decoder_keys`` present in ``batch`` go to the decoder (the mask, ``position_ids``, varlen's offsets). Returns
    ``(causal_lm, hidden [n, d], targets [n])``, where ``causal_lm`` is the model under any peft wrapper (its
    ``get_output_embeddings`` is the vocab projection).
    """
    causal_lm, hidden = final_hidden(model, batch, decoder_keys)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return causal_lm, hidden[:, :-1][keep], targets[keep]


def label_loss(model, batch: dict, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over labelled positions only.

    The vocabulary projection runs only where a label exists, so prompt and padding tokens never build
    full-vocabulary logits. ``batch`` holds the attention inputs already
    (:func:`lit_llama_lab.speed.attention.attention_inputs`). Returns ``(loss, logits, targets)`` of the labelled
    positions.
    """
    causal_lm, hidden, targets = labelled_hidden(model, batch)
    logits = causal_lm.get_output_embeddings()(hidden).float()
    loss = F.cross_entropy(logits, targets, reduction=reduction)
    return loss, logits, targets


def chunked_label_loss(model, batch: dict, chunk: int = 0, compiled: bool = False) -> torch.Tensor:
    """:func:`label_loss`'s mean over labelled positions only, through :func:`linear_cross_entropy`: the labelled rows'
    logits are made chunk by chunk and their gradient in the same pass, so neither the ``[labelled, vocab]`` fp32
    logits nor their gradient exist at once (on the 1B shape with every position labelled, 3.9 GiB each).
    ``compiled``: as :func:`linear_cross_entropy`."""
    causal_lm, hidden, targets = labelled_hidden(model, batch)
    return linear_cross_entropy(hidden, causal_lm.get_output_embeddings().weight, targets, chunk, compiled)
