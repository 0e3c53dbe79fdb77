"""Emoji evaluation: does the model name the emoji, does its answer end, how likely are the reference answers.

``lit-llama-lab evaluate`` rebuilds the emoji splits exactly as training does, asks each emoji with a training
or a held-out wording, answers through the one shared :func:`~lit_llama_lab.generation.generate` (greedy,
batched) and writes ``metrics.json``, ``answers.jsonl`` and ``report.md`` per (model, split, wordings).
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric

from lit_llama_lab.data.emoji import HELDOUT_WORDINGS, TRAIN_WORDINGS, build_emoji_rows, emoji_messages
from lit_llama_lab.io import write_atomic  # noqa: F401  (re-exported: callers import it from here)

Split = Literal["test", "train", "val", "all"]
Wordings = Literal["train", "heldout"]
SPLITS = ("test", "train", "val", "all")
Suite = Literal["emoji", "general"]
SUITES = ("emoji", "general")
# The emoji of the original work's screenshots: always shown in the report, evaluated or not.
SHOWCASE = ("🐼", "🇺🇸", "🎂", "🤌")
# metrics.json key -> (table header, format)
METRIC_COLUMNS = {
    "name_accuracy": ("name accuracy", "{:.1%}"),
    "name_accuracy_lenient": ("lenient (substring, old)", "{:.1%}"),
    "eos_rate": ("eos termination", "{:.1%}"),
    "mean_answer_tokens": ("mean answer tokens", "{:.1f}"),
    "perplexity": ("reference perplexity", "{:.2f}"),
}


def normalize(text: str) -> str:
    """Casefolded text with typographic apostrophes made plain and whitespace collapsed, for name matching."""
    return re.sub(r"\s+", " ", text.replace("\u2019", "'").replace("\u2018", "'")).casefold().strip()


WORD = re.compile(r"\w+|[#*]|[.!?\n]")  # name words (keycaps keep # and *), and sentence ends
NAME_STARTS = frozenset({"the", "a", "an", "called", "named"})
NAME_ENDS = frozenset({"emoji", "emojis", ".", "!", "?", "\n"})
MAX_NAME_WORDS = 16


def name_words(text: str) -> tuple[str, ...]:
    """A name as comparable words: casefolded, punctuation dropped (``#`` and ``*`` of keycaps kept), a leading
    ``flag`` dropped (``flag: United States`` → ``united states``)."""
    return _phrase(WORD.findall(normalize(text)))


@functools.lru_cache(maxsize=1)
def known_names() -> frozenset[tuple[str, ...]]:
    """Every emoji's CLDR short name as :func:`name_words`: what an answer can state as a name."""
    return frozenset(name_words(row["short description"]) for row in build_emoji_rows())


def stated_name(answer: str, known: frozenset[tuple[str, ...]] | None = None) -> tuple[str, ...] | None:
    """The emoji name ``answer`` states first, as :func:`name_words`, or None when it states none.

    A name is stated as a phrase that starts after ``the``/``a``/``an``/``called``/``named`` or at the start of a
    sentence, and ends before the word ``emoji`` or at a sentence end: "🐼 is *the panda* emoji.", "It is called
    *panda*.". Of the phrases ending at the first end that closes a known name, the longest known one is the stated
    name, so "the sign of the horns emoji" states "sign of the horns", not "horns", and "the woman pouting emoji"
    states "woman pouting", never "man pouting".
    """
    known = known_names() if known is None else known
    tokens = WORD.findall(normalize(answer))
    starts = [-1]  # a phrase starts after one of these token positions
    for at, token in enumerate(tokens):
        if token in NAME_ENDS or at == len(tokens) - 1:
            end = at if token in NAME_ENDS else at + 1
            found = [words for s in starts if 0 < len(words := _phrase(tokens[s + 1:end])) <= MAX_NAME_WORDS
                     and words in known]
            if found:
                return max(found, key=len)
        if token in NAME_STARTS or token in ".!?\n":
            starts.append(at)
    return None


def _phrase(tokens: list[str]) -> tuple[str, ...]:
    words = [t for t in tokens if t not in ".!?\n"]
    return tuple(words[1:] if words[:1] == ["flag"] and len(words) > 1 else words)


def names_emoji(answer: str, name: str, known: frozenset[tuple[str, ...]] | None = None) -> bool:
    """Strict: True when the name ``answer`` states (:func:`stated_name`) equals the emoji's short name, word for
    word (case, punctuation and the ``flag:`` prefix ignored). A reference that only appears inside another name
    ("man pouting" in "woman pouting", "ox" in "bento box") does not count."""
    target = name_words(name)
    return stated_name(answer, (known_names() if known is None else known) | {target}) == target


def names_emoji_lenient(answer: str, name: str) -> bool:
    """The previous scoring, reported beside the strict one for one release: the short name appears anywhere in
    ``answer`` as a substring, ignoring case."""
    return normalize(name) in normalize(answer)


class EmojiAnswerMetrics(Metric):
    """Counts over generated answers: how many name the emoji (strictly, and by the old substring rule), how many
    ended with eos, and their token total.

    ``compute()`` returns ``name_accuracy`` (strict, :func:`names_emoji`), ``name_accuracy_lenient``
    (:func:`names_emoji_lenient`) and ``eos_rate`` (fractions), ``mean_answer_tokens`` and the raw counts ``named``,
    ``named_lenient``, ``stopped``, ``answers``.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for state in ("named", "named_lenient", "stopped", "tokens", "answers"):
            self.add_state(state, default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, answers: Sequence[str], names: Sequence[str], stopped: Sequence[bool],
               lengths: Sequence[int]) -> None:
        """Add a batch: answer texts, expected short names, eos flags and answer lengths in tokens."""
        if not len(answers) == len(names) == len(stopped) == len(lengths):
            raise ValueError("answers, names, stopped and lengths must have the same length.")
        self.named += sum(names_emoji(a, n) for a, n in zip(answers, names, strict=True))
        self.named_lenient += sum(names_emoji_lenient(a, n) for a, n in zip(answers, names, strict=True))
        self.stopped += sum(bool(s) for s in stopped)
        self.tokens += sum(int(n) for n in lengths)
        self.answers += len(answers)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.answers.clamp(min=1).float()
        return {
            "name_accuracy": self.named / total,
            "name_accuracy_lenient": self.named_lenient / total,
            "eos_rate": self.stopped / total,
            "mean_answer_tokens": self.tokens / total,
            "named": self.named,
            "named_lenient": self.named_lenient,
            "stopped": self.stopped,
            "answers": self.answers,
        }


def emoji_split(split: str, seed: int = 42, test_fraction: float = 0.2, val_fraction: float = 0.02) -> list[dict]:
    """The rows of one split, exactly as training splits them (same seed and fractions give the same rows)."""
    from lit_llama_lab.data.datamodule import ChatDataModule

    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")
    rows = build_emoji_rows()
    if split == "all":
        return rows
    data = ChatDataModule(source="emoji", seed=seed, test_fraction=test_fraction, val_fraction=val_fraction)
    return data.split_rows(rows)[split]


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


def question_chats(rows: Sequence[dict], wordings: str, emoji_answer: str = "name") -> list[list[dict]]:
    """Each row as a two-turn chat: ``train`` asks "What is {e}?"; ``heldout`` rotates through the wordings
    training never uses."""
    if wordings not in ("train", "heldout"):
        raise ValueError(f"Unknown wordings {wordings!r}: use 'train' or 'heldout'.")
    chats = []
    for i, row in enumerate(rows):
        wording = TRAIN_WORDINGS[0] if wordings == "train" else HELDOUT_WORDINGS[i % len(HELDOUT_WORDINGS)]
        chats.append(emoji_messages(row, wording=wording, style=emoji_answer))
    return chats


def _batches(items: Sequence, size: int, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=desc, unit="batch", total=len(starts)):
        yield items[start:start + size]


@torch.no_grad()
def reference_perplexity(model, tokenizer, chats: Sequence[list[dict]], batch_size: int = 32) -> float:
    """Teacher-forced perplexity of the assistant turns (end-of-turn included) of ``chats``, per token."""
    from lit_llama_lab.data.masking import assistant_labels
    from lit_llama_lab.data.packing import collate_padded
    from lit_llama_lab.module import label_loss

    if hasattr(model, "reference_nll"):  # a GGUF in llama.cpp: the same ids and labels, llama.cpp's logits
        from lit_llama_lab.llamacpp import runtime_perplexity

        return runtime_perplexity(model, tokenizer, chats)
    device = next(model.parameters()).device
    mean_nll = MeanMetric()
    for chunk in _batches(chats, batch_size, "perplexity"):
        examples = [assistant_labels(tokenizer, chat) for chat in chunk]
        batch = collate_padded([{"input_ids": e.input_ids, "labels": e.labels} for e in examples],
                               tokenizer.pad_token_id)
        loss, _, targets = label_loss(model, {k: v.to(device) for k, v in batch.items()})
        mean_nll.update(loss.float().cpu(), weight=targets.numel())
    return math.exp(mean_nll.compute().item())


def answer_rows(model, tokenizer, rows: Sequence[dict], chats: Sequence[list[dict]], max_new_tokens: int,
                batch_size: int, desc: str = "generate") -> list[dict]:
    """Greedy answers to the user turn of each chat, one record per row (emoji, name, answer, named, stopped)."""
    from lit_llama_lab.generation import generate

    records = []
    pairs = list(zip(rows, chats, strict=True))
    for chunk in _batches(pairs, batch_size, desc):
        outputs = generate(model, tokenizer, [chat[:-1] for _, chat in chunk], max_new_tokens=max_new_tokens,
                           temperature=0.0, batch_size=len(chunk))
        for (row, chat), out in zip(chunk, outputs, strict=True):
            records.append({
                "emoji": row["character"], "name": row["short description"], "question": chat[0]["content"],
                "answer": out.text, "named": names_emoji(out.text, row["short description"]),
                "named_lenient": names_emoji_lenient(out.text, row["short description"]),
                "stopped": out.stopped, "tokens": len(out.token_ids),
            })
    return records


def score(records: Sequence[dict]) -> dict[str, float | int]:
    """The answer metrics of ``records`` (see :class:`EmojiAnswerMetrics`) as plain numbers."""
    metric = EmojiAnswerMetrics()
    metric.update([r["answer"] for r in records], [r["name"] for r in records],
                  [r["stopped"] for r in records], [r["tokens"] for r in records])
    return {k: v.item() for k, v in metric.compute().items()}


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("|", "\\|").replace("\n", " ⏎ ") if value != "" else "*(empty)*"


def metrics_table(results: Sequence[dict]) -> str:
    """One Markdown table, a row per result (``metrics.json`` contents): model, split, wordings, metrics."""
    head = ["model", "split", "wordings", "rows", *(title for title, _ in METRIC_COLUMNS.values())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["model"], r["split"], r["wordings"], r["metrics"]["answers"]]
        cells += [fmt.format(r["metrics"][key]) for key, (_, fmt) in METRIC_COLUMNS.items()]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines) + "\n"


def compare(paths: Sequence[str | Path]) -> str:
    """A Markdown table comparing saved results: each path is a ``metrics.json`` or a folder holding one."""
    results = []
    for path in map(Path, paths):
        file = path / "metrics.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No metrics.json at {str(path)!r}: pass an evaluation output folder or file.")
        results.append(json.loads(file.read_text(encoding="utf-8")))
    return metrics_table(results)


ANSWER_COLUMNS = {"emoji": "emoji", "name": "expected name", "question": "question", "answer": "answer",
                  "named": "named", "stopped": "ended"}


def answers_table(records: Sequence[dict], columns: dict[str, str] = ANSWER_COLUMNS) -> str:
    """Answer records as a Markdown table with the given ``{key: header}`` columns."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def report_markdown(result: dict, records: Sequence[dict], showcase: Sequence[dict], examples: int) -> str:
    """The report: settings, the metrics table, the first ``examples`` answers and the showcase emoji."""
    settings = ", ".join(f"{k}={v}" for k, v in result["settings"].items())
    return (
        f"# Emoji evaluation: {result['model']}\n\n{result['split']} split, {result['wordings']} wordings "
        f"(settings: {settings}).\n\n{metrics_table([result])}\n"
        f"## First {min(examples, len(records))} answers\n\n{answers_table(records[:examples])}\n"
        "## Showcase emoji (from the original work's screenshots)\n\n"
        "Counted in the metrics only when they belong to the evaluated rows; `split` says where each one is.\n\n"
        + answers_table(showcase, {**ANSWER_COLUMNS, "split": "split"})
    )


def run_name(model: str, split: str, wordings: str) -> str:
    """The folder name of one result: the model (a folder's last three path parts, so the checkpoints of two runs,
    ``runs/a/checkpoints/last`` and ``runs/b/checkpoints/last``, get folders of their own), the split and the
    wordings."""
    path = Path(str(model).rstrip("/"))
    base = "-".join(part for part in path.parts[-3:] if part != "/") if path.is_dir() else str(model)
    return re.sub(r"[^\w.\-]+", "_", f"{base}-{split}-{wordings}")


def check_models(models: Sequence[str]) -> None:
    """Fail before any model loads when one of ``models`` is neither an adapter folder nor a base model."""
    from lit_llama_lab.models import is_adapter_folder, resolve_model_source

    for name in models:
        if not is_adapter_folder(name):
            resolve_model_source(name)  # raises ModelNotFoundError naming the accepted forms


def showcase_records(model, tokenizer, records: Sequence[dict], wordings: str, settings: dict) -> list[dict]:
    """Answers for :data:`SHOWCASE`, reused from ``records`` when evaluated there, generated otherwise; each
    tagged with the split it belongs to."""
    rows = {r["character"]: r for r in build_emoji_rows()}
    splits = {name: emoji_split(name, settings["seed"], settings["test_fraction"], settings["val_fraction"])
              for name in ("train", "val", "test")}
    where = {r["character"]: name for name, part in splits.items() for r in part}
    done = {r["emoji"]: r for r in records}
    missing = [rows[e] for e in SHOWCASE if e not in done]
    if missing:
        chats = question_chats(missing, wordings, settings["emoji_answer"])
        fresh = answer_rows(model, tokenizer, missing, chats, settings["max_new_tokens"], len(missing), "showcase")
        done.update({r["emoji"]: r for r in fresh})
    return [{**done[e], "split": where[e]} for e in SHOWCASE]


def evaluate_split(model, tokenizer, model_name: str, split: str, wordings: str, settings: dict,
                   output_dir: Path, examples: int = 10) -> dict:
    """Evaluate one loaded model on one split with one set of wordings; write metrics.json, answers.jsonl and
    report.md into ``output_dir`` (each atomically) and return the metrics.json contents."""
    import time

    started = time.perf_counter()
    rows = emoji_split(split, settings["seed"], settings["test_fraction"], settings["val_fraction"])
    rows = sample_rows(rows, settings["limit"], settings["seed"])
    chats = question_chats(rows, wordings, settings["emoji_answer"])
    records = answer_rows(model, tokenizer, rows, chats, settings["max_new_tokens"], settings["batch_size"])
    metrics = {**score(records), "perplexity": reference_perplexity(model, tokenizer, chats, settings["batch_size"])}
    showcase = showcase_records(model, tokenizer, records, wordings, settings)
    device = str(next(model.parameters()).device)
    result = {"model": model_name, "split": split, "wordings": wordings, "metrics": metrics,
              "settings": {**settings, "device": device, "seconds": round(time.perf_counter() - started, 1)}}
    write_atomic(output_dir / "answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomic(output_dir / "report.md", report_markdown(result, records, showcase, examples))
    write_atomic(output_dir / "metrics.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def evaluate(
    model: str | list[str] = "smollm2-135m",
    split: Split | list[Split] = "test",
    wordings: Wordings | list[Wordings] = "train",
    limit: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    output_dir: str = "runs/eval",
    seed: int = 42,
    test_fraction: float = 0.2,
    val_fraction: float = 0.02,
    emoji_answer: Literal["name", "name_fact", "description"] = "name",
    examples: int = 10,
    quantize: Literal["nf4", "fp4", "none"] | None = None,
    suite: Suite | list[Suite] = "emoji",
    general_max_new_tokens: int = 128,
    runtime: Literal["transformers", "llamacpp"] = "transformers",
) -> list[dict]:
    """Measure how well models name emoji (strict name accuracy, the old lenient figure beside it, eos termination,
    answer length, reference perplexity) and how well they still answer ordinary questions (the general suite:
    accuracy, template leakage).

    For ``suite: emoji`` every combination of ``model``, ``split`` and ``wordings`` is one result, written to
    ``<output_dir>/<model>-<split>-<wordings>/`` (metrics.json, answers.jsonl, report.md); ``suite: general`` adds
    one result per model in ``<output_dir>/<model>-general-suite/``. With more than one result, comparison tables
    go to ``<output_dir>/summary.md``. Tables are printed too.

    Args:
        model: a base model (``smollm2-135m``, an HF folder, a .gguf, a hub id) or an adapter/checkpoint folder;
            or a list of them, e.g. ``[smollm2-135m, runs/emoji/adapter]`` for a before/after table.
        split: ``test`` (held-out emoji), ``train``, ``val`` or ``all``; or a list. Rebuilt as training splits
            the data, so use the training run's seed and fractions.
        wordings: ``train`` asks "What is {e}?" as in training; ``heldout`` rotates through questions training
            never uses (trained emoji asked in new words). Or a list of both.
        limit: evaluate a seeded random sample of this many rows of each split (all rows when unset).
        max_new_tokens: answer budget; an answer without eos within it counts as not ended.
        batch_size: chats per generation (and perplexity) batch.
        output_dir: root folder of the results.
        seed: the training run's data seed (it decides the split) and the sample's seed.
        test_fraction: the training run's ``data.test_fraction``.
        val_fraction: the training run's ``data.val_fraction``.
        emoji_answer: the training run's ``data.emoji_answer``: the reference answers for perplexity.
        examples: how many answers the report shows (the showcase emoji 🐼 🇺🇸 🎂 🤌 are always added).
        quantize: base weights as ``nf4``, ``fp4`` or ``none``; unset: as the adapter was trained (else nf4).
        suite: ``emoji`` (the splits and wordings above), ``general`` (the bundled general-ability suite: 192
            ordinary prompts with checkable answers, none about emoji) or both, ``[emoji,general]``.
        general_max_new_tokens: answer budget of the general suite.
        runtime: ``transformers``, or ``llamacpp`` to run .gguf models in llama.cpp with the GGUF's own tokenizer
            and chat template (needs llama-cpp-python: ``make test-llamacpp``).

    Returns the list of results (the metrics.json contents).
    """
    from lit_llama_lab.general_eval import evaluate_general, general_table
    from lit_llama_lab.llamacpp import check_runtime, load_for_runtime

    models, splits, wordings_list, suites = ([x] if isinstance(x, str) else list(x)
                                             for x in (model, split, wordings, suite))
    _check_arguments(splits, wordings_list, limit, max_new_tokens, batch_size, suites, general_max_new_tokens)
    check_models(models)
    check_runtime(models, runtime)
    settings = {"limit": limit, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed,
                "test_fraction": test_fraction, "val_fraction": val_fraction, "emoji_answer": emoji_answer,
                "general_max_new_tokens": general_max_new_tokens}
    torch.manual_seed(seed)
    results = []
    for name in models:
        loaded, tokenizer = load_for_runtime(name, runtime, quantize)
        for part, words in ([(p, w) for p in splits for w in wordings_list] if "emoji" in suites else []):
            folder = Path(output_dir) / run_name(name, part, words)
            result = evaluate_split(loaded, tokenizer, name, part, words, settings, folder, examples)
            print(f"\n{folder}/report.md\n{metrics_table([result])}")
            results.append(result)
        if "general" in suites:
            folder = Path(output_dir) / run_name(name, "general", "suite")
            result = evaluate_general(loaded, tokenizer, name, settings, folder, examples)
            print(f"\n{folder}/report.md\n{general_table([result])}")
            results.append(result)
        del loaded
    if len(results) > 1:
        emoji = [r for r in results if r.get("suite") != "general"]
        general = [r for r in results if r.get("suite") == "general"]
        table = "\n".join([f"## Emoji\n\n{metrics_table(emoji)}"] * bool(emoji)
                          + [f"## General-ability suite\n\n{general_table(general)}"] * bool(general))
        write_atomic(Path(output_dir) / "summary.md", "# Evaluation\n\n" + table)
        print(f"\n{Path(output_dir) / 'summary.md'}\n{table}")
    return results


def _check_arguments(splits: Sequence[str], wordings: Sequence[str], limit: int | None, max_new_tokens: int,
                     batch_size: int, suites: Sequence[str] = ("emoji",), general_max_new_tokens: int = 1) -> None:
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise ValueError(f"Unknown suite {unknown or suites}: use {', '.join(SUITES)}, or both as [emoji,general].")
    if general_max_new_tokens < 1:
        raise ValueError(f"general_max_new_tokens must be at least 1, got {general_max_new_tokens}.")
    bad = [s for s in splits if s not in SPLITS] + [w for w in wordings if w not in ("train", "heldout")]
    if bad:
        raise ValueError(f"Unknown split or wordings {bad}: splits are {', '.join(SPLITS)}; wordings train, heldout.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or unset for whole splits), got {limit}.")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be at least 1, got {max_new_tokens}, {batch_size}.")
