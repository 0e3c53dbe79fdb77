"""Each callback alone, with the real QLoRAModule on tiny-random, real data and Lightning's Trainer on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file

from lit_llama_lab.data.datamodule import ChatDataModule
from lit_llama_lab.train.args import LoraArgs
from lit_llama_lab.train.callbacks import (
    AdapterCheckpoint,
    DivergenceGuard,
    SampleGenerations,
    TokenThroughput,
    WarmupSchedule,
)
from lit_llama_lab.train.module import QLoRAModule

ANIMALS = ["panda", "flamingo", "cat", "dog", "owl", "fox", "frog", "bee", "whale", "snail", "koala", "tiger"]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """A small chat dataset (messages format) on disk: 48 rows, read through the real data pipeline."""
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Name animal {i}."},
                      {"role": "assistant", "content": f"It is the {ANIMALS[i % len(ANIMALS)]}."}]}
        for i in range(48)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def make_data(chat_file: Path) -> ChatDataModule:
    return ChatDataModule(source=str(chat_file), tokenizer="tiny-random", batch_size=4, max_seq_length=64,
                          packing=False, test_fraction=0.0, val_fraction=0.1)


def make_model(cls=QLoRAModule, **kwargs) -> QLoRAModule:
    return cls(name_or_path="tiny-random", quantize="nf4", lora=LoraArgs(r=4, alpha=8), learning_rate=1e-3, **kwargs)


def make_trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="run"), log_every_n_steps=1,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=1, enable_checkpointing=any(isinstance(c, AdapterCheckpoint) for c in callbacks))
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


class LearningRates(Callback):
    """Records the rate each optimizer step used (placed after WarmupSchedule, which sets it in the same hook)."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.by_step[trainer.global_step] = optimizer.param_groups[0]["lr"]


