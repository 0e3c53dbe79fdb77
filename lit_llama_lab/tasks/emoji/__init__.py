"""The emoji task: teach the model to name emoji (:mod:`.rows`: the offline data and its chats; :mod:`.scoring`:
strict name matching; :mod:`.evaluate`: the evaluation and the export verification suite)."""

from __future__ import annotations

from collections.abc import Sequence

from lit_llama_lab.tasks.emoji.rows import (
    ANSWER_STYLES,
    COLUMNS,
    TRAIN_WORDINGS,
    build_emoji_rows,
    emoji_messages,
    pick_wording,
)
from lit_llama_lab.tasks.task import RowContext, Task

# Asked after each validation by the sample callback (SampleGenerations(task=emoji)) unless items are given.
SAMPLE_EMOJI = ("🐼", "🇺🇸", "🎂", "🤌", "👋🏽", "🦩", "🧑‍🚀")


def messages(row: dict, context: RowContext) -> list[dict]:
    """An emoji row as a chat: training rows are asked in a seeded choice of the training wordings, validation and
    test rows in the first one; the answer in ``context.style`` (default ``name``)."""
    missing = [c for c in COLUMNS[:3] if not row.get(c)]
    if missing:
        raise ValueError(f"missing {missing}")
    wording = pick_wording(context.index, context.seed) if context.split == "train" else TRAIN_WORDINGS[0]
    return emoji_messages(row, wording=wording, style=context.style or "name")


def sample_questions(items: Sequence[str] | None = None) -> list[str]:
    """``What is {e}?`` for each emoji of ``items`` (default :data:`SAMPLE_EMOJI`)."""
    return [f"What is {e}?" for e in (SAMPLE_EMOJI if items is None else items)]


def contrast_chats(count: int, seed: int, style: str | None = None) -> list[list[dict]]:
    """:func:`lit_llama_lab.tasks.emoji.symbols.contrast_chats`."""
    from lit_llama_lab.tasks.emoji.symbols import contrast_chats as chats

    return chats(count, seed, style)


def check(settings: dict) -> None:
    """:func:`lit_llama_lab.tasks.emoji.evaluate.check_settings`."""
    from lit_llama_lab.tasks.emoji.evaluate import check_settings

    check_settings(settings)


def evaluate(*args, **kwargs) -> list[dict]:
    """:func:`lit_llama_lab.tasks.emoji.evaluate.evaluate_emoji`."""
    from lit_llama_lab.tasks.emoji.evaluate import evaluate_emoji

    return evaluate_emoji(*args, **kwargs)


def table(results) -> str:
    """:func:`lit_llama_lab.tasks.emoji.evaluate.metrics_table`."""
    from lit_llama_lab.tasks.emoji.evaluate import metrics_table

    return metrics_table(results)


def verify(*args, **kwargs) -> dict:
    """:func:`lit_llama_lab.tasks.emoji.evaluate.verify_suite`."""
    from lit_llama_lab.tasks.emoji.evaluate import verify_suite

    return verify_suite(*args, **kwargs)


TASK = Task(
    name="emoji",
    title="Emoji",
    columns=frozenset({"character", "short description"}),
    styles=ANSWER_STYLES,
    messages=messages,
    rows=build_emoji_rows,
    sample_questions=sample_questions,
    check=check,
    evaluate=evaluate,
    table=table,
    verify=verify,
    exact_answers=True,
    contrast_chats=contrast_chats,
)
