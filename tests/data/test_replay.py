"""Replay of the starting model's own answers: counted, cached once, mixed into the training split only."""

import json

import pytest

from lit_llama_lab.data.datamodule import ChatDataModule, ReplayArgs
from lit_llama_lab.data.masking import IGNORE_INDEX
from lit_llama_lab.data.replay import answer_prompts, load_prompts, prompts_needed, replay_cache_file, replay_count


def test_ratio_is_the_share_of_training_examples():
    assert replay_count(3000, 0.2) == 750  # 750 / (3000 + 750) = 0.2
    assert replay_count(3000, 0.0) == 0
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"replay_ratio must be in \[0, 1\).*got " + str(bad)):
            replay_count(10, bad)
    with pytest.raises(ValueError, match=r"replay_ratio must be in \[0, 1\)"):
        ChatDataModule(replay=ReplayArgs(ratio=1.0))


def test_needed_prompts_are_a_stable_prefix_of_the_pool():
    pool = [f"prompt {i}" for i in range(100)]
    small, large = prompts_needed(pool, 10, seed=3), prompts_needed(pool, 40, seed=3)
    assert len(small) == 13 and large[:13] == small  # a larger run extends the cache instead of replacing it
    assert prompts_needed(pool, 1000, seed=3) == prompts_needed(pool, 500, seed=3) and len(large) == 52


def test_a_bad_prompts_file_names_the_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object with a 'prompt'"):
        load_prompts(str(bad))


@pytest.fixture
def lab_cache(tmp_path, monkeypatch):
    """An empty lab cache of its own that still sees the converted embedded models (no reconversion)."""
    from lit_llama_lab.model.load import load_tokenizer
    from lit_llama_lab.model.source import cache_dir

    load_tokenizer("smollm2-135m")  # converted in the real cache once
    root = tmp_path / "cache"
    root.mkdir()
    (root / "converted").symlink_to(cache_dir() / "converted")
    monkeypatch.setenv("LIT_LLAMA_LAB_CACHE", str(root))
    return root


@pytest.mark.slow
def test_smollm2_answers_once_and_training_mixes_its_answers(tmp_path, lab_cache):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [
        "Say hello.", "What is 2+2? Answer with a number only.", "Reply with the single word yes.",
        "What is the opposite of hot? One word.", "Say goodbye.", "Name one colour. One word."]))
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                                       {"role": "assistant", "content": f"Up to {i}."}]}) + "\n"
                              for i in range(16)))
    replay = ReplayArgs(ratio=0.2, prompts=str(prompts), max_new_tokens=24)
    data = ChatDataModule(source=str(source), tokenizer="smollm2-135m", test_fraction=0.25, val_fraction=0,
                          packing=False, replay=replay, cache_dir=str(tmp_path / "datasets"))
    data.prepare_data()  # 12 train rows, 0.2 replay: 3 chats, 4 prompts answered (a spare for unfinished ones)
    import torch

    file = replay_cache_file("smollm2-135m", "nf4", torch.float32, 24)
    cached = [json.loads(line) for line in file.read_text().splitlines()]
    assert len(cached) == 4 and all(set(r) == {"prompt", "answer", "stopped"} for r in cached)
    stamp = file.stat().st_mtime_ns
    data.setup("fit")
    assert file.stat().st_mtime_ns == stamp  # answered once: setup read the cache
    usable = {r["answer"] for r in cached if r["stopped"]}
    assert len(usable) >= 3, cached
    train, test = data.splits["train"], data.splits["test"]
    assert len(train) == 12 + 3 and len(test) == 4  # replay joins the training split only
    tok = data.tokenizer
    replayed = [tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) for row in train.select(range(12, 15))]
    assert all(text.removesuffix(tok.eos_token).strip() in usable and text.endswith(tok.eos_token) for text in replayed)
    again = answer_prompts("smollm2-135m", [r["prompt"] for r in cached], max_new_tokens=24, device="cpu")
    assert [a["answer"] for a in again.values()] == [r["answer"] for r in cached] and file.stat().st_mtime_ns == stamp
    # the replay chats by replay_id, for the KL targets computed once at fit start (speed.distill.TeacherCache)
    assert data.replay_examples() == [list(row["input_ids"]) for row in train.select(range(12, 15))]
    import lightning as L

    from lit_llama_lab.train.args import LoraArgs
    from lit_llama_lab.train.module import QLoRAModule

    module = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(r=4, alpha=8), distill_weight=1.0)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, data)
    teacher = module.step.teacher
    assert teacher is not None and teacher.table.shape[0] == sum(len(e) for e in data.replay_examples())
    assert teacher.offsets.tolist() == [0, len(data.replay_examples()[0]), sum(map(len, data.replay_examples()[:2]))]
