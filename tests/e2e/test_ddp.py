"""DDP: 2 CPU processes (gloo) train the same adapter as 1 process with the combined batch.

Both runs are the project's CLI (``python -m lit_llama_lab.cli fit``) on ``tiny-random`` (NF4 base, float32
compute), 4 optimizer steps of 8 examples: one process with ``batch_size 8``, or two processes with ``batch_size 4``
each (Lightning's subprocess launcher starts the second). ResumableDataLoader gives rank ``r`` the strided slice
``order[r::2]`` of the same epoch permutation, so each step's two shards together are the one process's batch.

Why the weights should agree: DDP averages the per-rank gradients, and each rank's loss is the mean over *its*
labelled tokens. The mean of two shard means equals the mean over all labelled tokens only when the shards hold equal
numbers of labelled tokens, so every answer here tokenizes to the same length ("Item 017." — SmolLM2's tokenizer
splits digits one by one); the test checks that premise. Then the two runs differ only in float32 rounding (the
order of sums in the all-reduce and in the batch mean, the padded row lengths), ~1e-7 relative in the gradients.
AdamW's first steps divide by sqrt(v), which keeps such relative differences relative, so after 4 steps at lr 1e-3
the weights agree to far better than ``atol=1e-5`` (measured: max |diff| 9.7e-8 since training turns off bitsandbytes' CPU repacking; 8.9e-8 before); a wrong shard (both ranks
reading the same rows, measured) moves them by 6.4e-3, 600x the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.e2e.cli_runs import BATCH, STEPS, free_port, max_difference, train


def _shard_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from lit_llama_lab.data.sampler import ResumableDataLoader

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loader = ResumableDataLoader(list(range(7)), batch_size=2, seed=3, collate_fn=list)
        loader.sampler.set_epoch(1)
        Path(out, f"{rank}.json").write_text(json.dumps({"batches": list(loader), "len": len(loader)}))
    finally:
        dist.destroy_process_group()


def test_ranks_read_disjoint_strided_shards_of_one_epoch_order(tmp_path: Path) -> None:
    """7 rows on 2 gloo ranks: 4 each (one row repeated, as DistributedSampler pads), together the epoch order."""
    from lit_llama_lab.data.sampler import EpochSeededSampler

    torch.multiprocessing.spawn(_shard_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["len"] for r in ranks] == [2, 2]
    shards = [sum(r["batches"], []) for r in ranks]
    order = EpochSeededSampler(7, seed=3).order(1)
    padded = order + order[:1]
    assert shards == [padded[0::2], padded[1::2]]
    assert sorted(shards[0] + shards[1]) == sorted(list(range(7)) + order[:1])


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process_with_the_combined_batch(tmp_path: Path, one_process_run) -> None:
    _, source, one = one_process_run
    two = train(tmp_path / "ddp", source, devices=2)
    start = {k: v for k, v in one.items() if "lora_B" in k}
    assert all(v.abs().max() > 1e-4 for v in start.values()), "the adapters did not train (lora_B still zero)"
    worst = max_difference(one, two)
    print(f"max |one process - DDP| over adapter weights: {worst:.3g} ({STEPS} steps of {BATCH})")
    assert worst < 1e-5
