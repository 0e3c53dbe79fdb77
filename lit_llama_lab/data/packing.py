"""Padding-free packing: best-fit-decreasing bins, ``position_ids`` restarting per example, and a
block-diagonal causal mask so no token attends across examples in the same bin.

Restarting ``position_ids`` alone does not isolate packed examples under sdpa, eager or flex attention in
transformers 5, so the mask is built here, in the form each attention implementation takes:

* ``sdpa``: a boolean ``[batch, 1, width, width]`` tensor (True = may attend),
* ``eager``: the same as an additive float tensor (0 / dtype min) in the model's compute dtype,
* ``flex_attention``: a ``BlockMask`` built from per-token document ids (transformers passes a 4-D mask through).

``varlen`` (and ``auto``, which is varlen on a GPU) trains without a mask, from ``document_ids``
(:func:`lit_llama_lab.fast.varlen_keys`); its batches carry the sdpa mask for validation, which runs through sdpa.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from lit_llama_lab.data.masking import IGNORE_INDEX

ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "varlen", "eager", "flex_attention")
BOOL_MASK_IMPLEMENTATIONS = ("auto", "sdpa", "varlen")  # the ones that take the boolean 4-D mask


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of at most ``capacity`` tokens, best-fit decreasing.

    Each example goes, longest first, into the open bin it fills most tightly. Returns lists of indices; bins are
    ordered by creation. An example longer than ``capacity`` raises (truncate or drop it first).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"Example {i} has {size} tokens, more than the bin capacity {capacity}.")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    return bins


def pack_balanced(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """As many bins as :func:`pack_best_fit` needs, but filled evenly (longest example into the emptiest bin), so
    the widest row, which every row of a batch is padded to, is as short as it can be.

    Falls back to the best-fit bins when even filling would overflow ``capacity``.
    """
    best = pack_best_fit(lengths, capacity)
    bins: list[list[int]] = [[] for _ in best]
    loads = [0] * len(best)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = min(range(len(bins)), key=loads.__getitem__)
        bins[b].append(i)
        loads[b] += lengths[i]
    return bins if max(loads, default=0) <= capacity else best


def document_ids(seq_lengths: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """``[batch, width]`` long tensor: the index of the example each token belongs to within its row, -1 on padding."""
    ids = torch.full((len(seq_lengths), width), -1, dtype=torch.long)
    for r, lengths in enumerate(seq_lengths):
        start = 0
        for d, n in enumerate(lengths):
            ids[r, start:start + n] = d
            start += n
    return ids


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[batch, 1, width, width]`` mask from :func:`document_ids`: True where a query may attend a key.

    Each example attends causally within itself only. Padding positions attend to themselves alone (a fully
    masked row would give NaN in sdpa); their outputs carry no label.
    """
    width = doc_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=doc_ids.device).tril()
    same = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)
    eye = torch.eye(width, dtype=torch.bool, device=doc_ids.device)
    return ((same & causal) | eye).unsqueeze(1)


