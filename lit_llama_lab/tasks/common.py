"""What the task evaluations share: seeded samples, batches with a progress bar, Markdown tables, and the
teacher-forced perplexity of reference answers."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from lit_llama_lab.io import write_atomic, write_json


def sample_rows(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded random sample of ``limit`` rows in their original order (all rows when ``limit`` is None).

    Sampled rather than the first rows: the emoji data is ordered by group, so its head is all smileys.
    """
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for the whole split), got {limit}.")
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def batches(items: Sequence, size: int, desc: str) -> Iterator[Sequence]:
    """``items`` in slices of ``size``, with a progress bar titled ``desc``."""
    from tqdm.auto import tqdm

    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=desc, unit="batch", total=len(starts)):
        yield items[start:start + size]


@torch.no_grad()
def reference_perplexity(model, tokenizer, chats: Sequence[list[dict]], batch_size: int = 32) -> float:
    """Teacher-forced perplexity of the assistant turns (end-of-turn included) of ``chats``, per token.

    A model with a ``reference_nll(ids, labels)`` method (a GGUF in llama.cpp,
    :class:`lit_llama_lab.tools.llamacpp.LlamaCppModel`) scores the same ids and labels with its own logits.
    """
    from torchmetrics.aggregation import MeanMetric

    from lit_llama_lab.data.masking import assistant_labels
    from lit_llama_lab.data.packing import collate_padded
    from lit_llama_lab.speed.loss import label_loss

    if hasattr(model, "reference_nll"):
        total, count = 0.0, 0
        for chat in chats:
            example = assistant_labels(tokenizer, chat)
            nll, n = model.reference_nll(list(example.input_ids), list(example.labels))
            total, count = total + nll, count + n
        return math.exp(total / max(count, 1))
    device = next(model.parameters()).device
    mean_nll = MeanMetric()
    for chunk in batches(chats, batch_size, "perplexity"):
        examples = [assistant_labels(tokenizer, chat) for chat in chunk]
        batch = collate_padded([{"input_ids": e.input_ids, "labels": e.labels} for e in examples],
                               tokenizer.pad_token_id)
        loss, _, targets = label_loss(model, {k: v.to(device) for k, v in batch.items()})
        mean_nll.update(loss.float().cpu(), weight=targets.numel())
    return math.exp(mean_nll.compute().item())


def cell(value) -> str:
    """A value as a Markdown table cell: booleans as yes/no, ``|`` escaped, line breaks shown as ⏎."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("|", "\\|").replace("\n", " ⏎ ") if value != "" else "*(empty)*"


def answers_table(records: Sequence[dict], columns: dict[str, str]) -> str:
    """Answer records as a Markdown table with the given ``{key: header}`` columns."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[k]) for k in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def run_name(model: str, *parts: str) -> str:
    """The folder name of one result: the model (a folder's last three path parts, so the checkpoints of two runs,
    ``runs/a/checkpoints/last`` and ``runs/b/checkpoints/last``, get folders of their own), then ``parts`` (the
    split and the wordings, or the suite)."""
    path = Path(str(model).rstrip("/"))
    base = "-".join(part for part in path.parts[-3:] if part != "/") if path.is_dir() else str(model)
    return re.sub(r"[^\w.\-]+", "_", "-".join([base, *parts]))


def write_result(output_dir: Path, result: dict, records: Sequence[dict], report: str) -> None:
    """Write one result into ``output_dir``: ``answers.jsonl`` (the records), ``report.md`` and ``metrics.json``
    (``result``), each atomically, metrics last (its presence means the result is complete)."""
    write_atomic(output_dir / "answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomic(output_dir / "report.md", report)
    write_json(output_dir / "metrics.json", result)
