"""A run folder belongs to one run, and a resume honours its checkpoint: real `fit` processes on the debug config.

One short run (3 of 4 batches of an epoch, so its `last` is mid-epoch) is made once; each test works on a copy.
Refusals happen before anything is written, so each refused process is cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_llama_lab.train.callbacks import WarmupSchedule

ROOT = Path(__file__).resolve().parents[2]
EXTRA = """
trainer:
  max_steps: 3
  limit_train_batches: 4
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lit_llama_lab.train.callbacks.WarmupSchedule
      init_args: {warmup_steps: 2, decay: cosine}
    - class_path: lit_llama_lab.train.callbacks.AdapterCheckpoint
      init_args: {every_n_train_steps: 2, monitor: null, save_top_k: 1}
data:
  test_fraction: 0
  val_fraction: 0
"""


def fit(save_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``lit-llama-lab fit`` on the debug config with checkpoints in ``save_dir/debug/checkpoints``."""
    setup = save_dir.parent / "setup"
    cmd = [sys.executable, "-m", "lit_llama_lab.cli", "fit", "--config", str(ROOT / "configs/debug.yaml"),
           "--config", str(setup / "extra.yaml"), "--data.source", str(setup / "chats.jsonl"),
           "--trainer.logger.init_args.save_dir", str(save_dir), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=save_dir.parent, env=env, capture_output=True, text=True, timeout=300)


def prepare(root: Path) -> Path:
    """The config and the data of these runs under ``root/setup``; returns ``root/runs``."""
    setup = root / "setup"
    setup.mkdir(parents=True, exist_ok=True)
    (setup / "extra.yaml").write_text(EXTRA)
    (setup / "chats.jsonl").write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": " ".join(map(str, range(i)))}]})
        for i in range(1, 41)))
    return root / "runs"


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """A finished run: 3 steps, a checkpoint every 2, so `last` (step 3) is written only because the run ends there,
    inside its first epoch (3 of 4 batches). Returns its root (setup/ and runs/)."""
    root = tmp_path_factory.mktemp("first")
    done = fit(prepare(root))
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture
def run(first_run, tmp_path) -> Path:
    """A copy of the first run's root; returns its ``runs`` folder."""
    shutil.copytree(first_run, tmp_path / "root")
    return tmp_path / "root" / "runs"


def test_last_is_the_final_step_even_off_the_save_schedule(first_run):
    folder = first_run / "runs/debug/checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3
    assert json.loads((folder / "last/lit_llama_lab.json").read_text())["global_step"] == 3
    assert sorted(os.listdir(folder)) == ["epoch=0-step=2", "epoch=0-step=2.ckpt", "last", "last.ckpt"]


def test_a_new_fit_into_another_runs_folder_is_refused_before_training(run):
    before = snapshot(run)
    done = fit(run, "--model.lora.r", "4")
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert "already holds the checkpoints of another run" in message
    for way_out in ("--ckpt_path last", "--trainer.logger.init_args.name NAME", f"delete {run / 'debug/checkpoints'}"):
        assert way_out in message
    assert snapshot(run) == before  # nothing written: no -v1 checkpoint, no new log version, `last` untouched


def test_ckpt_path_last_without_a_checkpoint_names_the_folder(tmp_path):
    prepare(tmp_path)
    typo = tmp_path / "typo"
    done = fit(typo, "--ckpt_path", "last")
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert f"no checkpoint to resume in {typo / 'debug/checkpoints'}" in message
    assert not (typo / "debug" / "checkpoints").exists()  # it did not train from step 0 instead


def test_resume_refuses_settings_its_saved_state_cannot_honour(run):
    before = snapshot(run / "debug" / "checkpoints")
    done = fit(run, "--ckpt_path", "last", "--model.lora.r", "4", "--model.lora.alpha", "128",
               "--model.lora.target_modules", "[q_proj,v_proj]", "--data.batch_size", "16", "--data.seed", "7")
    assert done.returncode != 0
    message = done.stderr
    assert "--model.lora.r: the checkpoint has 8, this run asks for 4" in message
    assert "--model.lora.alpha: the checkpoint has 16, this run asks for 128" in message
    assert "--model.lora.target_modules: the checkpoint has ['q_proj'" in message
    assert "this run asks for ['q_proj', 'v_proj']" in message
    assert "--data.batch_size: the checkpoint has 8, this run asks for 16 (it stopped in epoch 0 after 3" in message
    assert "--data.seed: the checkpoint has 42, this run asks for 7" in message
    assert "size mismatch" not in message and "Resume with the checkpoint's values" in message
    assert snapshot(run / "debug" / "checkpoints") == before


def test_resume_applies_a_changed_learning_rate_and_length(run):
    done = fit(run, "--ckpt_path", "last", "--model.learning_rate", "0.01", "--trainer.max_steps", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    changed = next(line for line in done.stderr.splitlines() if "with changed settings, applied:" in line)
    assert "model.learning_rate 0.001 -> 0.01" in changed and "trainer.max_steps 3 -> 5" in changed
    state = torch.load(run / "debug/checkpoints/last.ckpt", weights_only=True)
    group = state["optimizer_states"][0]["param_groups"][0]
    assert state["global_step"] == 5 and group["initial_lr"] == 0.01  # the peak the schedule scales is the new one
    factor = WarmupSchedule(warmup_steps=2, decay="cosine").factor(4, 5)  # the rate of step 5, of a 5-step run
    assert group["lr"] == pytest.approx(0.01 * factor, rel=1e-9)
    hparams = yaml.safe_load((run / "debug/version_1/hparams.yaml").read_text())
    assert hparams["learning_rate"] == 0.01  # what the log records is what trained


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(tmp_path, caplog):
    from lit_llama_lab.train.callbacks.run_folder import LOCK_NAME, RunFolderError, RunLock

    lock = RunLock(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(RunFolderError, match=rf"process {sleeper.pid} on host {socket.gethostname()}.*delete"):
            lock.acquire()
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
    lock.acquire()  # its holder is dead now (as after kill -9): taken over, with a warning
    assert "Took over the lock" in caplog.text and lock.held
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": "elsewhere", "started": 0}))
    with pytest.raises(RunFolderError, match="on host elsewhere"):  # another host's process cannot be checked
        RunLock(tmp_path).acquire()


def test_leftovers_of_killed_writes_are_cleaned_and_an_old_folder_comes_back(tmp_path):
    from lit_llama_lab.train.callbacks.run_folder import clean_leftovers

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".last.ckpt.{dead.pid}.partial").write_bytes(b"half")
    (tmp_path / f".last.{dead.pid}.old").mkdir()  # a replacement killed between its two renames
    (tmp_path / f".last.{dead.pid}.old" / "adapter_config.json").write_text("{}")
    (tmp_path / f".epoch=0-step=3.ckpt.{os.getpid()}.partial").write_bytes(b"mine")  # a live writer's
    assert clean_leftovers(tmp_path) == [f".last.ckpt.{dead.pid}.partial"]
    assert (tmp_path / "last" / "adapter_config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == [f".epoch=0-step=3.ckpt.{os.getpid()}.partial", "last"]
