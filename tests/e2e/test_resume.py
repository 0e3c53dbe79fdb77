"""Fault tests: SIGKILL a real training process (mid-epoch; mid-checkpoint-write), stop it with SIGTERM, fail a
checkpoint write as a full disk does; resume with --ckpt_path last, and end with the same step and bit-identical
adapter weights as an uninterrupted run.

The training process is this file run as a script: the project's LabCLI with configs/debug.yaml, 3 epochs of
4 batches (12 optimizer steps), a checkpoint every 3 steps (so every resume point is inside an epoch;
see the README's note on epoch-end checkpoints). Its train loader is
ResumableDataLoader (until ChatDataModule uses it itself, a two-line subclass below swaps it in).

Tolerance: none (``torch.equal``). On one CPU the same float32 ops on the same data in the same order give the
same bits; resume restores adapter weights, AdamW moments and step counts exactly, the warmup schedule is a function
of the global step, LoRA dropout is 0, and the data order of each epoch is a function of the seed and the epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 4
CALLBACKS = """
trainer:
  callbacks:
    - class_path: lit_llama_lab.train.callbacks.WarmupSchedule
      init_args: {{warmup_steps: 2, decay: cosine}}
    - class_path: lit_llama_lab.train.callbacks.AdapterCheckpoint
      init_args: {{dirpath: {dirpath}, every_n_train_steps: 3, every_n_epochs: 0, save_top_k: 1}}
"""


def train_args(run_dir: Path, resume: bool) -> list[str]:
    extra = run_dir / "callbacks.yaml"
    extra.write_text(CALLBACKS.format(dirpath=run_dir / "checkpoints"))
    data = run_dir / "chats.jsonl"  # 60 short chats: tokenized in no time, unlike the 4k-row emoji set
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                                       {"role": "assistant", "content": " ".join(map(str, range(i)))}]})
                              for i in range(1, 61)))
    args = ["fit", "--config", str(ROOT / "configs/debug.yaml"), "--config", str(extra), "--data.source", str(data),
            "--data.test_fraction", "0", "--data.val_fraction", "0.1",
            "--trainer.max_steps", "12", "--trainer.limit_train_batches", str(STEPS_PER_EPOCH),
            "--trainer.val_check_interval", "1.0", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(run_dir / "logs")]
    return args + (["--ckpt_path", "last"] if resume else [])


def start(run_dir: Path, resume: bool = False, slow_save_at: int | None = None, log_name: str | None = None,
          **faults: int) -> subprocess.Popen:
    """Start the training process; ``faults``: ``fail_save_at`` / ``sigterm_at`` (a step), see :func:`main`."""
    env = dict(os.environ, LLL_SLOW_SAVE_AT=str(slow_save_at or ""), PYTHONPATH=str(ROOT),
               **{f"LLL_{k.upper()}": str(v) for k, v in faults.items()})
    log = open(run_dir / (log_name or ("resume.log" if resume else "train.log")), "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, __file__, *train_args(run_dir, resume)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 300) -> None:
    log = run_dir / ("resume.log" if "last" in process.args else "train.log")
    assert process.wait(timeout) == 0, log.read_text()[-3000:]


def read_ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the training process ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.05)


def last_step(run_dir: Path) -> int | None:
    meta = run_dir / "checkpoints" / "last" / "lit_llama_lab.json"
    try:
        return json.loads(meta.read_text())["global_step"] if (run_dir / "checkpoints/last.ckpt").exists() else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def assert_same_end(resumed: Path, reference: Path) -> None:
    a, b = read_ckpt(resumed / "checkpoints/last.ckpt"), read_ckpt(reference / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 12 and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer_states"][0]["param_groups"][0]["lr"] == b["optimizer_states"][0]["param_groups"][0]["lr"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference")
    finish(start(run_dir), run_dir)
    return run_dir


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, reference):
    process = start(tmp_path)
    wait_for(lambda: last_step(tmp_path) == 6, process)  # step 6 = batch 2 of epoch 1
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = read_ckpt(tmp_path / "checkpoints/last.ckpt")
    assert state["global_step"] % STEPS_PER_EPOCH != 0  # the resume point is inside an epoch
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["epoch"] == state["global_step"] // STEPS_PER_EPOCH
    assert loader_state["batches"] == state["global_step"] % STEPS_PER_EPOCH

    finish(start(tmp_path, resume=True), tmp_path)
    assert f"Restoring states from the checkpoint path at {tmp_path / 'checkpoints'}" in (
        tmp_path / "resume.log").read_text().replace("\n", "")
    assert_same_end(tmp_path, reference)


def test_sigkill_during_checkpoint_write_resumes_from_previous_and_locks_out_a_second_writer(tmp_path, reference):
    process = start(tmp_path, slow_save_at=9)
    marker = tmp_path / "checkpoints" / "WRITING"
    wait_for(marker.exists, process)
    lock = json.loads((tmp_path / "checkpoints" / ".lock").read_text())
    assert lock["pid"] == process.pid
    second = start(tmp_path, resume=True, log_name="second.log")  # the same run, resumed while it still writes
    assert second.wait(300) != 0
    assert f"process {process.pid} on host" in (tmp_path / "second.log").read_text().replace("\n", "")
    process.send_signal(signal.SIGKILL)
    process.wait()

    files = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    partial = [n for n in files if n.endswith(".partial")]
    # the write in flight is step 9's top-k file, or the one replacing last.ckpt if step 9 is not among the best
    assert len(partial) == 1 and partial[0].startswith((".last.ckpt.", ".epoch=2-step=9.ckpt.")), files
    assert "epoch=2-step=9.ckpt" not in files  # a half-written file never gets a checkpoint's name
    with pytest.raises(Exception):  # noqa: B017 (any unpickling error): it is indeed truncated
        read_ckpt(tmp_path / "checkpoints" / partial[0])
    assert read_ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == 6  # the previous one, intact
    assert json.loads((tmp_path / "checkpoints/last/lit_llama_lab.json").read_text())["global_step"] == 6

    finish(start(tmp_path, resume=True), tmp_path)
    assert "Took over the lock" in (tmp_path / "resume.log").read_text()  # the killed process's, left behind
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if p.endswith(".partial") or p == ".lock"]
    assert_same_end(tmp_path, reference)


def test_sigterm_saves_last_then_exits_nonzero_and_resumes_exactly(tmp_path, reference):
    """A scheduler's stop: ``last`` is written at the step the signal came (5, between the scheduled 3 and 6), the
    exit status says the run did not finish, and the resume ends as the uninterrupted run."""
    assert start(tmp_path, sigterm_at=5).wait(300) == 143, (tmp_path / "train.log").read_text()[-3000:]
    assert read_ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == 5
    assert json.loads((tmp_path / "checkpoints/last/lit_llama_lab.json").read_text())["global_step"] == 5
    assert not (tmp_path / "checkpoints" / ".lock").exists()
    finish(start(tmp_path, resume=True), tmp_path)
    assert_same_end(tmp_path, reference)


def test_failed_checkpoint_write_leaves_no_partial_and_keeps_last(tmp_path):
    """A full disk at step 9 (the first checkpoint is step 6's: step 3's waits for a validation score): the run fails
    with the checkpoint and the fix named; the half-written file is gone, no older checkpoint was removed for the one
    that failed, and ``last`` is step 6's, whole."""
    process = start(tmp_path, fail_save_at=9)
    assert process.wait(300) != 0
    log = (tmp_path / "train.log").read_text()
    assert "Could not write the checkpoint" in log and "No space left on device" in log and "--ckpt_path last" in log
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert not [n for n in names if n.startswith(".")], names  # no partial file or folder, no lock
    assert names == ["epoch=1-step=6", "epoch=1-step=6.ckpt", "last", "last.ckpt"], names
    assert read_ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == 6
    assert json.loads((tmp_path / "checkpoints/last/lit_llama_lab.json").read_text())["global_step"] == 6


