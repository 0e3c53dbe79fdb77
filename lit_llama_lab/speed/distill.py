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


def distilled_label_loss(model, batch: dict, weight: float, chunk: int = 0, teacher: torch.Tensor | None = None,
                         fixed_shapes: bool = True, compiled: bool = False) -> torch.Tensor:
    """:func:`lit_llama_lab.speed.loss.fast_label_loss` (mean cross-entropy over labelled positions) plus ``weight`` ×
    KL(base ‖ model) over the labelled positions of replay tokens (``batch["distill_mask"]``). The base's final
    hidden states come from ``teacher`` (a :class:`TeacherCache` table, rows picked by ``batch["teacher_index"]``)
    or, without it, from a forward pass of the base (adapters disabled, no gradients) first; then the model runs
    once, for both terms. ``fixed_shapes`` (what a CUDA graph needs) computes vocabulary logits at every position,
    weighing the others by zero; ``False`` picks the labelled positions for the cross-entropy and the replay
    positions for the KL first (a host sync), which saves most of the vocabulary projection's cost where prompts
    are most of the tokens and a fifth of the chats are replay chats (without graphs: CPU, FSDP). ``compiled``: the
    cross-entropy's chunks run compiled, as the label loss's do (:func:`lit_llama_lab.speed.loss.chunk_kernel`); the
    KL's chunks stay eager."""
    if teacher is not None:
        base = teacher[batch["teacher_index"]]
    else:
        with torch.no_grad(), model.disable_adapter():
            _, base = final_hidden(model, batch)
    causal_lm, hidden = final_hidden(model, batch)
    d = hidden.shape[-1]
    targets = batch["labels"][:, 1:].reshape(-1)
    rows, base_rows = hidden[:, :-1].reshape(-1, d), base[:, :-1].reshape(-1, d)
    vocab = causal_lm.get_output_embeddings().weight
    # positions inside a replay chat that predict a labelled token of it (never the last token of the example before)
    distill = batch["distill_mask"]
    mask = (distill[:, :-1] & distill[:, 1:]).reshape(-1) & (targets != IGNORE_INDEX)
    if fixed_shapes:
        return (linear_cross_entropy(rows, vocab, targets, chunk, compiled)
                + weight * linear_kl(rows, base_rows, vocab, mask, chunk))
    labelled, picked = (targets != IGNORE_INDEX).nonzero().squeeze(1), mask.nonzero().squeeze(1)
    return (linear_cross_entropy(rows[labelled], vocab, targets[labelled], chunk, compiled)
            + weight * linear_kl(rows[picked], base_rows[picked], vocab, mask[picked], chunk))


class TeacherCache:
    """The frozen base's final hidden states on every token of the replay chats, computed once.

    The KL term's targets depend only on the base (frozen) and the replay chats (fixed for the run), so instead of a
    forward pass of the base in every step (half the step's forward work), the base runs over each replay chat once
    at the start of training. ``table`` holds the states of all chats back to back (``[tokens, hidden]``, compute
    dtype, on the training device); ``offsets[i]`` is where chat ``replay_id == i`` starts. A batch's
    ``replay_ids`` and ``position_ids`` (a packed example's positions start at 0; padded rows: the column) pick each
    token's row:
    :meth:`index`. Only replay tokens are read (``distill_mask``), others point at row 0.
    """

    def __init__(self, table: torch.Tensor, offsets: torch.Tensor) -> None:
        self.table, self.offsets = table, offsets

    @classmethod
    @torch.no_grad()
    def build(cls, model, examples: list[list[int]], pad_id: int, attention: str, dtype: torch.dtype,
              tokens_per_batch: int = 16384) -> TeacherCache:
        """Run ``model`` with its adapters disabled over ``examples`` (token id lists, in ``replay_id`` order), a
        padded batch of about ``tokens_per_batch`` tokens at a time, through ``attention`` (the validation
        attention: one example per row, its own mask)."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        from lit_llama_lab.data.packing import collate_packed
        from lit_llama_lab.speed.attention import attention_inputs
        from lit_llama_lab.speed.loss import final_hidden

        device = next(p for p in model.parameters()).device
        lengths = [len(e) for e in examples]
        offsets = torch.tensor([0, *lengths[:-1]], dtype=torch.long).cumsum(0) if lengths else torch.zeros(0)
        table = None
        was_training = model.training
        model.eval()
        try:
            start = 0
            while start < len(examples):
                stop, width = start, 0
                while stop < len(examples) and (stop == start or max(width, lengths[stop]) * (stop - start + 1)
                                                <= tokens_per_batch):
                    width = max(width, lengths[stop])
                    stop += 1
                rows = [[{"input_ids": examples[i], "labels": examples[i]}] for i in range(start, stop)]
                batch = move_data_to_device(collate_packed(rows, pad_id), device)
                with model.disable_adapter():
                    _, hidden = final_hidden(model, attention_inputs(batch, attention, dtype))
                if table is None:
                    table = torch.empty((sum(lengths), hidden.shape[-1]), dtype=hidden.dtype, device=device)
                for r, i in enumerate(range(start, stop)):
                    table[offsets[i]:offsets[i] + lengths[i]] = hidden[r, :lengths[i]]
                start = stop
        finally:
            model.train(was_training)
        if table is None:
            raise ValueError("TeacherCache needs at least one replay chat.")
        return cls(table, offsets.to(device))

    def index(self, batch: dict) -> torch.Tensor:
        """``[rows, width]`` row numbers of ``table`` for each token of ``batch`` (0 outside replay chats)."""
        ids = batch["replay_ids"]
        positions = batch.get("position_ids")
        if positions is None:  # padded rows: one example per row, from column 0
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return torch.where(ids >= 0, self.offsets[ids.clamp(min=0)] + positions, 0)

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()
