"""Rows of any supported dataset format → one list of ``{role, content}`` messages, and where rows come from.

Formats: ``sharegpt`` (``conversations`` of ``{from, value}``), ``messages`` (OpenAI-style ``{role, content}``),
``alpaca`` (``instruction``, ``input``, ``output``), and each registered task's format
(:mod:`lit_llama_lab.tasks.registry`: ``emoji``, the emoji dataset's columns).
Sources: a task's built-in rows (``emoji``, built in memory), a local .jsonl/.json/.parquet/.csv file or folder, or a
hub id.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from lit_llama_lab.tasks.registry import format_of_columns, get_task, task_names
from lit_llama_lab.tasks.task import RowContext

CHAT_FORMATS = ("sharegpt", "messages", "alpaca")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant")


class MalformedRowError(ValueError):
    """A row that cannot become a chat: missing fields, unknown roles, empty turns."""


LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DETECT_ROWS = 2000  # rows whose columns are checked for one consistent format


def detect_format(columns: Iterable[str]) -> str:
    """The format a dataset's column names say it is in; raises naming the accepted column sets."""
    names = set(columns)
    if "conversations" in names:
        return "sharegpt"
    if "messages" in names:
        return "messages"
    if {"instruction", "output"} <= names:
        return "alpaca"
    task = format_of_columns(names)
    if task is not None:
        return task
    tasks = "; ".join(f"{' + '.join(sorted(get_task(t).columns))} ({t})" for t in task_names("messages"))
    raise ValueError(
        f"Cannot tell the dataset format from its columns {sorted(names)}. Expected 'conversations' (ShareGPT), "
        f"'messages' (OpenAI-style), 'instruction'+'output' (Alpaca) or a task's columns: {tasks}; "
        "or pass --data.format with one of " + ", ".join(formats()) + "."
    )


def formats() -> list[str]:
    """Every format ``--data.format`` takes: the chat formats, then the tasks' formats."""
    return [*CHAT_FORMATS, *task_names("messages")]


