"""ChatDataModule: rows from a source → chats → assistant-only labels → seeded splits → packed batches."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_llama_lab.data.emoji import TRAIN_WORDINGS, build_emoji_rows, pick_wording
from lit_llama_lab.data.formats import FORMATS, MalformedRowError, detect_format, row_to_messages
from lit_llama_lab.data.masking import assistant_labels
from lit_llama_lab.data.packing import collate_packed, collate_padded, pack_best_fit

log = logging.getLogger(__name__)
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class NoTrainableTokensError(ValueError):
    """Raised when no example keeps an assistant token, so training would see a loss of zero."""


def load_rows(source: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """Rows from ``emoji`` (built offline), a local file/folder (.jsonl/.json/.parquet/.csv) or a hub id."""
    if source == "emoji":
        return build_emoji_rows()
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"{source!r} holds no .jsonl, .json, .parquet or .csv file.")
        kinds = {LOCAL_SUFFIXES.get(f.suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"{source!r}: expected files of one type among {sorted(LOCAL_SUFFIXES)}, got {files}.")
        try:
            data = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
        except UnicodeDecodeError as error:
            raise ValueError(f"{source!r} is not UTF-8 text ({error}); re-encode it as UTF-8.") from None
        return data.to_list()
    return datasets.load_dataset(source, subset, split=split).to_list()


class ChatDataModule(L.LightningDataModule):
    """Chat datasets for causal-LM fine-tuning with loss on assistant tokens only.

    Args:
        source: ``emoji`` (the built-in offline set), a local .jsonl/.json/.parquet/.csv file or folder, or a hub id.
        format: ``auto`` or one of sharegpt, messages, alpaca, emoji.
        tokenizer: the base model whose tokenizer and chat template are used (linked from ``model.name_or_path``).
        max_seq_length: longest example in tokens; longer ones are truncated or dropped (``overlong``).
        batch_size: examples per micro-batch; with ``packing`` they are packed into as few rows as fit.
        packing: padding-free batches with a block-diagonal mask; otherwise right-padded.
        test_fraction: share of rows held out for testing, never trained on.
        val_fraction: share of rows (taken from the training part) used for validation.
        seed: seeds the split and the emoji wording choice.
        emoji_answer: ``name`` ("🐼 is the panda emoji.") or ``description`` (the LLM description column).
        overlong: ``truncate`` or ``drop`` examples past ``max_seq_length``.
        strict: raise on the first malformed row instead of skipping it.
        split: which split of a hub dataset to load.
        subset: the hub dataset's config name, if any.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        source: str = "emoji",
        format: Literal["auto", "sharegpt", "messages", "alpaca", "emoji"] = "auto",
        tokenizer: str = "smollm2-135m",
        max_seq_length: int = 512,
        batch_size: int = 32,
        packing: bool = True,
        test_fraction: float = 0.2,
        val_fraction: float = 0.02,
        seed: int = 42,
        emoji_answer: Literal["name", "description"] = "name",
        overlong: Literal["truncate", "drop"] = "truncate",
        strict: bool = False,
        split: str = "train",
        subset: str | None = None,
        num_workers: int = 0,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"Unknown format {format!r}; use auto or one of {', '.join(FORMATS)}.")
        if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
            raise ValueError("test_fraction and val_fraction must be in [0, 1) and leave rows for training.")
        self.save_hyperparameters()
        self.splits: dict[str, list[dict]] = {}
        self.rows: dict[str, list[dict]] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lit_llama_lab.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def split_rows(self, rows: list[dict]) -> dict[str, list[dict]]:
        """Seeded train/val/test split of rows (the same for the same seed and rows)."""
        order = list(range(len(rows)))
        random.Random(self.hparams.seed).shuffle(order)
        n_test = round(len(rows) * self.hparams.test_fraction)
        n_val = round(len(rows) * self.hparams.val_fraction)
        picked = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        return {name: [rows[i] for i in sorted(idx)] for name, idx in picked.items()}

    def _messages(self, row: dict, fmt: str, index: int, split: str) -> list[dict]:
        if fmt != "emoji":
            return row_to_messages(row, fmt)
        wording = pick_wording(index, self.hparams.seed) if split == "train" else TRAIN_WORDINGS[0]
        return row_to_messages(row, fmt, wording=wording, style=self.hparams.emoji_answer)

    def tokenize_split(self, rows: list[dict], fmt: str, split: str) -> list[dict]:
        """Chats with labels; malformed, label-less or (with ``overlong=drop``) too long rows are skipped and
        counted. Raises when nothing trainable is left."""
        examples, skipped, no_labels, truncated, dropped = [], [], 0, 0, 0
        for i, row in enumerate(rows):
            try:
                messages = self._messages(row, fmt, i, split)
            except MalformedRowError as error:
                if self.hparams.strict:
                    raise MalformedRowError(f"{split} row {i}: {error}") from None
                skipped.append(i)
                continue
            chat = assistant_labels(self.tokenizer, messages, self.hparams.max_seq_length)
            if chat.truncated and self.hparams.overlong == "drop":
                dropped += 1
                continue
            truncated += chat.truncated
            if chat.num_labels == 0:
                no_labels += 1
                continue
            examples.append({"input_ids": chat.input_ids, "labels": chat.labels})
        if skipped:
            log.warning("%s: skipped %d malformed rows (first: %s)", split, len(skipped), skipped[:5])
        if truncated or dropped:
            log.warning("%s: %d examples truncated, %d dropped at %d tokens", split, truncated, dropped,
                        self.hparams.max_seq_length)
        if rows and not examples:
            raise NoTrainableTokensError(
                f"No {split} example has an assistant token left ({no_labels} lost all of them to truncation at "
                f"max_seq_length={self.hparams.max_seq_length}, {len(skipped)} malformed, {dropped} dropped): "
                "training would see a loss of zero. Raise --data.max_seq_length or check the data."
            )
        if no_labels:
            log.warning("%s: %d examples had no assistant token after truncation and were left out", split, no_labels)
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        rows = load_rows(self.hparams.source, self.hparams.split, self.hparams.subset)
        if not rows:
            raise ValueError(f"The data source {self.hparams.source!r} holds no rows.")
        fmt = detect_format(rows[0].keys()) if self.hparams.format == "auto" else self.hparams.format
        self.rows = self.split_rows(rows)
        self.splits = {name: self.tokenize_split(part, fmt, name) for name, part in self.rows.items()}
        log.info("examples: %s", {k: len(v) for k, v in self.splits.items()})

    def collate(self, examples: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        if not self.hparams.packing:
            return collate_padded(examples, pad)
        bins = pack_best_fit([len(e["input_ids"]) for e in examples], self.hparams.max_seq_length)
        return collate_packed([[examples[i] for i in b] for b in bins], pad, self.hparams.attn_implementation)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
            generator=generator if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
