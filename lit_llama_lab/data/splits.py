"""Seeded train/val/test splits of a source's rows: the same rows for the same row count, fractions and seed, in
training and in every evaluation."""

from __future__ import annotations

import random


def split_indices(n: int, test_fraction: float, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Seeded train/val/test row indices (sorted within each split): the same for the same ``n`` and seed."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    picked = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: sorted(idx) for name, idx in picked.items()}


def check_fractions(test_fraction: float, val_fraction: float) -> None:
    """Raise unless both fractions are in [0, 1) and leave rows for training."""
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ValueError("test_fraction and val_fraction must be in [0, 1) and leave rows for training.")
