"""ChatDataModule: rows from a source → chats → assistant-only labels → seeded splits → packed batches."""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_llama_lab.data.emoji import TRAIN_WORDINGS, pick_wording
from lit_llama_lab.data.formats import (
    FORMATS,
    MalformedRowError,
    detect_format,  # noqa: F401  (re-exported)
    detect_rows_format,
    load_source,
    row_to_messages,
)
from lit_llama_lab.data.masking import assistant_labels_batch, labelled_next_tokens
from lit_llama_lab.data.packing import (
    BOOL_MASK_IMPLEMENTATIONS,
    collate_packed,
    collate_padded,
    pack_balanced,
    packed_attention_mask,
)
from lit_llama_lab.data.replay import answer_prompts, load_prompts, prompts_needed, replay_chats, replay_count
from lit_llama_lab.data.sampler import ResumableDataLoader
from lit_llama_lab.fast import check_documents

log = logging.getLogger(__name__)
TOKENIZE_VERSION = "1"  # bump when Tokenize's output changes, to invalidate cached tokenizations


@dataclass(frozen=True)
class ReplayArgs:
    """Replay of the starting model's own answers to general prompts, mixed into training so a task run keeps the
    assistant (:mod:`lit_llama_lab.data.replay`).

    Args:
        ratio: share of the training examples that are replay chats, in [0, 1); 0 turns replay off.
        prompts: a .jsonl file of ``{"prompt": ...}`` rows to draw from; default: the bundled pool of general prompts
            (disjoint from the general evaluation suite).
        max_new_tokens: answer budget; answers that do not end within it are not used.
        model: the model that answers: linked to the model's ``init_adapter`` when one is set, else its base.
        quantize: the answering model's 4-bit format, linked to the model's ``quantize``.
    """

    ratio: float = 0.0
    prompts: str | None = None
    max_new_tokens: int = 160
    model: str | None = None
    quantize: Literal["nf4", "fp4", "none"] = "nf4"


class NoTrainableTokensError(ValueError):
    """Raised when no example keeps an assistant token, so training would see a loss of zero."""


