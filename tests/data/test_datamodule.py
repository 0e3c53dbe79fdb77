"""ChatDataModule on real files and the real SmolLM2 tokenizer: splits, bad rows, truncation, packed batches, and
both FineTome configs end to end on the bundled sample."""

import json
import logging
import re
from pathlib import Path

import pytest

from lit_llama_lab.cli import main
from lit_llama_lab.data.datamodule import ChatDataModule, NoTrainableTokensError
from lit_llama_lab.data.formats import MalformedRowError

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "lit_llama_lab" / "data" / "samples" / "finetome_sample.jsonl"


def module(tmp_path, **kwargs) -> ChatDataModule:
    options = {"source": str(SAMPLE), "tokenizer": "tiny-random", "cache_dir": str(tmp_path / "datasets"),
               "test_fraction": 0.2, "val_fraction": 0.1, "batch_size": 4} | kwargs
    return ChatDataModule(**options)


def conversation_keys(dataset) -> set[str]:
    return {json.dumps(row["conversations"]) for row in dataset}


def test_sample_is_finetome_shaped():
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 30 and all(set(r) == {"conversations", "source", "score"} for r in rows)
    assert sum(r["conversations"][0]["from"] == "system" for r in rows) >= 10
    assert sum(sum(t["from"] == "gpt" for t in r["conversations"]) > 1 for r in rows) >= 10
    assert len({json.dumps(r["conversations"]) for r in rows}) == len(rows)


def test_splits_are_seeded_disjoint_and_stable(tmp_path):
    first, again, other = module(tmp_path), module(tmp_path), module(tmp_path, seed=1)
    for dm in (first, again, other):
        dm.setup()
    assert {k: len(v) for k, v in first.rows.items()} == {"test": 8, "val": 4, "train": 28}
    train, test = conversation_keys(first.rows["train"]), conversation_keys(first.rows["test"])
    assert not train & test and not train & conversation_keys(first.rows["val"])
    assert conversation_keys(again.rows["test"]) == test
    assert conversation_keys(other.rows["test"]) != test
    assert first.splits["train"]["input_ids"] == again.splits["train"]["input_ids"]


def write_rows(tmp_path, rows) -> str:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}
NO_ASSISTANT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Anyone?"}]}


