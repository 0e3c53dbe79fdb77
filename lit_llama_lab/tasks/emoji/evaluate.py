"""The emoji evaluation: does the model name the emoji (strictly), does its answer end, how likely are the
reference answers; on the splits training made, asked in training's wording or in wordings training never used."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from lit_llama_lab.tasks.common import (
    answers_table,
    batches,
    cell,
    reference_perplexity,
    run_name,
    sample_rows,
    write_result,
)
from lit_llama_lab.tasks.emoji.rows import HELDOUT_WORDINGS, TRAIN_WORDINGS, build_emoji_rows, emoji_messages
from lit_llama_lab.tasks.emoji.scoring import names_emoji, names_emoji_lenient, score

SPLITS = ("test", "train", "val", "all")
WORDINGS = ("train", "heldout")
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
ANSWER_COLUMNS = {"emoji": "emoji", "name": "expected name", "question": "question", "answer": "answer",
                  "named": "named", "stopped": "ended"}
VERIFY_MAX_NEW_TOKENS = 48


def emoji_split(split: str, seed: int = 42, test_fraction: float = 0.2, val_fraction: float = 0.02) -> list[dict]:
    """The rows of one split, exactly as training splits them (same seed and fractions give the same rows)."""
    from lit_llama_lab.data.splits import split_indices

    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")
    rows = build_emoji_rows()
    if split == "all":
        return rows
    return [rows[i] for i in split_indices(len(rows), test_fraction, val_fraction, seed)[split]]


def question_chats(rows: Sequence[dict], wordings: str, answer_style: str | None = "name") -> list[list[dict]]:
    """Each row as a two-turn chat: ``train`` asks "What is {e}?"; ``heldout`` rotates through the wordings
    training never uses."""
    if wordings not in WORDINGS:
        raise ValueError(f"Unknown wordings {wordings!r}: use 'train' or 'heldout'.")
    chats = []
    for i, row in enumerate(rows):
        wording = TRAIN_WORDINGS[0] if wordings == "train" else HELDOUT_WORDINGS[i % len(HELDOUT_WORDINGS)]
        chats.append(emoji_messages(row, wording=wording, style=answer_style or "name"))
    return chats


def answer_rows(model, tokenizer, rows: Sequence[dict], chats: Sequence[list[dict]], max_new_tokens: int,
                batch_size: int, desc: str = "generate") -> list[dict]:
    """Greedy answers to the user turn of each chat, one record per row (emoji, name, answer, named, stopped)."""
    from lit_llama_lab.generation import generate

    records = []
    pairs = list(zip(rows, chats, strict=True))
    for chunk in batches(pairs, batch_size, desc):
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


def metrics_table(results: Sequence[dict]) -> str:
    """One Markdown table, a row per result (``metrics.json`` contents): model, split, wordings, metrics."""
    head = ["model", "split", "wordings", "rows", *(title for title, _ in METRIC_COLUMNS.values())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["model"], r["split"], r["wordings"], r["metrics"]["answers"]]
        cells += [fmt.format(r["metrics"][key]) for key, (_, fmt) in METRIC_COLUMNS.items()]
        lines.append("| " + " | ".join(map(cell, cells)) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(result: dict, records: Sequence[dict], showcase: Sequence[dict], examples: int) -> str:
    """The report: settings, the metrics table, the first ``examples`` answers and the showcase emoji."""
    settings = ", ".join(f"{k}={v}" for k, v in result["settings"].items())
    return (
        f"# Emoji evaluation: {result['model']}\n\n{result['split']} split, {result['wordings']} wordings "
        f"(settings: {settings}).\n\n{metrics_table([result])}\n"
        f"## First {min(examples, len(records))} answers\n\n{answers_table(records[:examples], ANSWER_COLUMNS)}\n"
        "## Showcase emoji (from the original work's screenshots)\n\n"
        "Counted in the metrics only when they belong to the evaluated rows; `split` says where each one is.\n\n"
        + answers_table(showcase, {**ANSWER_COLUMNS, "split": "split"})
    )


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
        chats = question_chats(missing, wordings, settings["answer_style"])
        fresh = answer_rows(model, tokenizer, missing, chats, settings["max_new_tokens"], len(missing), "showcase")
        done.update({r["emoji"]: r for r in fresh})
    return [{**done[e], "split": where[e]} for e in SHOWCASE]


def evaluate_split(model, tokenizer, model_name: str, split: str, wordings: str, settings: dict,
                   output_dir: Path, examples: int = 10) -> dict:
    """Evaluate one loaded model on one split with one set of wordings; write metrics.json, answers.jsonl and
    report.md into ``output_dir`` (each atomically) and return the metrics.json contents."""
    started = time.perf_counter()
    rows = emoji_split(split, settings["seed"], settings["test_fraction"], settings["val_fraction"])
    rows = sample_rows(rows, settings["limit"], settings["seed"])
    chats = question_chats(rows, wordings, settings["answer_style"])
    records = answer_rows(model, tokenizer, rows, chats, settings["max_new_tokens"], settings["batch_size"])
    metrics = {**score(records), "perplexity": reference_perplexity(model, tokenizer, chats, settings["batch_size"])}
    showcase = showcase_records(model, tokenizer, records, wordings, settings)
    recorded = {k: v for k, v in settings.items() if k not in ("splits", "wordings")}
    result = {"model": model_name, "split": split, "wordings": wordings, "suite": "emoji", "metrics": metrics,
              "settings": {**recorded, "device": str(next(model.parameters()).device),
                           "seconds": round(time.perf_counter() - started, 1)}}
    write_result(output_dir, result, records, report_markdown(result, records, showcase, examples))
    return result


def check_settings(settings: dict) -> None:
    """Raise naming a split or wording the emoji evaluation does not know, before any model loads."""
    bad = [s for s in settings["splits"] if s not in SPLITS] + [w for w in settings["wordings"] if w not in WORDINGS]
    if bad:
        raise ValueError(f"Unknown split or wordings {bad}: splits are {', '.join(SPLITS)}; wordings train, heldout.")


def evaluate_emoji(model, tokenizer, model_name: str, settings: dict, output_dir: Path, examples: int = 10) -> list[dict]:
    """The emoji task's evaluation: one result per split (``settings["splits"]``) and wordings
    (``settings["wordings"]``), each in ``<output_dir>/<model>-<split>-<wordings>/``."""
    check_settings(settings)
    return [evaluate_split(model, tokenizer, model_name, split, words, settings,
                           output_dir / run_name(model_name, split, words), examples)
            for split in settings["splits"] for words in settings["wordings"]]


def verify_suite(model, tokenizer, limit: int | None, seed: int = 42) -> dict:
    """Strict name accuracy and eos rate on a seeded sample of ``limit`` emoji of the test split (training's
    wording), as an export verification suite; ``answers`` are the answer texts in row order."""
    rows = sample_rows(emoji_split("test", seed), limit, seed)
    records = answer_rows(model, tokenizer, rows, question_chats(rows, "train"), VERIFY_MAX_NEW_TOKENS, batch_size=16,
                          desc="verify")
    metrics = score(records)
    return {"scores": {"name_accuracy": metrics["name_accuracy"], "eos_rate": metrics["eos_rate"]},
            "answers": [r["answer"] for r in records]}
