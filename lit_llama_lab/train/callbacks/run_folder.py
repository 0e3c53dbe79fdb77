"""A checkpoint folder belongs to one run, and one live process writes into it.

``runs/<name>/checkpoints/last`` is what ``evaluate``, ``export``, the UI and the Makefile read, so a new fit must not
write beside another run's checkpoints (Lightning would add ``last-v1`` and leave ``last`` to the old run). A fit
may write into the folder when it is empty or when it resumes from a checkpoint inside it; otherwise it is refused,
naming the ways out. A lock file (``.lock``: pid, host, start time) refuses a second live writer; the lock of a dead
process on this host is taken over with a warning, one from another host is refused with the fix named.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
# what an atomic write leaves when its process is killed mid-write (lit_llama_lab.io)
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<kind>partial|old)$")


class RunFolderError(RuntimeError):
    """A fit that may not write into its checkpoint folder; the message names the fix."""


def run_checkpoints(folder: Path) -> list[str]:
    """Names of the checkpoints in ``folder``: ``*.ckpt`` files and adapter folders (hidden names are not ours)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")
                  and (p.suffix == ".ckpt" or (p / "adapter_config.json").is_file()))


def resumes_from(folder: Path, ckpt_path: str | os.PathLike | None) -> bool:
    """Whether ``ckpt_path`` is a checkpoint inside ``folder`` (``last`` counts: it is resolved there)."""
    if ckpt_path is None:
        return False
    if str(ckpt_path) == "last":
        return True
    return Path(ckpt_path).expanduser().resolve().parent == folder.resolve()


def check_new_run(folder: Path, ckpt_path: str | os.PathLike | None, rename_hint: str) -> None:
    """Refuse a fit into ``folder`` when it holds checkpoints and the fit does not resume from one of them.

    ``rename_hint``: how to give the new run a folder of its own (a CLI option), named in the message.
    """
    found = run_checkpoints(folder)
    if not found or resumes_from(folder, ckpt_path):
        return
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    source = "" if ckpt_path is None else f" (--ckpt_path {ckpt_path} is outside it)"
    raise RunFolderError(
        f"{folder} already holds the checkpoints of another run ({shown}){source}. A new run there would mix its "
        f"files with them and `last` would no longer be this run. Either continue that run with --ckpt_path last, "
        f"start this one under a new name ({rename_hint}), or delete {folder} if you no longer need it."
    )


def no_checkpoint_message(folder: Path) -> str:
    """The error for ``--ckpt_path last`` when ``folder`` holds no ``last.ckpt``."""
    return (
        f"--ckpt_path last: there is no checkpoint to resume in {folder} (no last.ckpt there). Check the run's "
        "folder (--trainer.logger.init_args.save_dir and .name, or the checkpoint callback's dirpath), or leave out "
        "--ckpt_path to start a new run."
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_leftovers(folder: Path) -> list[str]:
    """Remove what writes killed mid-way left in ``folder`` (their process is gone); return the names removed.

    ``.NAME.PID.partial`` is an unfinished file or folder. ``.NAME.PID.old`` is the previous ``NAME`` a folder
    replacement had moved aside: it is deleted if ``NAME`` is in place, else moved back, so no checkpoint is lost.
    """
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = LEFTOVER.match(path.name)
        if not match or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        target = folder / match["name"]
        if match["kind"] == "old" and not target.exists():
            os.replace(path, target)
            log.warning("Restored %s from %s (a replacement was killed half-way).", target, path.name)
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed


class RunLock:
    """An exclusive, advisory lock on a checkpoint folder: the file ``.lock`` created with ``O_EXCL``.

    It records ``{"pid", "host", "started"}``. :meth:`acquire` raises :class:`RunFolderError` while another live
    process holds it; :meth:`release` removes it only if it is still this process's.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False
        self._record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self._record, handle)
        return True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or unreadable: treated as held

    def acquire(self) -> None:
        """Take the lock, taking over a dead local holder's; raise :class:`RunFolderError` if a live one holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                clean_leftovers(self.path.parent)  # no other writer can be here now
                return
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            if not self._take_over(holder):
                break
        raise RunFolderError(self._busy_message(self._holder() or {}))

    def _take_over(self, holder: dict) -> bool:
        """Move a dead local holder's lock aside (only if it is still that lock); False if the holder may live."""
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int) or host != socket.gethostname() or _alive(pid):
            return False
        stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return True
        moved = json.loads(stale.read_text()) if stale.is_file() else {}
        if moved != holder:  # another process replaced it between our read and the move: give it back
            if not self.path.exists():
                os.replace(stale, self.path)
            return False
        stale.unlink()
        log.warning("Took over the lock %s of process %d, which is no longer running (it was stopped, e.g. by "
                    "kill -9, before it could remove it).", self.path, pid)
        return True

    def _busy_message(self, holder: dict) -> str:
        who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        since = holder.get("started")
        when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        return (
            f"{self.path.parent} is in use: {who} writes there{when} (lock file {self.path}). Two runs writing one "
            f"folder would mix their checkpoints. Wait for it to end, or give this run another name; if that process "
            f"is gone (another host cannot be checked from here), delete {self.path}."
        )

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