def _check(messages: list[dict]) -> list[dict]:
    if not messages:
        raise MalformedRowError("the conversation is empty")
    for m in messages:
        if m["role"] not in ROLES:
            raise MalformedRowError(f"unknown role {m['role']!r}")
        content = m["content"]
        if content is not None and not isinstance(content, str):
            kind = "number" if isinstance(content, (int, float)) else type(content).__name__
            raise MalformedRowError(
                f"the {m['role']} turn is a {kind} ({content!r}), not text: write it as a string in the file "
                f"(\"{content}\" in JSON)")
        if content is None or not content.strip():
            raise MalformedRowError(f"an empty {m['role']} turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRowError("no assistant turn")
    return messages


def row_to_messages(row: dict, fmt: str, context: RowContext | None = None) -> list[dict]:
    """Convert one row; raises :class:`MalformedRowError` saying what is wrong with it. ``context`` (the row's index,
    split, seed and answer style) is what a task's format may vary the chat by."""
    if fmt not in CHAT_FORMATS:
        return _task_messages(row, fmt, context or RowContext())
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
    except (KeyError, TypeError, AttributeError) as error:
        raise MalformedRowError(f"missing or mistyped field {error}") from None


def _task_messages(row: dict, fmt: str, context: RowContext) -> list[dict]:
    """A row of a task's format as a chat (the task's ``messages``), its refusals as :class:`MalformedRowError`."""
    if fmt not in task_names("messages"):
        raise ValueError(f"Unknown format {fmt!r}; use one of {', '.join(formats())} or 'auto'.")
    try:
        return get_task(fmt).messages(row, context)
    except (KeyError, TypeError, AttributeError) as error:
        raise MalformedRowError(f"missing or mistyped field {error}") from None
    except ValueError as error:
        raise MalformedRowError(str(error)) from None


def detect_rows_format(rows: Sequence[dict], limit: int = DETECT_ROWS) -> str:
    """The one format of the first ``limit`` rows, judged by each row's non-empty columns.

    Raises naming the row when a row fits no format, or when rows of two formats are mixed (a loader that unifies
    columns fills the other format's columns with None).
    """
    seen: dict[str, int] = {}
    for i in range(min(limit, len(rows))):
        row = rows[i]
        try:
            fmt = detect_format(k for k, v in row.items() if v is not None)
        except ValueError as error:
            raise ValueError(f"Row {i}: {error}") from None
        seen.setdefault(fmt, i)
        if len(seen) > 1:
            (a, ia), (b, ib) = seen.items()
            raise ValueError(
                f"Mixed dataset formats: row {ia} is {a} but row {ib} is {b}. Put each format in its own file, or "
                f"pass --data.format to read every row as one format (rows that do not fit are skipped and counted)."
            )
    if not seen:
        raise ValueError("The dataset holds no rows.")
    return next(iter(seen))


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Raise a clear error if a text file is empty or not UTF-8, naming the line of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, content = 0, 1, False
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as error:
                at = offset + error.start
                line = lines + block[: error.start].count(b"\n")
                raise ValueError(
                    f"{path} is not UTF-8 text: byte {block[error.start]:#04x} at offset {at} (line {line}). "
                    "Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`."
                ) from None
            content = content or bool(text.strip())
            offset, lines = offset + len(block), lines + block.count(b"\n")
    if not content:
        raise ValueError(f"{path} is empty: it holds no rows.")


def first_json_error(path: Path) -> str | None:
    """Where ``path`` stops being valid JSON (``FILE line N: reason``), or None when it parses.

    A ``.json`` file starting with ``[`` or ``{`` is read as one document, anything else as JSON Lines.
    """
    with open(path, encoding="utf-8") as handle:
        start = handle.read(4096).lstrip()[:1]
        handle.seek(0)
        if path.suffix.lower() == ".json" and start in ("[", "{"):
            try:
                json.load(handle)
            except json.JSONDecodeError as error:
                return f"{path} line {error.lineno}: {error.msg} (column {error.colno})"
            return None
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return f"{path} line {number}: {error.msg} (column {error.colno}); each line must be one JSON object"
            if not isinstance(row, dict):
                return f"{path} line {number}: a JSON {type(row).__name__}, not an object; each line must be one object"
    return None


def csv_text_features(files: list[str]):
    """Read every CSV column as text: a CSV has no types, and guessing them turns ``007`` into 7 and makes a numeric
    answer a number instead of a turn to train on. The column names come from the first file's header."""
    import csv

    import datasets

    with open(files[0], newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def local_files(path: Path) -> tuple[str, list[str]]:
    """The ``datasets`` builder name and the data files of a local file or folder (one file type only)."""
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{str(path)!r} holds no .jsonl, .json, .parquet or .csv file.")
    kinds = {LOCAL_SUFFIXES.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(
            f"{str(path)!r}: expected files of one type among {sorted(LOCAL_SUFFIXES)}, got {[f.name for f in files]}."
        )
    kind = kinds.pop()
    for f in files:
        if kind != "parquet":
            check_utf8(f)
        elif f.stat().st_size == 0:
            raise ValueError(f"{f} is empty: it holds no rows.")
    return kind, [str(f) for f in files]


def load_source(source: str, split: str = "train", subset: str | None = None, cache_dir: str | None = None):
    """A ``datasets.Dataset`` from a task's built-in rows (``emoji``), a local file or folder, or a hub id.

    Local files are read by ``datasets`` into ``cache_dir`` (default: the lab cache, never the hub cache); a hub
    id downloads into the usual hub cache and is the only form that touches the network.
    """
    import datasets

    if source in task_names("rows"):
        return datasets.Dataset.from_list(get_task(source).rows())
    from lit_llama_lab.model.hub import check_hub_dataset
    from lit_llama_lab.model.source import cache_dir as lab_cache
    from lit_llama_lab.model.source import local_path_reason

    path = Path(source).expanduser()
    if path.exists():
        kind, files = local_files(path)
        options = {"features": csv_text_features(files)} if kind == "csv" else {}
        try:
            return datasets.load_dataset(
                kind, data_files=files, split="train", cache_dir=cache_dir or str(lab_cache() / "datasets"), **options
            )
        except Exception as error:  # pyarrow/datasets raise many types for a malformed file
            where = next(filter(None, map(first_json_error, map(Path, files))), None) if kind == "json" else None
            raise ValueError(
                f"Could not read {source!r} as {kind}: " + (f"{where}. Fix or remove that line." if where else
                f"{type(error).__name__}: {error}. Check that every row is valid and has the same columns with the "
                "same types.")
            ) from error
    reason = local_path_reason(source)
    if reason is not None:
        raise ValueError(f"Data source {source!r}: no such file or folder, and not a hub id like 'owner/name' "
                         f"({reason}).")
    check_hub_dataset(source)
    try:
        return datasets.load_dataset(source, subset, split=split)
    except (ConnectionError, OSError) as error:
        raise ValueError(
            f"Could not load the hub dataset {source!r} ({error}). It needs the network (or a copy in the hub cache); "
            "or download it once and pass --data.source path/to/local/files."
        ) from error