def block_causal_mask(seq_lengths: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Boolean ``[batch, 1, width, width]`` mask for rows holding examples of the given lengths back to back
    (see :func:`document_mask`)."""
    return document_mask(document_ids(seq_lengths, width))


def flex_block_mask(doc_ids: torch.Tensor):
    """A flex-attention ``BlockMask`` equal to :func:`document_mask`, built on ``doc_ids``' device."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return ((doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)) | (q == kv)

    batch, width = doc_ids.shape
    return create_block_mask(mask_mod, batch, None, width, width, device=doc_ids.device, _compile=False)


def packed_attention_mask(doc_ids: torch.Tensor, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """The block-diagonal causal mask in the form ``attn_implementation`` takes (see the module docstring).

    ``dtype`` matters for eager only: the additive mask must be in the model's compute dtype. ``auto`` and
    ``varlen`` get sdpa's boolean mask (their validation runs through sdpa).
    """
    if attn_implementation == "flex_attention":
        return flex_block_mask(doc_ids)
    mask = document_mask(doc_ids)
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if attn_implementation in BOOL_MASK_IMPLEMENTATIONS:
        return mask
    raise ValueError(f"Unknown attention implementation {attn_implementation!r}; use one of {ATTENTION_IMPLEMENTATIONS}.")


def collate_packed(
    bins: Sequence[Sequence[dict]], pad_id: int, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> dict:
    """One row per bin: concatenated ``input_ids``/``labels``, restarting ``position_ids``, block-diagonal mask.

    Also returns ``document_ids`` so the mask can be rebuilt on another device or dtype
    (:func:`packed_attention_mask`), and, when the examples carry a ``distill`` flag (replay chats), a bool
    ``distill_mask`` over the tokens of flagged examples.
    """
    lengths = [[len(ex["input_ids"]) for ex in b] for b in bins]
    width = max(sum(row) for row in lengths)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    for r, examples in enumerate(bins):
        start = 0
        for ex in examples:
            n = len(ex["input_ids"])
            input_ids[r, start:start + n] = torch.as_tensor(ex["input_ids"])
            labels[r, start:start + n] = torch.as_tensor(ex["labels"])
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
    doc_ids = document_ids(lengths, width)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": packed_attention_mask(doc_ids, attn_implementation, dtype),
        "document_ids": doc_ids,
    }
    return with_distill_mask(batch, [list(b) for b in bins])


def with_distill_mask(batch: dict, rows: Sequence[Sequence[dict]]) -> dict:
    """Add ``distill_mask`` (True on the tokens of examples whose ``distill`` flag is set, laid out as the rows
    hold them back to back) when the examples carry that flag; ``batch`` unchanged otherwise."""
    if not rows or not rows[0] or "distill" not in rows[0][0]:
        return batch
    mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for r, examples in enumerate(rows):
        start = 0
        for ex in examples:
            n = len(ex["input_ids"])
            mask[r, start:start + n] = bool(ex["distill"])
            start += n
    return {**batch, "distill_mask": mask}


def pad_packed_batch(batch: dict, multiple: int, pad_id: int) -> dict:
    """Widen a packed batch's rows (on any device) to the next multiple of ``multiple`` tokens.

    Added positions are padding: ``pad_id``, label ``IGNORE_INDEX``, position 0, document id -1, and in a boolean
    4-D mask they attend to themselves only, as :func:`document_mask` pads. The loss is unchanged; what changes is
    that batches fall into a few shapes, which CUDA graphs need. Packed batches are those with a boolean 4-D mask,
    or with ``document_ids`` and no mask at all (varlen's); others are returned as they are.
    """
    mask = batch.get("attention_mask")
    bool_mask = isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype == torch.bool
    if not bool_mask and not (mask is None and "document_ids" in batch):
        return batch
    width = batch["input_ids"].shape[1]
    extra = -width % multiple
    if extra == 0:
        return batch
    pad = torch.nn.functional.pad
    out = dict(batch)
    out["input_ids"] = pad(batch["input_ids"], (0, extra), value=pad_id)
    out["labels"] = pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    out["position_ids"] = pad(batch["position_ids"], (0, extra), value=0)
    if bool_mask:
        new_mask = pad(mask, (0, extra, 0, extra), value=False)
        added = torch.arange(width, width + extra, device=mask.device)
        new_mask[:, :, added, added] = True
        out["attention_mask"] = new_mask
    if "document_ids" in batch:
        out["document_ids"] = pad(batch["document_ids"], (0, extra), value=-1)
    if "distill_mask" in batch:
        out["distill_mask"] = pad(batch["distill_mask"], (0, extra), value=False)
    return out


def collate_padded(examples: Sequence[dict], pad_id: int) -> dict:
    """Right-padded batch with a 2-D attention mask; padding labelled ``IGNORE_INDEX``."""
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[r, :n] = torch.as_tensor(ex["input_ids"])
        labels[r, :n] = torch.as_tensor(ex["labels"])
        attention_mask[r, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    return with_distill_mask(batch, [[ex] for ex in examples])


def padding_efficiency(batch: dict) -> float:
    """Share of a batch's token slots that hold a real token (not padding): 1.0 means no padding at all."""
    if "document_ids" in batch:
        return float((batch["document_ids"] >= 0).float().mean())
    return float(batch["attention_mask"].float().mean())
