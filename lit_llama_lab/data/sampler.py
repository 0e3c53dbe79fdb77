"""A training DataLoader that resumes mid-epoch at the exact batch it stopped at.

Lightning 2.6 saves and restores the position of a train DataLoader only when the loader itself has
``state_dict``/``load_state_dict`` (fit_loop saves them under ``loops.fit_loop.state_dict.combined_loader``); a plain
``DataLoader(shuffle=True)`` restarts the epoch from its first batch, with a different order. Here the order of epoch
``e`` is ``randperm(n, seed + e)``, so it is known without replaying earlier epochs, and the loader's state is
``{epoch, batches, examples}``: the epoch, how many batches of it this rank handed out, and how many examples of the
epoch's order all ranks together consumed: the **global sample cursor**.

Under DDP each rank reads the strided slice ``order[rank::world_size]`` of the same epoch permutation (padded, like
``DistributedSampler``, so every rank gets the same number of batches); rank and world size are read from
``torch.distributed`` when iterating. After ``k`` steps of ``batch_size`` on ``world_size`` ranks the strided
slices have together consumed exactly ``order[:k * batch_size * world_size]``, so a run stopped mid-epoch resumes on
any number of processes (and any batch size) at that cursor: the remaining examples, in the same order, shared
among the new ranks. The sampler subclasses ``DistributedSampler`` only so that Lightning sees it
already shards and does not replace it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes, ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSeededSampler(DistributedSampler):
    """Indices ``0..n-1``, shuffled by ``torch.randperm`` seeded with ``seed + epoch`` (or in order), from ``start``.

    Under ``torch.distributed`` this rank's share: ``order[cursor:][rank::world_size]``, the rest of the order
    padded (with the order's first indices) to a multiple of the world size. Lightning calls :meth:`set_epoch` before
    each epoch. ``cursor`` (examples of the epoch's order already consumed by all ranks) applies to the next
    iteration only.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:  # noqa: D107
        # DistributedSampler.__init__ is skipped on purpose: it fixes rank and world size at construction.
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.epoch = 0
        self.cursor = 0

    @property
    def rank(self) -> int:  # DistributedSampler's attributes, live
        return rank_and_world_size()[0]

    @property
    def num_replicas(self) -> int:
        return rank_and_world_size()[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The full order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.length))
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def shard(self, epoch: int, cursor: int = 0) -> list[int]:
        """This rank's indices of ``epoch`` after the first ``cursor`` examples of its order: every
        ``world_size``-th of the padded rest, from ``rank``."""
        rank, world_size = rank_and_world_size()
        order = self.order(epoch)
        rest = order[cursor:]
        if world_size > 1 and rest:
            total = -(-len(rest) // world_size) * world_size
            rest = (rest + order * (total // len(order) + 1))[:total]
        return rest[rank::world_size]

    def __iter__(self) -> Iterator[int]:
        cursor, self.cursor = self.cursor, 0
        yield from self.shard(self.epoch, cursor)

    def __len__(self) -> int:
        return -(-self.length // rank_and_world_size()[1])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position (epoch, batches handed out) Lightning checkpoints and restores.

    Args:
        dataset: a sized dataset (a list of examples is fine).
        batch_size: examples per batch.
        shuffle: a seeded permutation per epoch; otherwise dataset order.
        seed: the permutation of epoch ``e`` is drawn from ``seed + e``.
        **kwargs: passed to :class:`torch.utils.data.DataLoader` (``collate_fn``, ``num_workers``, ...), except
            ``sampler``/``batch_sampler``/``generator``, which this class owns.
    """

    def __init__(self, dataset: Sized, batch_size: int = 1, shuffle: bool = True, seed: int = 0, **kwargs: Any) -> None:
        taken = {"sampler", "batch_sampler", "generator"} & {k for k, v in kwargs.items() if v is not None}
        if taken:
            raise ValueError(f"ResumableDataLoader makes its own sampler; do not pass {sorted(taken)}.")
        kwargs = {k: v for k, v in kwargs.items() if k not in {"sampler", "batch_sampler", "generator"}}
        self.seed, self.shuffle = seed, shuffle
        super().__init__(dataset, batch_size=batch_size, sampler=EpochSeededSampler(len(dataset), seed, shuffle),
                         **kwargs)
        self._batches = 0  # batches of the current epoch handed out by this rank
        self._cursor = 0  # examples of the current epoch's order consumed by all ranks together
        self._resume: tuple[int, int] | None = None  # (epoch, cursor)

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, after Lightning's set_epoch.
        sampler: EpochSeededSampler = self.sampler
        world_size = rank_and_world_size()[1]
        cursor = 0
        if self._resume is not None and self._resume[0] == sampler.epoch:
            cursor = min(self._resume[1], sampler.length)
        self._resume = None
        sampler.cursor = cursor
        step = self.batch_size * world_size  # examples of the order all ranks consume per batch
        self._cursor, self._batches = cursor, -(-cursor // step)
        for batch in super().__iter__():
            self._batches += 1
            self._cursor = min(self._cursor + step, sampler.length)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch being read, this rank's batches of it handed out, and the global cursor (``examples``)."""
        return {"epoch": self.sampler.epoch, "batches": self._batches, "examples": self._cursor, "seed": self.seed,
                "world_size": rank_and_world_size()[1], "batch_size": self.batch_size, "epoch_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue epoch ``state['epoch']`` after the examples of its order that were consumed: on any number of
        processes and with any batch size, the remaining examples in the same order."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"The checkpoint's data order was drawn with seed {state['seed']}, this run uses {self.seed}: "
                "resume with the same --data.seed, or start a new run."
            )
        batches = state["batches"]
        if batches and batches >= state.get("epoch_batches", batches + 1):
            cursor = sys.maxsize  # the epoch was read to its end: skip all of it
        else:
            saved_world, world = state.get("world_size", 1), rank_and_world_size()[1]
            saved_step = state.get("batch_size", self.batch_size) * saved_world
            step = self.batch_size * world
            if batches and saved_step != step:  # a checkpoint without batch_size: differs when the process counts do
                # Lightning restores its step counters in batches: only a resume with the same examples per step
                # continues the epoch where it stopped
                raise ValueError(
                    f"The checkpoint stopped mid-epoch at {saved_step} examples per step ({saved_step // saved_world} "
                    f"on each of {saved_world} process(es)); this run takes {step} ({self.batch_size} on each of "
                    f"{world}). Resume with the same examples per step: --data.global_batch_size {saved_step} does it "
                    "on any number of devices (or the same devices and --data.batch_size), or resume from a "
                    "checkpoint written at an epoch end."
                )
            cursor = state.get("examples", batches * saved_step)  # before the cursor: batches of the strided share
        self.sampler.set_epoch(state["epoch"])
        self._resume = (state["epoch"], cursor)
