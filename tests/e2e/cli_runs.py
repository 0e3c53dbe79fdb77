"""Training runs through the project's CLI (``python -m lit_llama_lab.cli fit``) on ``tiny-random`` in subprocesses,
shared by the DDP and FSDP tests: one process, or several over gloo with Lightning's subprocess launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lit_llama_lab.launch import EARLY_STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH = 4, 8

CONFIG = """
seed_everything: 42
trainer:
  accelerator: cpu
  max_steps: {steps}
  gradient_clip_val: 0.05  # below every step's norm: each step is clipped, by the global norm over all processes
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lit_llama_lab.train.callbacks.AdapterCheckpoint
      init_args: {{dirpath: {dirpath}, every_n_train_steps: {steps}, monitor: null, save_top_k: 1}}
model:
  name_or_path: tiny-random
  quantize: nf4
  precision: {{compute_dtype: float32}}
  lora: {{r: 8, alpha: 16}}
  learning_rate: 1.0e-3
data:
  source: {source}
  packing: false
  test_fraction: 0
  val_fraction: 0
  max_seq_length: 64
"""


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between same-named tensors of ``a`` and ``b`` (which must share keys)."""
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def chats(path: Path, rows: int, equal: bool = True) -> Path:
    """Chats with different prompts and answers; with ``equal`` every answer has the same number of tokens, else
    answers run from 1 to 12 extra words."""
    def answer(i: int) -> str:
        return f"Item {(i * 7) % 1000:03d}." + ("" if equal else " and" + " more" * ((i * 5) % 12))

    path.write_text("\n".join(
        json.dumps({"messages": [{"role": "user", "content": f"Which item comes {'next ' * (i % 5)}after {i}?"},
                                 {"role": "assistant", "content": answer(i)}]})
        for i in range(rows)))
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: Path, source: Path, devices: int, strategy: str = "ddp", steps: int = STEPS,
          ckpt_path: Path | None = None, global_batch: bool = False, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Train ``steps`` optimizer steps of ``BATCH`` examples on ``devices`` processes (``strategy`` when more than
    one), from ``ckpt_path`` if given, with ``extra`` CLI arguments; returns the adapter weights of the ``last/`` folder. The batch is given per
    device (``--data.batch_size BATCH / devices``) or, with ``global_batch``, as ``--data.global_batch_size BATCH``."""
    run_dir.mkdir()
    config = run_dir / "config.yaml"
    config.write_text(CONFIG.format(steps=steps, dirpath=run_dir / "checkpoints", source=source))
    args = [sys.executable, "-m", "lit_llama_lab.cli", "fit", "--config", str(config),
            "--trainer.devices", str(devices)]
    args += ["--data.global_batch_size", str(BATCH)] if global_batch else ["--data.batch_size", str(BATCH // devices)]
    if devices > 1:
        args += ["--trainer.strategy", strategy]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    args += list(extra)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    work = run_dir / "cwd"  # Lightning saves its resolved config.yaml into the working directory here (no logger)
    work.mkdir()
    done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    early = f"Started ranks 1-{devices - 1} of {devices} before loading torch and Lightning" in done.stderr
    # the CLI starts this project's strategies' ranks before its imports (lit_llama_lab.launch); others: Lightning
    assert early == (devices > 1 and strategy in EARLY_STRATEGIES), done.stderr[-3000:]
    meta = json.loads((run_dir / "checkpoints" / "last" / "lit_llama_lab.json").read_text())
    assert meta["global_step"] == steps
    return load_file(run_dir / "checkpoints" / "last" / "adapter_model.safetensors")