def test_malformed_rows_are_skipped_and_counted(tmp_path, caplog):
    source = write_rows(tmp_path, [GOOD, NO_ASSISTANT, GOOD, NO_ASSISTANT, GOOD])
    dm = module(tmp_path, source=source, test_fraction=0.0, val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.stats["train"]["malformed"] == 2 and len(dm.splits["train"]) == 3
    assert "skipped 2 malformed rows (first source rows, 0-based: [1, 3]; first reason: no assistant turn)" in caplog.text


def test_skipped_rows_are_numbered_as_in_the_file_not_the_split(tmp_path, caplog):
    """With test and val splits taken out, the train split's positions are not the file's rows: the log must name
    the rows a user finds in the file."""
    rows = [GOOD] * 20
    bad = [4, 13, 17]
    for i in bad:
        rows[i] = NO_ASSISTANT
    dm = module(tmp_path, source=write_rows(tmp_path, rows), test_fraction=0.2, val_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    lists = [re.search(r"skipped \d+ malformed rows \(first[^\[]*\[([\d, ]+)\]", line) for line in caplog.messages]
    named = {int(n) for found in lists if found for n in found[1].split(",")}
    assert named == set(bad), caplog.messages  # every malformed row named by its file row, in whichever split
    assert sum(dm.stats[s]["malformed"] for s in dm.stats) == len(bad)


def test_strict_mode_raises_on_the_first_malformed_row(tmp_path):
    dm = module(tmp_path, source=write_rows(tmp_path, [GOOD, NO_ASSISTANT]), test_fraction=0.0, val_fraction=0.0,
                strict=True)
    with pytest.raises(MalformedRowError, match=r"train: source row 1 \(0-based\): no assistant turn"):
        dm.setup()


def test_no_trainable_tokens_after_truncation(tmp_path):
    with pytest.raises(NoTrainableTokensError, match="max_seq_length=16.*Raise --data.max_seq_length"):
        module(tmp_path, max_seq_length=16).setup()


def test_overlong_examples_truncate_or_drop(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cut = module(tmp_path, max_seq_length=128)
        cut.setup()
    assert cut.stats["train"]["truncated"] > 0 and "longer than max_seq_length=128" in caplog.text
    assert max(len(ids) for ids in cut.splits["train"]["input_ids"]) == 128
    drop = module(tmp_path, max_seq_length=128, overlong="drop")
    drop.setup()
    assert drop.stats["train"]["dropped"] == cut.stats["train"]["truncated"]
    assert len(drop.splits["train"]) == len(cut.splits["train"]) - drop.stats["train"]["dropped"]


def test_packing_keeps_batch_size_examples_per_batch(tmp_path):
    packed, padded = module(tmp_path, packing=True, max_seq_length=512), module(tmp_path, packing=False)
    packed.setup()
    padded.setup()
    packed_batches, padded_batches = list(packed.train_dataloader()), list(padded.train_dataloader())
    assert len(packed_batches) == len(padded_batches) == 7  # 28 examples / 4: packing never changes the steps
    for batch in packed_batches:
        assert batch["input_ids"].shape[1] <= 512
        assert int(batch["document_ids"].max(dim=1).values.add(1).sum()) == 4  # 4 examples in the batch's rows
    tokens = sum(int((b["labels"] != -100).sum()) for b in packed_batches)
    assert tokens == sum(int((b["labels"] != -100).sum()) for b in padded_batches)


def test_labelled_tokens_are_counted_before_the_transfer(tmp_path):
    data = module(tmp_path, packing=True, max_seq_length=512)
    data.setup()
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert isinstance(batch["num_labelled"], int)  # a host int: logging it never waits for a GPU
    assert batch["num_labelled"] == int((batch["labels"][:, 1:] != -100).sum()) > 0


# The eager and flex masks are built by the step now: tests/speed/test_attention.py.


def test_emoji_source_tokenizes_quickly(tmp_path):
    import time

    start = time.perf_counter()
    dm = ChatDataModule(source="emoji", tokenizer="tiny-random", batch_size=8)
    dm.setup()
    assert sum(len(s) for s in dm.splits.values()) > 3900 and time.perf_counter() - start < 60


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


def test_finetome_configs_follow_the_seed(capsys):
    import yaml

    plain, tuned = (yaml.safe_load((ROOT / "configs" / f).read_text()) for f in ("finetome.yaml", "finetome-tuned.yaml"))
    assert plain["model"]["lora"] == {"r": 16, "alpha": 16, "use_rslora": False}
    assert tuned["model"]["lora"] == {"r": 8, "alpha": 16, "use_rslora": True}
    assert (plain["model"]["learning_rate"], tuned["model"]["learning_rate"]) == (1e-4, 1e-3)
    assert (plain["data"]["packing"], tuned["data"]["packing"]) == (False, True)
    warmups = [next(c["init_args"] for c in cfg["trainer"]["callbacks"] if "Warmup" in str(c)) for cfg in (plain, tuned)]
    assert warmups[0]["warmup_steps"] == 5 and warmups[1]["warmup_fraction"] == 0.1
    assert plain["data"]["source"] == tuned["data"]["source"] == "mlabonne/FineTome-100k"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["finetome.yaml", "finetome-tuned.yaml"])
def test_finetome_config_trains_offline_on_the_sample(config, tmp_path, monkeypatch):
    """About 30-60 s each on a shared 2-core CPU (imports, 4-bit tiny model, two steps, one validation)."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / config), "--model.name_or_path", "tiny-random",
          "--data.source", str(SAMPLE), "--data.cache_dir", str(tmp_path / "datasets"), "--data.num_proc", "1",
          "--data.val_fraction", "0.1", "--data.max_seq_length", "512", "--trainer.max_steps", "2",
          "--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    name = config.removesuffix(".yaml")
    assert (tmp_path / "runs" / name / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "runs" / name).glob("version_0/events.out.tfevents.*"))


def test_a_global_batch_is_shared_among_the_devices_and_must_divide():
    """``--data.global_batch_size``: each device takes its share, so 1 and 2 devices take the same steps."""
    import lightning as L

    from lit_llama_lab.data.datamodule import ChatDataModule

    data = ChatDataModule(source="emoji", global_batch_size=8)
    assert data.device_batch_size == 8  # no trainer: one process
    data.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert data.device_batch_size == 4
    odd = ChatDataModule(source="emoji", global_batch_size=9)
    odd.trainer = data.trainer
    with pytest.raises(ValueError, match="global_batch_size 9 does not divide among 2 devices"):
        odd.device_batch_size  # noqa: B018
    assert ChatDataModule(source="emoji", batch_size=5).device_batch_size == 5


def test_the_cpu_emoji_config_is_the_emoji_config_with_only_its_sizes_and_the_shared_prefix_changed():
    import yaml

    gpu, cpu = (yaml.safe_load((ROOT / "configs" / f).read_text()) for f in ("emoji.yaml", "emoji-cpu.yaml"))

    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        if isinstance(value, list):
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
        return {prefix.rstrip("."): value}

    a, b = flat(gpu), flat(cpu)
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert changed == {"trainer.max_epochs", "data.replay.ratio", "data.replay.max_new_tokens",
                       "trainer.callbacks.2.init_args.every_n_validations", "data.share_prefix"}
    assert b["data.share_prefix"] is True  # the same loss in fewer tokens; the GPU's varlen attention cannot share
    assert b["trainer.max_epochs"] < a["trainer.max_epochs"] and b["data.replay.ratio"] < a["data.replay.ratio"]
    # a twentieth of replay needs fewer usable answers, so the CPU keeps the 160-token default budget (cheaper to generate)
    assert "data.replay.max_new_tokens" not in b and a["data.replay.max_new_tokens"] > 160
