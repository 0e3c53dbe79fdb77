"""A training DataLoader that resumes mid-epoch at the exact batch it stopped at.

Lightning 2.6 saves and restores the position of a train DataLoader only when the loader itself has
``state_dict``/``load_state_dict`` (fit_loop saves them under ``loops.fit_loop.state_dict.combined_loader``); a plain
``DataLoader(shuffle=True)`` restarts the epoch from its first batch, with a different order. Here the order of epoch
``e`` is ``randperm(n, seed + e)``, so it is known without replaying earlier epochs, and the loader's state is
``{epoch, batches}``: the epoch and how many batches of it were handed out.

Under DDP each rank reads the strided slice ``order[rank::world_size]`` of the same epoch permutation (padded, like
``DistributedSampler``, so every rank gets the same number of batches); rank and world size are read from
``torch.distributed`` when iterating. The sampler subclasses ``DistributedSampler`` only so that Lightning sees it
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

    Under ``torch.distributed`` this rank's share: ``order[rank::world_size]`` of the order padded (from its start)
    to a multiple of the world size. Lightning calls :meth:`set_epoch` before each epoch. ``start`` (a position in
    this rank's share) applies to the next iteration only.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:  # noqa: D107
        # DistributedSampler.__init__ is skipped on purpose: it fixes rank and world size at construction.
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.epoch = 0
        self.start = 0

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

    def shard(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``: every ``world_size``-th of the padded order, from ``rank``."""
        rank, world_size = rank_and_world_size()
        order = self.order(epoch)
        if world_size > 1 and order:
            total = len(self) * world_size
            order = (order * (total // len(order) + 1))[:total]
        return order[rank::world_size]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.shard(self.epoch)[start:]

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
        self._batches = 0  # batches of the current epoch handed out
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, after Lightning's set_epoch.
        sampler: EpochSeededSampler = self.sampler
        skip = 0
        if self._resume is not None and self._resume[0] == sampler.epoch:
            skip = min(self._resume[1], len(self))
        self._resume = None
        sampler.start = skip * self.batch_size
        self._batches = skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the epoch being read and how many of its batches were handed out."""
        return {"epoch": self.sampler.epoch, "batches": self._batches, "seed": self.seed,
                "world_size": rank_and_world_size()[1], "epoch_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue epoch ``state['epoch']`` after its first ``state['batches']`` batches."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"The checkpoint's data order was drawn with seed {state['seed']}, this run uses {self.seed}: "
                "resume with the same --data.seed, or start a new run."
            )
        saved, now = state.get("world_size", 1), rank_and_world_size()[1]
        batches = state["batches"]
        if batches and batches >= state.get("epoch_batches", batches + 1):
            batches = sys.maxsize  # the epoch was read to its end: skip all of it, whatever the number of processes
        elif saved != now and batches:
            raise ValueError(
                f"The checkpoint stopped mid-epoch with {saved} process(es), this run has {now}: each process's "
                "position in the epoch depends on the number of processes. Resume with the same number of devices "
                "and nodes, or start a new run from the checkpoint's adapter folder."
            )
        self.sampler.set_epoch(state["epoch"])
        self._resume = (state["epoch"], batches)
