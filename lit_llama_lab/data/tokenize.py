"""Rows → ``input_ids`` + assistant-only ``labels``: the ``datasets.map`` function, and what is kept of its output.

Malformed, label-less and (``overlong=drop``) too long rows are left out, counted and logged with their row numbers
in the source file; :class:`NoTrainableTokensError` stops a run that has nothing left to train on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from lit_llama_lab.data.formats import MalformedRowError, row_to_messages
from lit_llama_lab.data.masking import assistant_labels_batch
from lit_llama_lab.tasks.task import RowContext

log = logging.getLogger(__name__)
TOKENIZE_VERSION = "2"  # bump when Tokenize's output changes, to invalidate cached tokenizations
STATUSES = ("ok", "malformed", "no_labels", "dropped")


class NoTrainableTokensError(ValueError):
    """Raised when no example keeps an assistant token, so training would see a loss of zero."""


class Tokenize:
    """The ``datasets.map`` function (batched, with indices): rows → ``input_ids``, ``labels`` and a status.

    Status: ``ok``, ``malformed`` (with ``error``), ``no_labels`` (no assistant token left) or ``dropped``. Each row
    becomes a chat through its format (:func:`lit_llama_lab.data.formats.row_to_messages`), which may vary it by the
    row's index, the split, the seed and the answer style (a task's format does).
    """

    def __init__(self, tokenizer, fmt: str, split: str, seed: int, answer_style: str | None, max_length: int,
                 overlong: str) -> None:
        self.tokenizer, self.fmt, self.split, self.seed = tokenizer, fmt, split, seed
        self.answer_style, self.max_length, self.overlong = answer_style, max_length, overlong

    def messages(self, row: dict, index: int) -> list[dict]:
        """The chat of row ``index`` of this split."""
        return row_to_messages(row, self.fmt, RowContext(index, self.split, self.seed, self.answer_style))

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        n = len(indices)
        status, error = ["ok"] * n, [""] * n
        chats: dict[int, list[dict]] = {}
        for j, index in enumerate(indices):
            try:
                chats[j] = self.messages({k: v[j] for k, v in batch.items()}, index)
            except MalformedRowError as exc:
                status[j], error[j] = "malformed", str(exc)
        done = dict(zip(chats, assistant_labels_batch(self.tokenizer, list(chats.values()), self.max_length),
                        strict=True))
        out = {"input_ids": [], "labels": [], "status": status, "error": error, "truncated": [False] * n}
        for j in range(n):
            chat = done.get(j)
            keep = chat is not None
            if keep and chat.truncated:
                out["truncated"][j] = True
                if self.overlong == "drop":
                    status[j], keep = "dropped", False
            if keep and chat.num_labels == 0:
                status[j], keep = "no_labels", False
            out["input_ids"].append(chat.input_ids if keep else [])
            out["labels"].append(chat.labels if keep else [])
        return out


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenized data depends on in a tokenizer: its files' name, vocabulary size, template, eos/pad."""
    parts = [tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def keep_trainable(done, split: str, source_rows: Sequence[int] | None, max_seq_length: int,
                   strict: bool) -> tuple[object, dict[str, int]]:
    """The ``ok`` rows of a :class:`Tokenize` output (``input_ids`` and ``labels``) and the counts of each status;
    the rest logged by their row number in the source (``source_rows``: each split row's number there).

    Raises :class:`MalformedRowError` at a malformed row when ``strict``, and :class:`NoTrainableTokensError` when
    nothing is left.
    """
    status, truncated = list(done["status"]), list(done["truncated"])
    count = {k: status.count(k) for k in STATUSES}
    count["truncated"] = sum(truncated)
    malformed = [i for i, s in enumerate(status) if s == "malformed"]
    rows = source_rows or range(len(status))  # numbered as in the source file, not the split
    if malformed and strict:
        raise MalformedRowError(f"{split}: source row {rows[malformed[0]]} (0-based): "
                                f"{done[malformed[0]]['error']} (--data.strict true)")
    if malformed:
        log.warning("%s: skipped %d malformed rows (first source rows, 0-based: %s; first reason: %s)", split,
                    len(malformed), [rows[i] for i in malformed[:5]], done[malformed[0]]["error"])
    if count["truncated"] or count["dropped"]:
        log.warning("%s: %d examples longer than max_seq_length=%d: %s", split, count["truncated"], max_seq_length,
                    "dropped" if count["dropped"] else "truncated")
    if count["no_labels"]:
        log.warning("%s: %d examples had no assistant token after truncation and were left out", split,
                    count["no_labels"])
    if not count["ok"]:
        raise NoTrainableTokensError(
            f"No {split} example has an assistant token left ({count['no_labels']} lost all of them to truncation "
            f"at max_seq_length={max_seq_length}, {count['malformed']} malformed, {count['dropped']} "
            "dropped): training would see a loss of zero. Raise --data.max_seq_length or check the data."
        )
    keep = [i for i, s in enumerate(status) if s == "ok"]
    return done.select(keep).select_columns(["input_ids", "labels"]), count
