"""ChatDataModule: rows from a source → chats → assistant-only labels → seeded splits → neutral packed batches."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from lit_llama_lab.data.formats import (
    detect_format,  # noqa: F401  (re-exported)
    detect_rows_format,
    formats,
    load_source,
)
from lit_llama_lab.data.masking import labelled_next_tokens
from lit_llama_lab.data.packing import check_documents, collate_packed, collate_padded, pack_balanced
from lit_llama_lab.data.replay import (
    ReplayArgs,
    answer_prompts,
    load_prompts,
    prompts_needed,
    replay_chats,
    replay_count,
)
from lit_llama_lab.data.sampler import ResumableDataLoader, rank_and_world_size
from lit_llama_lab.data.splits import check_fractions, split_indices
from lit_llama_lab.data.tokenize import (  # noqa: F401  (NoTrainableTokensError re-exported)
    TOKENIZE_VERSION,
    NoTrainableTokensError,
    Tokenize,
    keep_trainable,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubArgs:
    """Which part of a hub dataset to load (a local file or a task's rows ignore these).

    Args:
        split: the hub dataset's split.
        subset: the hub dataset's config name, if any.
    """

    split: str = "train"
    subset: str | None = None


def load_rows(source: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """Rows as dicts from a task's built-in rows (``emoji``), a local file/folder or a hub id (see
    :func:`load_source`)."""
    return load_source(source, split, subset).to_list()


class ChatDataModule(L.LightningDataModule):
    """Chat datasets for causal-LM fine-tuning with loss on assistant tokens only.

    Batches are neutral: ``input_ids``, ``labels``, and for packed rows ``position_ids`` and ``document_ids`` (for
    padded rows a 2-D ``attention_mask``), plus ``distill_mask`` when replay is on; the attention form is built by the
    model's step (:func:`lit_llama_lab.speed.attention.attention_inputs`).

    Args:
        source: a task's built-in rows (``emoji``, offline), a local .jsonl/.json/.parquet/.csv file or folder, or a
            hub id such as ``mlabonne/FineTome-100k`` (the only form that uses the network).
        format: ``auto`` or one of sharegpt, messages, alpaca, or a task's format (emoji).
        tokenizer: the base model whose tokenizer and chat template are used (linked from ``model.name_or_path``).
        max_seq_length: longest example in tokens, and the row length packed batches fill; longer examples are
            truncated or dropped (``overlong``).
        batch_size: examples per micro-batch, packed or not; with ``packing`` they are packed best-fit into rows of
            at most ``max_seq_length`` tokens, so packing never changes the number of optimizer steps. Per device,
            as Lightning users expect: 2 devices take twice the examples per step (see ``global_batch_size``).
        global_batch_size: examples per step over all devices together; each device takes its share
            (``global_batch_size / devices``, which must divide), so 1 and 2 GPUs take the same steps on the same
            examples. Replaces ``batch_size`` when set.
        packing: padding-free rows with restarting ``position_ids`` (each example attends only to itself);
            otherwise right-padded rows.
        share_prefix: with ``packing``, the untrained tokens a row's examples begin with, held once
            (:func:`lit_llama_lab.data.packing.collate_packed`): the same loss in fewer tokens; mask attentions only.
        test_fraction: share of rows held out for testing, never trained on.
        val_fraction: share of rows (taken from the training part) used for validation.
        seed: seeds the split and a task format's per-row choices (the emoji question's wording).
        answer_style: the answer style of a task's format (emoji: ``name``, "🐼 is the panda emoji."; ``name_fact``,
            the name then one short true sentence from the row's LLM description; ``description``, the whole LLM
            description column); unset: the task's default.
        replay: the starting model's answers to general prompts mixed into the training split (``ratio``) so the
            tuned model stays a chat assistant; see :class:`lit_llama_lab.data.replay.ReplayArgs`.
        contrast_ratio: contrast chats added to the training split, as a share of its task rows: the task's chats
            about things that are not its items (emoji: questions about Unicode symbols that are not emoji, answered
            "⇐ is the leftwards double arrow symbol."), so the model learns where the task ends; 0 adds none.
        hub: the split and subset of a hub dataset.
        overlong: ``truncate`` or ``drop`` examples past ``max_seq_length``.
        strict: raise on the first malformed row instead of skipping it.
        num_workers: DataLoader worker processes.
        num_proc: processes for tokenization (``datasets.map``); None tokenizes in this process.
        cache_dir: where ``datasets`` caches local files and their tokenization (default: the lab cache).
    """

    def __init__(
        self,
        source: str = "emoji",
        format: str = "auto",
        tokenizer: str = "smollm2-135m",
        max_seq_length: int = 512,
        batch_size: int = 32,
        global_batch_size: int | None = None,
        packing: bool = True,
        share_prefix: bool = False,
        test_fraction: float = 0.2,
        val_fraction: float = 0.02,
        seed: int = 42,
        answer_style: str | None = None,
        replay: ReplayArgs = ReplayArgs(),  # noqa: B008 (a frozen value: jsonargparse expands it into --data.replay.*)
        contrast_ratio: float = 0.0,
        hub: HubArgs = HubArgs(),  # noqa: B008 (likewise: --data.hub.split, --data.hub.subset)
        overlong: Literal["truncate", "drop"] = "truncate",
        strict: bool = False,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if format != "auto" and format not in formats():
            raise ValueError(f"Unknown format {format!r}; use auto or one of {', '.join(formats())}.")
        check_fractions(test_fraction, val_fraction)
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2 tokens, got {max_seq_length}.")
        if share_prefix and not packing:
            raise ValueError("share_prefix holds a prefix once per packed row and needs packing: set --data.packing "
                             "true, or --data.share_prefix false.")
        if global_batch_size is not None and global_batch_size < 1:
            raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}.")
        self.replay, self.hub = replay or ReplayArgs(), hub or HubArgs()
        replay_count(1, self.replay.ratio)  # a bad ratio fails here, before anything loads
        if not 0 <= contrast_ratio < 1:
            raise ValueError(f"contrast_ratio must be in [0, 1) (contrast chats as a share of the training task rows), "
                             f"got {contrast_ratio}: e.g. --data.contrast_ratio 0.1.")
        self.save_hyperparameters(ignore=["replay", "hub"])
        self.hparams["replay"], self.hparams["hub"] = vars(self.replay), vars(self.hub)
        self.splits: dict = {}  # split name -> datasets.Dataset of input_ids + labels
        self.rows: dict = {}  # split name -> datasets.Dataset of the source rows
        self.stats: dict[str, dict[str, int]] = {}
        self.source_rows: dict[str, list[int]] = {}  # split name -> each row's number in the source (0-based)
        self._tokenizer = None

    @property
    def device_batch_size(self) -> int:
        """Examples per micro-batch on this device: ``batch_size``, or this device's share of ``global_batch_size``."""
        total = self.hparams.get("global_batch_size")
        if total is None:
            return self.hparams.batch_size
        trainer = self.trainer
        devices = trainer.world_size if trainer is not None else rank_and_world_size()[1]
        if total % devices:
            raise ValueError(f"global_batch_size {total} does not divide among {devices} devices: use a multiple of "
                             f"{devices}, or --data.batch_size for a per-device batch.")
        return total // devices

    @property
    def tokenizer(self):
        """The base model's tokenizer (eos/pad fixed), loaded on first use."""
        if self._tokenizer is None:
            from lit_llama_lab.model.load import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def split_rows(self, rows: list[dict]) -> dict[str, list[dict]]:
        """Seeded train/val/test split of rows (the same for the same seed and rows)."""
        h = self.hparams
        return {k: [rows[i] for i in v] for k, v in split_indices(len(rows), h.test_fraction, h.val_fraction, h.seed).items()}

    def load(self):
        """The source's rows as a ``datasets.Dataset`` (read and cached once per source)."""
        h = self.hparams
        return load_source(h.source, self.hub.split, self.hub.subset, h.cache_dir)

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
        fn = Tokenize(self.tokenizer, fmt, split, h.seed, h.answer_style, h.max_seq_length, h.overlong)
        settings = [data._fingerprint, tokenizer_fingerprint(self.tokenizer), fmt, split, h.seed, h.answer_style,
                    h.max_seq_length, h.overlong, TOKENIZE_VERSION]
        done = data.map(
            fn, batched=True, batch_size=256, with_indices=True, remove_columns=data.column_names,
            num_proc=h.num_proc if h.num_proc and h.num_proc > 1 else None, desc=f"Tokenizing {split}",
            new_fingerprint=hashlib.sha256(repr(settings).encode()).hexdigest()[:16],
        )
        kept, self.stats[split] = keep_trainable(done, split, self.source_rows.get(split), h.max_seq_length, h.strict)
        return kept

    def prepare_data(self) -> None:
        """Download (hub) or read and cache (local files) the source once, before :meth:`setup` (a task's built-in
        rows are built in memory, in :meth:`setup`)."""
        from lit_llama_lab.tasks.registry import task_names

        if self.hparams.source not in task_names("rows"):
            self.load()
        if self.replay.ratio > 0:
            self.replay_answers()

    def replay_answers(self) -> dict[str, dict]:
        """The answering model's cached answers to the replay prompts this run needs (generated once, on the
        training device, the first time; see :func:`lit_llama_lab.data.replay.answer_prompts`)."""
        h, r = self.hparams, self.replay
        train_rows = len(split_indices(len(self.load()), h.test_fraction, h.val_fraction, h.seed)["train"])
        prompts = prompts_needed(load_prompts(r.prompts), replay_count(train_rows, r.ratio), h.seed)
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        return answer_prompts(r.model or h.tokenizer, prompts, r.quantize, r.max_new_tokens, device)

    def setup(self, stage: str | None = None) -> None:
        """Load, detect the format, split and tokenize (once)."""
        if self.splits:
            return
        h = self.hparams
        data = self.load()
        if len(data) == 0:
            raise ValueError(f"The data source {h.source!r} holds no rows.")
        fmt = detect_rows_format(data) if h.format == "auto" else h.format
        self.check_answer_style(fmt)
        self.check_contrast(fmt)
        picked = split_indices(len(data), h.test_fraction, h.val_fraction, h.seed)
        self.rows = {name: data.select(idx) for name, idx in picked.items()}
        self.source_rows = picked
        self.splits = {name: self.tokenize_split(part, fmt, name) for name, part in self.rows.items()}
        if h.contrast_ratio > 0:
            self.splits["train"] = self.with_contrast(self.splits["train"], fmt)
        if self.replay.ratio > 0:
            self.splits["train"] = self.with_replay(self.splits["train"])
        log.info("format %s, examples: %s", fmt, {k: len(v) for k, v in self.splits.items()})

    def check_answer_style(self, fmt: str) -> None:
        """Refuse an ``answer_style`` the format has not (chat formats have none; a task's lists its own)."""
        from lit_llama_lab.tasks.registry import get_task, task_names

        style = self.hparams.answer_style
        styles = get_task(fmt).styles if fmt in task_names("messages") else ()
        if style is not None and style not in styles:
            raise ValueError(f"answer_style={style!r} does not apply to the {fmt} format"
                             + (f": use one of {', '.join(styles)}." if styles else ": leave it unset."))

    def check_contrast(self, fmt: str) -> None:
        """Refuse a ``contrast_ratio`` > 0 for a format whose task has no contrast chats, before anything is tokenized."""
        from lit_llama_lab.tasks.registry import task_names

        h = self.hparams
        if h.contrast_ratio > 0 and fmt not in task_names("contrast_chats"):
            raise ValueError(f"contrast_ratio={h.contrast_ratio} needs a task with contrast chats "
                             f"({', '.join(task_names('contrast_chats'))}); the {fmt} format has none: set it to 0.")

    def with_contrast(self, train, fmt: str):
        """``train`` plus ``contrast_ratio`` × its task rows of the task's contrast chats
        (:attr:`Task.contrast_chats`), shuffled in by the sampler like the task's own rows."""
        import datasets

        from lit_llama_lab.tasks.registry import get_task

        h = self.hparams
        count = round(len(self.rows["train"]) * h.contrast_ratio)
        chats = get_task(fmt).contrast_chats(count, h.seed, h.answer_style)
        if not chats:
            return train
        contrast = self.tokenize_split([{"messages": chat} for chat in chats], "messages", "contrast")
        log.info("contrast: %d chats about what is not the %s task's (%.1f%% of the task rows)", len(contrast), fmt,
                 100 * len(contrast) / max(1, len(train)))
        return datasets.concatenate_datasets([train, contrast])

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
        # the flag becomes each batch's distill_mask: where the model's KL to the base is taken (model.distill_weight);
        # replay_id (0, 1, ... over the replay chats, -1 elsewhere) each batch's replay_ids, which find a chat's
        # cached teacher states (speed.distill.TeacherCache)
        train = train.add_column("distill", [0] * len(train)).add_column("replay_id", [-1] * len(train))
        replay = replay.add_column("distill", [1] * len(replay)).add_column("replay_id", list(range(len(replay))))
        return datasets.concatenate_datasets([train, replay])

    def replay_examples(self) -> list[list[int]]:
        """The token ids of the training split's replay chats, by ``replay_id`` (empty without replay)."""
        if not self.splits:
            self.setup("fit")
        train = self.splits["train"]
        if "replay_id" not in train.column_names:
            return []
        ids = train["replay_id"]
        found = {i: row for i, row in zip(ids, train["input_ids"], strict=True) if i >= 0}
        return [list(found[i]) for i in range(len(found))]

    def collate(self, examples: list[dict]) -> dict:
        """Padded rows, or examples packed into as few rows of at most ``max_seq_length`` tokens as best-fit needs,
        filled evenly."""
        pad = self.tokenizer.pad_token_id
        if not self.hparams.packing:
            return collate_padded(examples, pad)
        bins = pack_balanced([len(e["input_ids"]) for e in examples], self.hparams.max_seq_length)
        return collate_packed([[examples[i] for i in b] for b in bins], pad, share_prefix=self.hparams.share_prefix)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count the labelled tokens (``num_labelled``, the loss's logging weight) while the batch is on the CPU:
        counting on a GPU would make the host wait for it every step. Packed batches also get ``max_documents``
        (``batch_size``: every example is one document), the fixed bound varlen's offsets are sized by
        (:func:`lit_llama_lab.speed.attention.varlen_keys`), checked here (not with shared prefixes: no varlen)."""
        batch["num_labelled"] = labelled_next_tokens(batch["labels"])
        if "document_ids" in batch and "prefix_lengths" not in batch:
            batch["max_documents"] = self.device_batch_size
            check_documents(batch["document_ids"], batch["max_documents"])
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # Training order is a seeded permutation per epoch and the loader's position is checkpointed, so
        # `--ckpt_path last` resumes mid-epoch on the very next batch (see data/sampler.py).
        return ResumableDataLoader(
            self.splits[split],
            batch_size=self.device_batch_size,
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
