"""One emoji experiment in one process: train with LightningCLI arguments, time where the fit's wall time goes, then
measure name accuracy.

    python scripts/emoji_experiment.py OUT.json fit --config configs/emoji.yaml [overrides...]

Used for GPU runs; `lit-llama-lab evaluate` is the tool for reports. Under DDP (Lightning's launcher re-runs this
script for rank 1..N-1; torchrun starts every rank) each rank writes ``OUT.json.rank<R>``, with ``marks``: seconds
from the launch (``LAUNCH_T0``, epoch seconds set by the shell: ``LAUNCH_T0=$(date +%s.%N)``; else this script's
start) to the end of imports, the CLI built, the data set up, ``fit`` started, the first batch, the last batch and
``fit`` returned: where each rank spends the time outside the steps. EVAL_LIMIT=N evaluates N rows per split.
PROFILE_STEPS=A:B traces training batches A..B with torch.profiler and prints how busy the GPU was in that window
and which host calls waited for it.
"""

import json
import os
import sys
import time

IMPORT_T0 = time.time()  # before the heavy imports below

from lit_llama_lab.launch import start_ranks_early  # noqa: E402  (standard library and PyYAML only)

start_ranks_early(sys.argv[2:])  # a multi-GPU fit's other ranks, before the imports, as `lit-llama-lab fit` does

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_llama_lab.cli import LabCLI  # noqa: E402
from lit_llama_lab.data.datamodule import ChatDataModule  # noqa: E402
from lit_llama_lab.generation import generate  # noqa: E402
from lit_llama_lab.tasks.emoji.rows import HELDOUT_WORDINGS, TRAIN_WORDINGS  # noqa: E402
from lit_llama_lab.train.callbacks import AdapterCheckpoint, SampleGenerations  # noqa: E402
from lit_llama_lab.train.module import QLoRAModule  # noqa: E402


class PhaseTimer(L.Callback):
    """Wall seconds spent in training batches (step + batch-end callbacks), in validation (sample generations and
    checkpoint writes at its end included), in the first batch of each new shape (CUDA graph captures happen there),
    before the first batch (model load, sanity check) and after the last epoch. Batches are timed on the host
    without a sync, so GPU work lands wherever the host next waits for it. :func:`time_calls` adds the time of
    single methods (model load, sample tables, checkpoint writes) under their own keys."""

    def __init__(self) -> None:
        self.seconds = {"train_batches": 0.0, "validation": 0.0, "first_batches": 0.0, "sanity_check": 0.0}
        self.shapes: set = set()
        self.t = 0.0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # no sync here: it would slow the steps
        self.t = time.perf_counter()
        self.new_shape = tuple(batch["input_ids"].shape) not in self.shapes
        self.shapes.add(tuple(batch["input_ids"].shape))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds["first_batches" if self.new_shape else "train_batches"] += time.perf_counter() - self.t

    def on_validation_start(self, trainer, pl_module):
        self._sync(pl_module)
        self.v = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):  # runs before the other callbacks' on_validation_end
        self._sync(pl_module)
        self.seconds["sanity_check" if trainer.sanity_checking else "validation"] += time.perf_counter() - self.v

    def on_train_start(self, trainer, pl_module):
        self.seconds["before_first_batch"] = time.perf_counter() - self.fit_start
        mark("first_batch")

    def on_train_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.train_end = time.perf_counter()
        mark("last_batch")


class StepWindowProfile(L.Callback):
    """torch.profiler over training batches ``first``..``last``: wall time of the window, GPU kernel time (the union
    of kernel intervals), and the host calls that wait for the GPU (synchronizations, copies to the host)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.prof = first, last, None
        self.summary: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.prof is None or self.summary or trainer.global_step < self.last:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        events = self.prof.events()
        spans = sorted((e.time_range.start, e.time_range.end) for e in events
                       if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
        busy, end = 0.0, -1.0
        for a, b in spans:
            if b > end:
                busy += b - max(a, end)
                end = b
        waits = {}
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CPU and any(
                    w in e.name for w in ("Synchronize", "cudaMemcpy", "item", "aten::_local_scalar_dense")):
                n, t = waits.get(e.name, (0, 0.0))
                waits[e.name] = (n + 1, t + e.cpu_time_total / 1e6)
        steps = self.last - self.first
        self.summary = {"steps": steps, "wall_ms_per_step": wall / steps * 1000,
                        "gpu_busy_ms_per_step": busy / 1000 / steps, "kernels_per_step": len(spans) / steps,
                        "waits": {k: v for k, v in sorted(waits.items(), key=lambda kv: -kv[1][1])[:12]}}
        top = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(json.dumps(self.summary, indent=1), "\n", top, flush=True)


LAUNCH_T0 = float(os.environ.get("LAUNCH_T0", IMPORT_T0))
MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    """Seconds from the launch to now, under ``name``."""
    MARKS[name] = round(time.time() - LAUNCH_T0, 3)


def time_calls(timer: PhaseTimer, owner, name: str, key: str) -> None:
    """Add the wall time of every call of ``owner.name`` (synchronized on a GPU) to ``timer.seconds[key]``."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timer.seconds[key] = timer.seconds.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)


