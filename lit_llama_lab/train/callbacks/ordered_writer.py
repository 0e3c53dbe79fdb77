"""Checkpoint writes and removals on one background thread, in order, stopping at the first failure."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class OrderedWriter:
    """Runs jobs one at a time, in the order given, on a background thread.

    A job that fails stops the rest: the jobs queued after it do nothing (no later write, and no removal of an older
    checkpoint that the failed write was to replace). Its error is raised in the caller's thread by
    :meth:`raise_errors` (the next :meth:`submit` calls it) or :meth:`wait`.
    """

    def __init__(self, name: str = "adapter-checkpoint") -> None:
        self.name = name
        self.failed = False
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: list[Future] = []

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` behind the others (after raising the error of any finished failed job)."""
        self.raise_errors()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._jobs.append(self._executor.submit(self._guarded, job))

    def _guarded(self, job: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            job()
        except BaseException:
            self.failed = True
            raise

    def raise_errors(self) -> None:
        """Re-raise the first error of a finished job (a full disk, say)."""
        for job in [j for j in self._jobs if j.done()]:
            self._jobs.remove(job)
            job.result()

    def wait(self) -> None:
        """Block until every queued job has run; re-raise the first error."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()

    def drain(self) -> None:
        """Block until every queued job has run, keeping their errors to themselves (the run fails already)."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.exception()

    def close(self) -> None:
        """Stop the thread once its jobs have run."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
