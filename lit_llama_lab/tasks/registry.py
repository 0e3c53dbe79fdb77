"""The tasks the generic code consults: the built-in ones, and any a user registers (:func:`register`) before the
run (for instance in a module imported by a script)."""

from __future__ import annotations

from collections.abc import Iterable

from lit_llama_lab.tasks import emoji, general_eval
from lit_llama_lab.tasks.task import Task

_TASKS: dict[str, Task] = {task.name: task for task in (emoji.TASK, general_eval.TASK)}


def register(task: Task) -> None:
    """Add ``task`` (or replace the task of that name)."""
    _TASKS[task.name] = task


def get_task(name: str) -> Task:
    """The task called ``name``; raises naming the known ones."""
    if name not in _TASKS:
        raise ValueError(f"Unknown task {name!r}: known tasks are {', '.join(_TASKS)} (or register one with "
                         "lit_llama_lab.tasks.registry.register).")
    return _TASKS[name]


def task_names(piece: str | None = None) -> list[str]:
    """Names of the tasks, those that have ``piece`` (``messages``, ``rows``, ``evaluate``…) when given."""
    return [name for name, task in _TASKS.items() if piece is None or getattr(task, piece) is not None]


def format_of_columns(columns: Iterable[str]) -> str | None:
    """The task whose rows have these columns (its ``columns`` all present), or None."""
    names = set(columns)
    return next((t.name for t in _TASKS.values() if t.messages is not None and t.columns and t.columns <= names), None)
