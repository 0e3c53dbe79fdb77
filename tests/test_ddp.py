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
the weights agree to far better than ``atol=1e-5`` (measured: max |diff| 8.9e-8); a wrong shard (both ranks
reading the same rows, measured) moves them by 6.4e-3, 600x the tolerance.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 4, 8

CONFIG = """
seed_everything: 42
trainer:
  accelerator: cpu
  max_steps: {steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: callbacks.AdapterCheckpoint
      init_args: {{dirpath: {dirpath}, every_n_train_steps: {steps}, monitor: null, save_top_k: 1}}
model:
  name_or_path: tiny-random
  quantize: nf4
  compute_dtype: float32
  lora: {{r: 8, alpha: 16}}
  learning_rate: 1.0e-3
data:
  source: {source}
  packing: false
  test_fraction: 0
  val_fraction: 0
  max_seq_length: 64
"""


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


def chats(path: Path, rows: int) -> Path:
    """Chats whose answers all have the same number of tokens, with different prompts and answers."""
    path.write_text("\n".join(
        json.dumps({"messages": [{"role": "user", "content": f"Which item comes {'next ' * (i % 5)}after {i}?"},
                                 {"role": "assistant", "content": f"Item {(i * 7) % 1000:03d}."}]})
        for i in range(rows)))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: Path, source: Path, devices: int) -> dict[str, torch.Tensor]:
    run_dir.mkdir()
    config = run_dir / "config.yaml"
    config.write_text(CONFIG.format(steps=STEPS, dirpath=run_dir / "checkpoints", source=source))
    args = [sys.executable, "-m", "lit_llama_lab.cli", "fit", "--config", str(config),
            "--trainer.devices", str(devices), "--data.batch_size", str(BATCH // devices)]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    work = run_dir / "cwd"  # Lightning saves its resolved config.yaml into the working directory here (no logger)
    work.mkdir()
    done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    meta = json.loads((run_dir / "checkpoints" / "last" / "lit_llama_lab.json").read_text())
    assert meta["global_step"] == STEPS
    return load_file(run_dir / "checkpoints" / "last" / "adapter_model.safetensors")


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process_with_the_combined_batch(tmp_path: Path) -> None:
    from lit_llama_lab.data.datamodule import ChatDataModule

    source = chats(tmp_path / "chats.jsonl", STEPS * BATCH)
    data = ChatDataModule(source=str(source), tokenizer="tiny-random", packing=False, test_fraction=0,
                          val_fraction=0, max_seq_length=64, cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    labelled = {sum(label != -100 for label in row["labels"]) for row in data.splits["train"]}
    assert len(labelled) == 1, f"the premise fails: answers of {sorted(labelled)} labelled tokens"

    one = train(tmp_path / "one", source, devices=1)
    two = train(tmp_path / "ddp", source, devices=2)
    assert one.keys() == two.keys() and one
    start = {k: v for k, v in one.items() if "lora_B" in k}
    assert all(v.abs().max() > 1e-4 for v in start.values()), "the adapters did not train (lora_B still zero)"
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"max |one process - DDP| over adapter weights: {worst:.3g}")
    assert worst < 1e-5