def main() -> None:
    """The training process: LabCLI with a resumable train loader and, on request, a checkpoint write that stalls
    halfway (``LLL_SLOW_SAVE_AT=<step>``) so the test can kill it mid-write, writes that fail halfway as on a full
    disk (``LLL_FAIL_SAVE_AT=<step>``), or a SIGTERM to itself while it trains that step (``LLL_SIGTERM_AT``)."""
    import errno
    import signal

    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lit_llama_lab.cli import LabCLI
    from lit_llama_lab.data.datamodule import ChatDataModule
    from lit_llama_lab.data.sampler import ResumableDataLoader
    from lit_llama_lab.train.module import QLoRAModule

    class ResumableChatData(ChatDataModule):
        def train_dataloader(self):
            loader = super().train_dataloader()
            if isinstance(loader, ResumableDataLoader):
                return loader
            return ResumableDataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True,
                                       seed=self.hparams.seed, collate_fn=loader.collate_fn)

    class HalfWriteCheckpointIO(TorchCheckpointIO):
        """Writes the checkpoint of step ``at`` only halfway (flushed to disk), then :meth:`after_half_write`."""

        def __init__(self, at: int) -> None:
            self.at = at

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            if checkpoint["global_step"] != self.at:
                return super().save_checkpoint(checkpoint, path, storage_options)
            import io

            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
            self.after_half_write(Path(path))

        def after_half_write(self, path: Path) -> None:
            raise NotImplementedError

    class StallingCheckpointIO(HalfWriteCheckpointIO):
        """Writes half the bytes of the checkpoint of step ``at``, flags it, and stalls there."""

        def after_half_write(self, path: Path) -> None:
            (path.parent / "WRITING").touch()
            time.sleep(600)

    class FullDiskCheckpointIO(HalfWriteCheckpointIO):
        """Writes of step ``at`` stop halfway with ENOSPC, as on a full disk."""

        def after_half_write(self, path: Path) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    class SigtermAt(Callback):
        """Sends this process SIGTERM while it trains optimizer step ``at`` (1-based), as a scheduler would."""

        def __init__(self, at: int) -> None:
            self.at = at

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == self.at - 1:
                os.kill(os.getpid(), signal.SIGTERM)

    slow, full, stop = (os.environ.get(f"LLL_{k}") for k in ("SLOW_SAVE_AT", "FAIL_SAVE_AT", "SIGTERM_AT"))
    defaults = {"plugins": [StallingCheckpointIO(int(slow))]} if slow else {}
    if full:
        defaults["plugins"] = [FullDiskCheckpointIO(int(full))]
    if stop:
        defaults["callbacks"] = [SigtermAt(int(stop))]
    LabCLI(QLoRAModule, ResumableChatData, args=sys.argv[1:], trainer_defaults=defaults,
           save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
