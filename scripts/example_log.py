"""Which examples each optimizer step trained on, for the resume-across-device-counts proof of issue 18 (GPU host).

As a callback (``PYTHONPATH=scripts``, ``--trainer.callbacks+=example_log.ExampleLog --trainer.callbacks.path F``)
it appends one line per training batch and rank to F: the step and a fingerprint of every example in the batch
(an md5 of its token ids; a packed row holds several examples, told apart by ``document_ids``).

    python scripts/example_log.py compare STRAIGHT.jsonl FIRST.jsonl RESUMED.jsonl

then checks that, step by step, the examples of a run stopped on one device count (FIRST, all ranks together) and
resumed on another (RESUMED) are exactly those of one run straight through (STRAIGHT), and prints where it resumed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict

import lightning as L


def fingerprints(batch: dict) -> list[str]:
    """An md5 prefix of each example's token ids in ``batch`` (packed rows split by ``document_ids``)."""
    ids = batch["input_ids"].cpu()
    docs = batch.get("document_ids")
    mask = batch.get("attention_mask")
    out = []
    for r in range(ids.shape[0]):
        if docs is not None:
            row_docs = docs[r].cpu()
            for d in sorted(set(row_docs.tolist()) - {-1}):
                out.append(hashlib.md5(ids[r][row_docs == d].numpy().tobytes()).hexdigest()[:12])
        else:
            keep = mask[r].cpu().bool() if mask is not None and mask.dim() == 2 else slice(None)
            out.append(hashlib.md5(ids[r][keep].numpy().tobytes()).hexdigest()[:12])
    return out


class ExampleLog(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"rank": trainer.global_rank, "step": trainer.global_step,
                                "examples": fingerprints(batch)}) + "\n")


class StepLog(L.Callback):
    """One line per optimizer step and rank: the step, its training loss; and at the end of training each rank's
    peak GPU memory (``torch.cuda.max_memory_allocated``) as its own line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write({"rank": trainer.global_rank, "step": trainer.global_step, "loss": float(loss)})

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        if torch.cuda.is_available():
            self._write({"rank": trainer.global_rank, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "devices": trainer.world_size, "strategy": type(trainer.strategy).__name__})


def steps(path: str) -> dict[int, list[str]]:
    """step -> sorted fingerprints over all ranks."""
    found: dict[int, list[str]] = defaultdict(list)
    for line in open(path):
        row = json.loads(line)
        found[row["step"]] += row["examples"]
    return {k: sorted(v) for k, v in found.items()}


def compare(straight: str, first: str, resumed: str) -> int:
    a, b, c = steps(straight), steps(first), steps(resumed)
    resumed_at = min(c)
    combined = {**{k: v for k, v in b.items() if k < resumed_at}, **c}  # steps after the checkpoint were redone
    same = [k for k in a if combined.get(k) == a[k]]
    print(f"straight run: {len(a)} steps; stopped run: steps {min(b)}..{max(b)} logged, resumed at step {resumed_at} "
          f"and ran {len(c)} steps; steps with the same examples as the straight run: {len(same)} of {len(a)}")
    differ = sorted(set(a) - set(same))
    if differ:
        print(f"steps that differ: {differ[:10]}")
    return 0 if not differ and combined.keys() == a.keys() else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        raise SystemExit(compare(*sys.argv[2:5]))
    raise SystemExit(__doc__)
