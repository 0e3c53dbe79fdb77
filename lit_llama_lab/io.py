"""Atomic writes: a file or folder is replaced whole or not at all, never left half-written.

Every write goes through a hidden sibling named ``.NAME.PID.partial`` and one rename. A process killed mid-write
leaves only such a sibling, which no loader takes for the real thing (a checkpoint folder's next run removes them:
:func:`lit_llama_lab.train.callbacks.run_folder.clean_leftovers`). A folder replacement moves the old folder aside
as ``.NAME.PID.old`` for the moment of the swap and puts it back if the swap fails.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_name(path: Path) -> Path:
    """The hidden sibling ``path`` is written through: ``.NAME.PID.partial`` (matches no checkpoint pattern)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s new contents to; on success it is renamed over ``path`` (with
    permissions ``mode``), on failure removed. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the new one, never a part."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    """Write ``data`` as indented JSON (UTF-8, non-ASCII kept) to ``path`` atomically."""
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def replace_folder(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target``, replacing an older ``target`` without a moment where
    neither exists under its name: the old one is moved aside, the new one renamed in, then the old one deleted
    (moved back if the rename fails)."""
    if not target.exists():
        os.replace(source, target)
        return
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    os.replace(target, old)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(old, target)  # the previous folder goes back under its name
        raise
    shutil.rmtree(old)


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``target`` to write a whole folder into; the caller renames it into place
    (:func:`replace_folder`) before the block ends. Whatever is left of it (a failure) is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_once(target: Path, write: Callable[[Path], object]) -> Path:
    """Create the folder ``target`` by ``write(folder)`` into a staged folder, then a rename; when another process
    created ``target`` meanwhile, theirs is kept. Returns ``target`` (used for caches: converted and random models)."""
    with staged_folder(target) as tmp:
        write(tmp)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp makes an owner-only folder
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if not target.exists():
            os.replace(tmp, target)
    return target