def expected_lr(step: int, total: int, warmup: int, peak: float, floor: float, decay: str) -> float:
    """The schedule written out independently of WarmupSchedule.factor."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / (total - warmup)
    shape = 1 - p if decay == "linear" else 0.5 * (1 + math.cos(math.pi * p))
    return peak * (floor + (1 - floor) * shape)


@pytest.mark.parametrize(
    ("schedule", "trainer_args", "total", "warmup"),
    [
        # 16 batches, 2 per optimizer step: 8 steps, warmup 3 steps.
        (dict(warmup_steps=3, decay="linear", min_ratio=0.2), dict(max_steps=8), 8, 3),
        # 2 epochs x 5 batches, accumulating 2: ceil(5/2)=3 steps per epoch, 6 in all; warmup 0.34*6 -> 2 steps.
        (dict(warmup_fraction=0.34, decay="cosine", min_ratio=0.1), dict(max_epochs=2, limit_train_batches=5), 6, 2),
    ],
)
def test_warmup_lr_follows_formula_with_accumulation(tmp_path, chat_file, schedule, trainer_args, total, warmup):
    recorder = LearningRates()
    warmup_cb = WarmupSchedule(**schedule)
    trainer = make_trainer(tmp_path, [warmup_cb, recorder], accumulate_grad_batches=2, limit_val_batches=0,
                           **trainer_args)
    trainer.fit(make_model(), make_data(chat_file))
    assert warmup_cb.total_steps == total
    assert sorted(recorder.by_step) == list(range(total))
    for step, lr in recorder.by_step.items():
        assert lr == pytest.approx(expected_lr(step, total, warmup, 1e-3, schedule["min_ratio"], schedule["decay"]),
                                   rel=1e-9), step
    assert recorder.by_step[0] > 0  # the first step already trains
    assert trainer.logged_metrics["lr-AdamW"] == pytest.approx(recorder.by_step[total - 1])


def test_warmup_rejects_bad_settings():
    with pytest.raises(ValueError, match="not both"):
        WarmupSchedule(warmup_steps=2, warmup_fraction=0.1)
    with pytest.raises(ValueError, match="warmup_fraction"):
        WarmupSchedule(warmup_fraction=1.5)


def test_warmup_refuses_an_unbounded_run_with_its_own_message(tmp_path, chat_file):
    """max_epochs=-1 and max_steps=-1: the schedule has no end to decay to; said before int(inf) can crash."""
    trainer = make_trainer(tmp_path, [WarmupSchedule(warmup_steps=1)], max_epochs=-1, max_steps=-1, limit_val_batches=0)
    with pytest.raises(ValueError, match="needs a finite run: set trainer.max_steps or trainer.max_epochs"):
        trainer.fit(make_model(), make_data(chat_file))


def test_adapter_checkpoint_files_and_loading(tmp_path, chat_file):
    from lit_llama_lab.model.load import load_for_inference

    ckpt = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=1, monitor="val_loss")
    trainer = make_trainer(tmp_path, [ckpt], max_steps=6, val_check_interval=2)
    model = make_model()
    trainer.fit(model, make_data(chat_file))

    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no temporary leftovers
    ckpts = [n for n in names if n.endswith(".ckpt")]
    assert "last.ckpt" in ckpts and len(ckpts) == 2, names  # best 1 + last; older ones removed with their folders
    assert sorted(n for n in names if not n.endswith(".ckpt")) == sorted(n[:-5] for n in ckpts)

    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6 and set(state["state_dict"]) == set(model.adapter_state_dict())
    assert all("lora_" in k for k in state["state_dict"])  # the frozen base is not in the checkpoint

    folder = tmp_path / "ckpt" / "last"
    assert {"adapter_config.json", "adapter_model.safetensors", "lit_llama_lab.json"} <= {p.name for p in folder.iterdir()}
    meta = json.loads((folder / "lit_llama_lab.json").read_text())
    assert meta["base_model"] == "tiny-random" and meta["quantize"] == "nf4"
    assert meta["answer_style"] is None  # a plain chat file has no answer styles; the emoji task's runs record theirs
    assert meta["global_step"] == 6 and meta["monitor"] == "val_loss" and math.isfinite(meta["score"])
    assert meta["run"] == "run/version_0"
    assert len(load_file(folder / "adapter_model.safetensors")) == len(state["state_dict"])

    loaded, _ = load_for_inference(str(folder))
    loaded_lora = {k: v for k, v in loaded.state_dict().items() if "lora_A" in k}
    saved_lora = {k: v for k, v in state["state_dict"].items() if "lora_A" in k}
    assert len(loaded_lora) == len(saved_lora) > 0
    for key, value in saved_lora.items():
        match = [v for k, v in loaded_lora.items() if key.split("model.", 1)[1].replace(".default", "") in
                 k.replace(".default", "")]
        assert len(match) == 1 and torch.equal(match[0], value), key


def test_last_is_the_final_state_when_the_score_stops_improving(tmp_path, chat_file):
    # mode="max" on a falling val_loss: only the first epoch ever makes the top 1
    ckpt = AdapterCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=1, monitor="val_loss", mode="max")
    trainer = make_trainer(tmp_path, [ckpt], max_epochs=3, limit_train_batches=3)
    trainer.fit(make_model(), make_data(chat_file))
    folder = tmp_path / "ckpt"
    assert [p.name for p in folder.glob("epoch=*.ckpt")] == ["epoch=0-step=3.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 9
    assert json.loads((folder / "last" / "lit_llama_lab.json").read_text())["global_step"] == 9


def test_checkpoints_are_written_by_a_background_thread_whose_errors_reach_the_run(tmp_path, chat_file):
    import threading

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class FullDiskAtSecond(TorchCheckpointIO):
        threads: list[str] = []

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            self.threads.append(threading.current_thread().name)
            if len(self.threads) == 2:
                raise OSError(28, "No space left on device")
            super().save_checkpoint(checkpoint, path, storage_options)

    ckpt = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, monitor=None, save_top_k=-1,
                             save_last=False)
    trainer = make_trainer(tmp_path, [ckpt], max_steps=8, limit_val_batches=0, plugins=[FullDiskAtSecond()])
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(make_model(), make_data(chat_file))
    assert FullDiskAtSecond.threads[0].startswith("adapter-checkpoint")  # not the training thread
    assert torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)["global_step"] == 2
    assert not (tmp_path / "ckpt" / "epoch=0-step=4.ckpt").exists()  # the failed write never got the name


class Poisoned(QLoRAModule):
    """The real module, whose real loss is multiplied by ``factor`` from optimizer step ``after`` on."""

    def __init__(self, factor: float, after: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.factor, self.after = factor, after

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.factor if self.global_step >= self.after else loss


@pytest.mark.parametrize(("factor", "reason"), [(float("nan"), "loss is nan"), (0.0, "collapsed to ~0")])
def test_guard_stops_diverged_run(tmp_path, chat_file, factor, reason):
    ckpt = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, monitor=None, save_top_k=1)
    guard = DivergenceGuard(window=3)
    trainer = make_trainer(tmp_path, [guard, ckpt], max_steps=30, limit_val_batches=0)
    trainer.fit(make_model(Poisoned, factor=factor, after=4), make_data(chat_file))

    assert guard.diverged and reason in guard.diverged
    stop = 5 if factor != factor else 4 + guard.window  # nan: at once; zero: after `window` batches of zero
    assert trainer.global_step == stop
    assert str(tmp_path / "ckpt" / "last.ckpt") in guard.message
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    # nothing written once the guard tripped; with nan the last file predates the first bad step
    assert last["global_step"] == (4 if factor != factor else 6)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_guard_reading_every_n_batches_stops_within_n_and_writes_no_bad_checkpoint(tmp_path, chat_file):
    ckpt = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, monitor=None, save_top_k=1)
    guard = DivergenceGuard(window=3, check_every_n_steps=5)
    trainer = make_trainer(tmp_path, [guard, ckpt], max_steps=30, limit_val_batches=0)
    trainer.fit(make_model(Poisoned, factor=float("nan"), after=4), make_data(chat_file))

    assert guard.diverged and "loss is nan" in guard.diverged
    assert 5 <= trainer.global_step <= 4 + 5  # the NaN batch is the 5th; read by the 5-batch read at the latest
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # the step-6 save read the pending NaN first and was skipped
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_guard_exploding_loss_and_healthy_loss():
    guard = DivergenceGuard(window=2, explode_factor=4)
    assert [guard.problem(x) for x in [3.0, 2.0, 1.0, 1.0, 2.0, 3.0]] == [None] * 6
    assert "exploded" in guard.problem(9.0)


def test_sample_generations_logged_to_tensorboard(tmp_path, chat_file, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    samples = SampleGenerations(task="emoji", items=["🐼", "🇺🇸"], prompts=["Say hi | twice"], max_new_tokens=4)
    trainer = make_trainer(tmp_path, [samples], max_steps=4, val_check_interval=2, num_sanity_val_steps=1)
    trainer.fit(make_model(), make_data(chat_file))

    assert [q for q, _ in samples.rows] == ["What is 🐼?", "What is 🇺🇸?", "Say hi | twice"]
    assert "Say hi \\| twice" in samples.table and samples.table.startswith("step 4")
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0}).Reload()
    logged = events.Tensors("samples/text_summary")
    assert [e.step for e in logged] == [2, 4]  # each validation, not the sanity check
    assert "What is 🐼?" in logged[-1].tensor_proto.string_val[0].decode()
    printed = capsys.readouterr().out
    assert printed.count("What is 🇺🇸?") == 1  # printed once, at fit end


def test_sample_generations_every_second_validation_and_the_last(tmp_path, chat_file):
    samples = SampleGenerations(task="emoji", items=["🐼"], max_new_tokens=2, every_n_validations=2)
    trainer = make_trainer(tmp_path, [samples], max_steps=6, val_check_interval=2, num_sanity_val_steps=0)
    trainer.fit(make_model(), make_data(chat_file))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0}).Reload()
    assert [e.step for e in events.Tensors("samples/text_summary")] == [4, 6]  # 2nd validation, then the last


def test_token_throughput_counts_real_tokens(tmp_path, chat_file):
    data = make_data(chat_file)
    trainer = make_trainer(tmp_path, [TokenThroughput()], max_steps=3, limit_val_batches=0)
    trainer.fit(make_model(), data)
    assert trainer.logged_metrics["throughput/tokens_per_sec"] > 0
    batch = next(iter(data.train_dataloader()))
    from lit_llama_lab.train.callbacks.throughput import real_tokens

    assert real_tokens(batch, data.tokenizer.pad_token_id) == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
