"""Rows of any supported dataset format → one list of ``{role, content}`` messages.

Formats: ``sharegpt`` (``conversations`` of ``{from, value}``), ``messages`` (OpenAI-style ``{role, content}``),
``alpaca`` (``instruction``, ``input``, ``output``) and ``emoji`` (the emoji dataset's columns).
"""

from __future__ import annotations

from collections.abc import Iterable

from lit_llama_lab.data.emoji import COLUMNS as EMOJI_COLUMNS
from lit_llama_lab.data.emoji import emoji_messages

FORMATS = ("sharegpt", "messages", "alpaca", "emoji")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant")


class MalformedRowError(ValueError):
    """A row that cannot become a chat: missing fields, unknown roles, empty turns."""


def detect_format(columns: Iterable[str]) -> str:
    """The format a dataset's column names say it is in; raises naming the accepted column sets."""
    names = set(columns)
    if "conversations" in names:
        return "sharegpt"
    if "messages" in names:
        return "messages"
    if {"instruction", "output"} <= names:
        return "alpaca"
    if {"character", "short description"} <= names:
        return "emoji"
    raise ValueError(
        f"Cannot tell the dataset format from its columns {sorted(names)}. Expected 'conversations' (ShareGPT), "
        "'messages' (OpenAI-style), 'instruction'+'output' (Alpaca) or 'character'+'short description' (emoji); "
        "or pass --data.format with one of " + ", ".join(FORMATS) + "."
    )


def _check(messages: list[dict]) -> list[dict]:
    if not messages:
        raise MalformedRowError("the conversation is empty")
    for m in messages:
        if m["role"] not in ROLES:
            raise MalformedRowError(f"unknown role {m['role']!r}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise MalformedRowError(f"an empty {m['role']} turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRowError("no assistant turn")
    return messages


def row_to_messages(row: dict, fmt: str, **emoji_options) -> list[dict]:
    """Convert one row; raises :class:`MalformedRowError` saying what is wrong with it."""
    try:
        if fmt == "sharegpt":
            turns = row["conversations"]
            unknown = [t.get("from") for t in turns if t.get("from") not in SHAREGPT_ROLES]
            if unknown:
                raise MalformedRowError(f"unknown ShareGPT role {unknown[0]!r}")
            return _check([{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns])
        if fmt == "messages":
            return _check([{"role": m["role"], "content": m["content"]} for m in row["messages"]])
        if fmt == "alpaca":
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            return _check([{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}])
        if fmt == "emoji":
            missing = [c for c in EMOJI_COLUMNS[:3] if not row.get(c)]
            if missing:
                raise MalformedRowError(f"missing {missing}")
            return emoji_messages(row, **emoji_options)
    except (KeyError, TypeError, AttributeError) as error:
        raise MalformedRowError(f"missing or mistyped field {error}") from None
    raise ValueError(f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)} or 'auto'.")