def load_rows(source: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """Rows as dicts from ``emoji``, a local file/folder or a hub id (see :func:`load_source`)."""
    return load_source(source, split, subset).to_list()


def split_indices(n: int, test_fraction: float, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Seeded train/val/test row indices (sorted within each split): the same for the same ``n`` and seed."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    picked = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: sorted(idx) for name, idx in picked.items()}


class Tokenize:
    """The ``datasets.map`` function (batched, with indices): rows → ``input_ids``, ``labels`` and a status.

    Status: ``ok``, ``malformed`` (with ``error``), ``no_labels`` (no assistant token left) or ``dropped``.
    """

    def __init__(self, tokenizer, fmt: str, split: str, seed: int, emoji_answer: str, max_length: int,
                 overlong: str) -> None:
        self.tokenizer, self.fmt, self.split, self.seed = tokenizer, fmt, split, seed
        self.emoji_answer, self.max_length, self.overlong = emoji_answer, max_length, overlong

    def messages(self, row: dict, index: int) -> list[dict]:
        if self.fmt != "emoji":
            return row_to_messages(row, self.fmt)
        wording = pick_wording(index, self.seed) if self.split == "train" else TRAIN_WORDINGS[0]
        return row_to_messages(row, self.fmt, wording=wording, style=self.emoji_answer)

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


class ChatDataModule(L.LightningDataModule):
    """Chat datasets for causal-LM fine-tuning with loss on assistant tokens only.

    Args:
        source: ``emoji`` (the built-in offline set), a local .jsonl/.json/.parquet/.csv file or folder, or a hub id
            such as ``mlabonne/FineTome-100k`` (the only form that uses the network).
        format: ``auto`` or one of sharegpt, messages, alpaca, emoji.
        tokenizer: the base model whose tokenizer and chat template are used (linked from ``model.name_or_path``).
        max_seq_length: longest example in tokens, and the row length packed batches fill; longer examples are
            truncated or dropped (``overlong``).
        batch_size: examples per micro-batch, packed or not; with ``packing`` they are packed best-fit into rows of
            at most ``max_seq_length`` tokens, so packing never changes the number of optimizer steps.
        packing: padding-free rows with restarting ``position_ids`` and a block-diagonal causal mask; otherwise
            right-padded rows.
        test_fraction: share of rows held out for testing, never trained on.
        val_fraction: share of rows (taken from the training part) used for validation.
        seed: seeds the split and the emoji wording choice.
        emoji_answer: ``name`` ("🐼 is the panda emoji."), ``name_fact`` (the name, then one short true sentence
            from the row's LLM description) or ``description`` (the whole LLM description column).
        replay: the starting model's answers to general prompts mixed into the training split (``ratio``) so the
            tuned model stays a chat assistant; see :class:`ReplayArgs`.
        overlong: ``truncate`` or ``drop`` examples past ``max_seq_length``.
        strict: raise on the first malformed row instead of skipping it.
        split: which split of a hub dataset to load.
        subset: the hub dataset's config name, if any.
        num_workers: DataLoader worker processes.
        num_proc: processes for tokenization (``datasets.map``); None tokenizes in this process.
        attn_implementation: the model's attention (linked from the model): sets the packed mask's form. ``auto``,
            ``varlen`` and ``sdpa`` get the boolean 4-D mask (varlen trains from ``document_ids`` and validates
            through sdpa), ``eager`` an additive one, ``flex_attention`` a BlockMask.
        cache_dir: where ``datasets`` caches local files and their tokenization (default: the lab cache).
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
        emoji_answer: Literal["name", "name_fact", "description"] = "name",
        replay: ReplayArgs = ReplayArgs(),  # noqa: B008 (a frozen value: jsonargparse expands it into --data.replay.*)
        overlong: Literal["truncate", "drop"] = "truncate",
        strict: bool = False,
        split: str = "train",
        subset: str | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        attn_implementation: str = "auto",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"Unknown format {format!r}; use auto or one of {', '.join(FORMATS)}.")
        if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
            raise ValueError("test_fraction and val_fraction must be in [0, 1) and leave rows for training.")
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2 tokens, got {max_seq_length}.")
        self.replay = replay or ReplayArgs()
        replay_count(1, self.replay.ratio)  # a bad ratio fails here, before anything loads
        self.save_hyperparameters(ignore=["replay"])
        self.hparams["replay"] = vars(self.replay)
        self.splits: dict = {}  # split name -> datasets.Dataset of input_ids + labels
        self.rows: dict = {}  # split name -> datasets.Dataset of the source rows
        self.stats: dict[str, dict[str, int]] = {}
        self.source_rows: dict[str, list[int]] = {}  # split name -> each row's number in the source (0-based)
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The base model's tokenizer (eos/pad fixed), loaded on first use."""
        if self._tokenizer is None:
            from lit_llama_lab.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def split_rows(self, rows: list[dict]) -> dict[str, list[dict]]:
        """Seeded train/val/test split of rows (the same for the same seed and rows)."""
        h = self.hparams
        return {k: [rows[i] for i in v] for k, v in split_indices(len(rows), h.test_fraction, h.val_fraction, h.seed).items()}

    def tokenize_split(self, rows, fmt: str, split: str):
        """A ``datasets.Dataset`` of ``input_ids``/``labels`` for ``rows`` (a Dataset or a list of dicts).

        Malformed, label-less and (``overlong=drop``) too long rows are left out, counted and logged; cached by
        fingerprint for file sources. Raises :class:`NoTrainableTokensError` when nothing trainable is left.
        """
        import datasets

        h = self.hparams
        data = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))
        if len(data) == 0:
            return data
        fn = Tokenize(self.tokenizer, fmt, split, h.seed, h.emoji_answer, h.max_seq_length, h.overlong)
        settings = [data._fingerprint, tokenizer_fingerprint(self.tokenizer), fmt, split, h.seed, h.emoji_answer,
                    h.max_seq_length, h.overlong, TOKENIZE_VERSION]
        done = data.map(
            fn, batched=True, batch_size=256, with_indices=True, remove_columns=data.column_names,
            num_proc=h.num_proc if h.num_proc and h.num_proc > 1 else None, desc=f"Tokenizing {split}",
            new_fingerprint=hashlib.sha256(repr(settings).encode()).hexdigest()[:16],
        )
        return self._keep_trainable(done, split)

    def _keep_trainable(self, done, split: str):
        status, truncated = list(done["status"]), list(done["truncated"])
        count = {k: status.count(k) for k in ("ok", "malformed", "no_labels", "dropped")}
        count["truncated"] = sum(truncated)
        self.stats[split] = count
        malformed = [i for i, s in enumerate(status) if s == "malformed"]
        rows = self.source_rows.get(split) or range(len(status))  # numbered as in the source file, not the split
        if malformed and self.hparams.strict:
            raise MalformedRowError(f"{split}: source row {rows[malformed[0]]} (0-based): "
                                    f"{done[malformed[0]]['error']} (--data.strict true)")
        if malformed:
            log.warning("%s: skipped %d malformed rows (first source rows, 0-based: %s; first reason: %s)", split,
                        len(malformed), [rows[i] for i in malformed[:5]], done[malformed[0]]["error"])
        if count["truncated"] or count["dropped"]:
            log.warning("%s: %d examples longer than max_seq_length=%d: %s", split, count["truncated"],
                        self.hparams.max_seq_length, "dropped" if count["dropped"] else "truncated")
        if count["no_labels"]:
            log.warning("%s: %d examples had no assistant token after truncation and were left out", split,
                        count["no_labels"])
        if not count["ok"]:
            raise NoTrainableTokensError(
                f"No {split} example has an assistant token left ({count['no_labels']} lost all of them to truncation "
                f"at max_seq_length={self.hparams.max_seq_length}, {count['malformed']} malformed, {count['dropped']} "
                "dropped): training would see a loss of zero. Raise --data.max_seq_length or check the data."
            )
        keep = [i for i, s in enumerate(status) if s == "ok"]
        return done.select(keep).select_columns(["input_ids", "labels"])

    def prepare_data(self) -> None:
        """Download (hub) or read and cache (local files) the source once, before :meth:`setup`."""
        if self.hparams.source != "emoji":
            load_source(self.hparams.source, self.hparams.split, self.hparams.subset, self.hparams.cache_dir)
        if self.replay.ratio > 0:
            self.replay_answers()

    def replay_answers(self) -> dict[str, dict]:
        """The answering model's cached answers to the replay prompts this run needs (generated once, on the
        training device, the first time; see :func:`lit_llama_lab.data.replay.answer_prompts`)."""
        h, r = self.hparams, self.replay
        data = load_source(h.source, h.split, h.subset, h.cache_dir)
        train_rows = len(split_indices(len(data), h.test_fraction, h.val_fraction, h.seed)["train"])
        prompts = prompts_needed(load_prompts(r.prompts), replay_count(train_rows, r.ratio), h.seed)
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        return answer_prompts(r.model or h.tokenizer, prompts, r.quantize, r.max_new_tokens, device)

    def setup(self, stage: str | None = None) -> None:
        """Load, detect the format, split and tokenize (once)."""
        if self.splits:
            return
        h = self.hparams
        data = load_source(h.source, h.split, h.subset, h.cache_dir)
        if len(data) == 0:
            raise ValueError(f"The data source {h.source!r} holds no rows.")
        fmt = detect_rows_format(data) if h.format == "auto" else h.format
        picked = split_indices(len(data), h.test_fraction, h.val_fraction, h.seed)
        self.rows = {name: data.select(idx) for name, idx in picked.items()}
        self.source_rows = picked
        self.splits = {name: self.tokenize_split(part, fmt, name) for name, part in self.rows.items()}
        if self.replay.ratio > 0:
            self.splits["train"] = self.with_replay(self.splits["train"])
        log.info("format %s, examples: %s", fmt, {k: len(v) for k, v in self.splits.items()})

    def with_replay(self, train):
        """``train`` plus replay chats, shuffled in by the sampler: ``replay.ratio`` of the result."""
        import datasets

        count = replay_count(len(self.rows["train"]), self.replay.ratio)  # as replay_answers counts
        chats = replay_chats(self.replay_answers(), count, self.hparams.seed)
        if not chats:
            return train
        replay = self.tokenize_split([{"messages": chat} for chat in chats], "messages", "replay")
        log.info("replay: %d chats of the answering model's own answers, %.1f%% of training examples", len(replay),
                 100 * len(replay) / max(1, len(replay) + len(train)))
        # the flag becomes each batch's distill_mask: where the model's KL to the base is taken (model.distill_weight)
        return datasets.concatenate_datasets([train.add_column("distill", [0] * len(train)),
                                              replay.add_column("distill", [1] * len(replay))])

    def collate(self, examples: list[dict]) -> dict:
        """Padded rows, or examples packed into as few rows of at most ``max_seq_length`` tokens as best-fit needs,
        filled evenly."""
        pad = self.tokenizer.pad_token_id
        if not self.hparams.packing:
            return collate_padded(examples, pad)
        bins = pack_balanced([len(e["input_ids"]) for e in examples], self.hparams.max_seq_length)
        # flex's BlockMask neither pickles (worker processes) nor moves devices: it is built after the transfer.
        impl = "sdpa" if self.hparams.attn_implementation == "flex_attention" else self.hparams.attn_implementation
        return collate_packed([[examples[i] for i in b] for b in bins], pad, impl)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count the labelled tokens (``num_labelled``, the loss's logging weight) while the batch is on the CPU:
        counting on a GPU would make the host wait for it every step. Packed batches also get ``max_documents``
        (``batch_size``: every example is one document), the fixed bound varlen's offsets are sized by
        (:func:`lit_llama_lab.fast.varlen_keys`), checked here."""
        batch["num_labelled"] = labelled_next_tokens(batch["labels"])
        if "document_ids" in batch:
            check_documents(batch["document_ids"], self.hparams.batch_size)
            batch["max_documents"] = self.hparams.batch_size
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Rebuild a packed batch's mask on its device: eager's additive mask in the model's compute dtype, flex's
        BlockMask."""
        impl = self.hparams.attn_implementation
        if "document_ids" in batch and impl not in BOOL_MASK_IMPLEMENTATIONS:
            dtype = torch.float32
            module = self.trainer.lightning_module if self.trainer is not None else None
            model = getattr(module, "model", None)
            if model is not None:
                dtype = model.get_input_embeddings().weight.dtype
            batch["attention_mask"] = packed_attention_mask(batch["document_ids"], impl, dtype)
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # Training order is a seeded permutation per epoch and the loader's position is checkpointed, so
        # `--ckpt_path last` resumes mid-epoch on the very next batch (see data/sampler.py).
        return ResumableDataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            seed=self.hparams.seed,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
