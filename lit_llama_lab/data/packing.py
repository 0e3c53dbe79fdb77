"""Padding-free packing into one neutral batch form: best-fit-decreasing bins, ``position_ids`` restarting per
example and ``document_ids`` (each token's example within its row, -1 on padding).

The data layer builds no attention mask: which form an attention kernel takes (a boolean or additive block mask, a
flex ``BlockMask``, FlashAttention varlen's offsets) is decided and built from ``document_ids`` by
:func:`lit_llama_lab.speed.attention.attention_inputs`, on the batch's device.

**Shared prefix** (``collate_packed(..., share_prefix=True)``): the examples of a row that begin with the same
untrained tokens (a chat template's default system prompt: 21 of an emoji chat's 47 SmolLM2 tokens) hold them once, at
the start of the row, as its document 0; each example follows without them, its ``position_ids`` continuing where the
prefix ends, and attends to the prefix and to itself (``prefix_lengths``: each row's prefix length, 0 for none). A
causal model computes the prefix the same whatever follows it, so every labelled token gets the loss it would get with
its own copy of the prefix, in fewer tokens. Mask attentions only (sdpa, eager, flex): varlen's segments cannot see
each other.
"""

from __future__ import annotations

import bisect
import os
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


def count_documents(document_ids: torch.Tensor) -> int:
    """Documents in a ``[rows, width]`` :func:`document_ids` tensor, over all rows (a host sync on a GPU tensor)."""
    return int((document_ids.amax(dim=1) + 1).clamp(min=0).sum())


def check_documents(document_ids: torch.Tensor, max_documents: int) -> None:
    """Raise unless ``document_ids`` (on the CPU) holds at most ``max_documents`` documents in all: the bound
    FlashAttention varlen's offsets are sized by (:func:`lit_llama_lab.speed.attention.varlen_keys`)."""
    found = count_documents(document_ids)
    if found > max_documents:
        raise ValueError(f"The batch holds {found} documents, more than max_documents={max_documents}: varlen's "
                         "offsets would merge documents. Pass the largest number of examples in a batch.")


def shared_prefix_length(examples: Sequence[dict]) -> int:
    """How many leading tokens ``examples`` (two or more) can share in a row: their common token prefix, cut so that
    no example has a label on it or on the token after it (that token is predicted from the prefix's last one, which
    the row holds once). 0 for fewer than two examples."""
    if len(examples) < 2:
        return 0
    shared = len(os.path.commonprefix([list(ex["input_ids"]) for ex in examples]))
    for ex in examples:
        labels = ex["labels"]
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        shared = min(shared, first - 1)
    return max(shared, 0)


def collate_packed(bins: Sequence[Sequence[dict]], pad_id: int, share_prefix: bool = False) -> dict:
    """One row per bin: concatenated ``input_ids``/``labels``, restarting ``position_ids`` and ``document_ids``
    (padding: ``pad_id``, label ``IGNORE_INDEX``, position 0, document -1), and, when the examples carry a
    ``distill`` flag (replay chats), a bool ``distill_mask`` over the tokens of flagged examples.

    ``share_prefix``: each row holds its examples' shared untrained prefix once (:func:`shared_prefix_length`, see
    the module docstring) and the batch gets ``prefix_lengths`` (``[rows]``)."""
    prefixes = [shared_prefix_length(b) if share_prefix else 0 for b in bins]
    lengths = [[len(ex["input_ids"]) - p for ex in b] for b, p in zip(bins, prefixes, strict=True)]
    width = max(p + sum(row) for p, row in zip(prefixes, lengths, strict=True))
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    for r, (examples, p) in enumerate(zip(bins, prefixes, strict=True)):
        if p:
            input_ids[r, :p] = torch.as_tensor(examples[0]["input_ids"][:p])
            position_ids[r, :p] = torch.arange(p)
        start = p
        for ex in examples:
            n = len(ex["input_ids"]) - p
            input_ids[r, start:start + n] = torch.as_tensor(ex["input_ids"][p:])
            labels[r, start:start + n] = torch.as_tensor(ex["labels"][p:])
            position_ids[r, start:start + n] = torch.arange(p, p + n)
            start += n
    rows = [[p, *row] if p else row for p, row in zip(prefixes, lengths, strict=True)]
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "document_ids": document_ids(rows, width)}
    if share_prefix:
        batch["prefix_lengths"] = torch.tensor(prefixes, dtype=torch.long)
    return with_distill_mask(batch, [list(b) for b in bins], prefixes)


def with_distill_mask(batch: dict, rows: Sequence[Sequence[dict]], prefixes: Sequence[int] | None = None) -> dict:
    """Add ``distill_mask`` (True on the tokens of examples whose ``distill`` flag is set, laid out as the rows
    hold them back to back, after each row's shared prefix of ``prefixes[r]`` tokens, which is never distilled) when
    the examples carry that flag, and ``replay_ids`` (each token's example ``replay_id``, -1 elsewhere) when they carry
    that; ``batch`` unchanged otherwise."""
    if not rows or not rows[0] or "distill" not in rows[0][0]:
        return batch
    mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    ids = torch.full(batch["input_ids"].shape, -1, dtype=torch.long) if "replay_id" in rows[0][0] else None
    for r, examples in enumerate(rows):
        p = prefixes[r] if prefixes else 0
        start = p
        for ex in examples:
            n = len(ex["input_ids"]) - p
            mask[r, start:start + n] = bool(ex["distill"])
            if ids is not None:
                ids[r, start:start + n] = ex["replay_id"]
            start += n
    return {**batch, "distill_mask": mask, **({"replay_ids": ids} if ids is not None else {})}


def pad_packed_batch(batch: dict, multiple: int, pad_id: int) -> dict:
    """Widen a packed batch's rows (on any device) to the next multiple of ``multiple`` tokens.

    Added positions are padding: ``pad_id``, label ``IGNORE_INDEX``, position 0, document id -1, no distillation
    (replay id -1).
    The loss is unchanged; what changes is that batches fall into a few shapes, which CUDA graphs need. Packed
    batches are those with ``document_ids``; others are returned as they are, and so is a batch already of such a
    width. An attention mask the batch held no longer fits and is left out: convert after padding
    (:func:`lit_llama_lab.speed.attention.attention_inputs`).
    """
    if "document_ids" not in batch:
        return batch
    width = batch["input_ids"].shape[1]
    extra = -width % multiple
    if extra == 0:
        return batch
    pad = torch.nn.functional.pad
    values = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "document_ids": -1, "distill_mask": False,
              "replay_ids": -1}
    out = {k: v for k, v in batch.items() if k != "attention_mask"}
    for key, value in values.items():
        if key in batch:
            out[key] = pad(batch[key], (0, extra), value=value)
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
