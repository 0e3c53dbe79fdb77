"""What a task is: the pieces the generic data, training, evaluation and export code ask it for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RowContext:
    """What a task's format may vary a chat by: the row's index in its split, the split, the data seed, and the
    answer style (``--data.answer_style``; None: the task's default)."""

    index: int = 0
    split: str = "train"
    seed: int = 42
    style: str | None = None


@dataclass(frozen=True)
class Task:
    """A task's plug-in points; each is optional.

    Args:
        name: the task's name: ``--data.format``, ``--data.source`` (with ``rows``), ``evaluate --suite``,
            ``SampleGenerations(task=...)``, ``export --verify_suites``.
        title: its heading in evaluation summaries.
        columns: the columns that identify the task's rows (format detection).
        styles: the answer styles ``messages`` takes (``--data.answer_style``), the first the default.
        messages: ``(row, RowContext) -> chat`` (a list of ``{role, content}``); raises ``KeyError``/``ValueError``
            for a row it cannot use (counted as malformed).
        rows: the task's built-in rows (``--data.source NAME`` reads them, offline).
        sample_questions: ``(items or None) -> questions`` for the training sample table (None: the task's own).
        check: ``(settings) -> None``: raises for evaluation settings the task cannot use, before any model loads.
        evaluate: ``(model, tokenizer, model_name, settings, output_dir, examples) -> [result]``: writes each
            result's ``metrics.json``, ``answers.jsonl`` and ``report.md`` under ``output_dir``.
        table: ``(results) -> Markdown`` for the results ``evaluate`` returned.
        verify: ``(model, tokenizer, limit, seed) -> {"scores": {name: fraction}, "answers": [...]}``: the task as an
            export verification suite (:mod:`lit_llama_lab.tools.export_verify`).
        exact_answers: the verification also requires answers word for word the adapter's (short answers; long ones
            reword under any rounding).
        contrast_chats: ``(count, seed, style) -> chats``: chats about things that are *not* the task's items,
            trained beside them (``--data.contrast_ratio``) so the model learns where the task ends (emoji: Unicode
            symbols that are not emoji, :mod:`lit_llama_lab.tasks.emoji.symbols`).
    """

    name: str
    title: str = ""
    columns: frozenset[str] = frozenset()
    styles: tuple[str, ...] = ()
    messages: Callable[[dict, RowContext], list[dict]] | None = None
    rows: Callable[[], list[dict]] | None = None
    sample_questions: Callable[[Sequence[str] | None], list[str]] | None = None
    check: Callable[[dict], None] | None = None
    evaluate: Callable[..., list[dict]] | None = None
    table: Callable[[Sequence[dict]], str] | None = None
    verify: Callable[..., dict] | None = None
    exact_answers: bool = False
    contrast_chats: Callable[[int, int, str | None], list[list[dict]]] | None = None
