"""Padding-free packing: best-fit-decreasing bins, ``position_ids`` restarting per example, and a
block-diagonal causal mask so no token attends across examples in the same bin.

Restarting ``position_ids`` alone does not isolate packed examples under sdpa/eager attention in transformers 5,
so the 4-D mask is built here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from lit_llama_lab.data.masking import IGNORE_INDEX


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


def block_causal_mask(seq_lengths: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Boolean ``[batch, 1, width, width]`` mask: True where a query may attend a key.

    Row ``r`` holds examples of the given lengths back to back; each attends causally within itself only.
    Padding positions attend to themselves alone (a fully masked row would give NaN in sdpa).
    """
    mask = torch.zeros(len(seq_lengths), 1, width, width, dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, lengths in enumerate(seq_lengths):
        start = 0
        for n in lengths:
            mask[r, 0, start:start + n, start:start + n] = causal[:n, :n]
            start += n
        idx = torch.arange(start, width)
        mask[r, 0, idx, idx] = True
    return mask


def collate_packed(bins: Sequence[Sequence[dict]], pad_id: int, attn_implementation: str = "sdpa") -> dict:
    """One row per bin: concatenated ``input_ids``/``labels``, restarting ``position_ids``, block-diagonal mask.

    The mask is boolean for sdpa and additive float (0 / dtype min) for eager attention.
    """
    width = max(sum(len(ex["input_ids"]) for ex in b) for b in bins)
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
    mask = block_causal_mask([[len(ex["input_ids"]) for ex in b] for b in bins], width)
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


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
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