def accuracy(model, tok, rows, wordings, batch_size=128):
    chats = [[{"role": "user", "content": wordings[i % len(wordings)].format(e=r["character"])}] for i, r in enumerate(rows)]
    answers = generate(model, tok, chats, max_new_tokens=40, batch_size=batch_size)
    hits = [r["short description"].lower() in a.text.lower() for r, a in zip(rows, answers, strict=True)]
    shown = {r["character"]: a.text for r, a in zip(rows, answers, strict=True) if r["character"] in "🐼🇺🇸🎂🤌"}
    return {"n": len(rows), "name_acc": sum(hits) / len(rows), "eos": sum(a.stopped for a in answers) / len(rows),
            "mean_tokens": sum(len(a.token_ids) for a in answers) / len(rows), "examples": shown}


def main():
    MARKS["script_start"] = round(IMPORT_T0 - LAUNCH_T0, 3)
    mark("imports_done")
    out, args = sys.argv[1], sys.argv[2:]
    cli = LabCLI(QLoRAModule, ChatDataModule, args=args[1:], run=False)
    mark("cli_built")
    data, module = cli.datamodule, cli.model
    setup_start = time.perf_counter()
    data.setup("fit")  # tokenizing, and with --data.replay.ratio the replay answers (generated once, then cached)
    setup_seconds = time.perf_counter() - setup_start
    mark("data_set_up")
    epoch_tokens = sum(len(e["input_ids"]) for e in data.splits["train"])
    timer = PhaseTimer()
    cli.trainer.callbacks.insert(0, timer)  # first: its validation end is timed before samples and checkpoints
    window = os.environ.get("PROFILE_STEPS")
    profiler = StepWindowProfile(*map(int, window.split(":"))) if window and torch.cuda.is_available() else None
    if profiler:
        cli.trainer.callbacks.append(profiler)
    time_calls(timer, QLoRAModule, "configure_model", "model_load")
    time_calls(timer, SampleGenerations, "on_validation_end", "sample_tables")
    time_calls(timer, AdapterCheckpoint, "_save_checkpoint", "checkpoint_writes")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = timer.fit_start = time.perf_counter()
    mark("fit_start")
    cli.trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    mark("fit_returned")
    rank = cli.trainer.global_rank
    if cli.trainer.world_size > 1:
        out = f"{out}.rank{rank}"
    timer.seconds["after_train_end"] = time.perf_counter() - timer.train_end
    tokens = epoch_tokens * max(1, cli.trainer.current_epoch)
    result = {"args": args, "epochs": cli.trainer.current_epoch, "steps": cli.trainer.global_step,
              "train_seconds": seconds, "data_setup_seconds": setup_seconds, "phases": timer.seconds, "batch_shapes": len(timer.shapes),
              "train_tokens": tokens, "tokens_per_s": tokens / seconds,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
              "val_loss": float(cli.trainer.callback_metrics.get("val_loss", float("nan"))),
              "profile": profiler.summary if profiler else None, "rank": rank, "marks": MARKS}
    print(json.dumps(result, indent=1), flush=True)
    model, tok = module.model, module.tokenizer
    limit = int(os.environ.get("EVAL_LIMIT", "100000"))
    if limit > 0 and rank == 0:
        train, test = (list(data.rows[s])[:limit] for s in ("train", "test"))
        result["train"] = accuracy(model, tok, train, TRAIN_WORDINGS[:1])
        result["test"] = accuracy(model, tok, test, TRAIN_WORDINGS[:1])
        result["train_heldout_wording"] = accuracy(model, tok, train, HELDOUT_WORDINGS)
    with open(out, "w") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
