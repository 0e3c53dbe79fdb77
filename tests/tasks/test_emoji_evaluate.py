"""Emoji evaluation (the emoji task, asked by the generic ``evaluate`` tool): metric counts on hand-made answers, splits as training makes them, end-to-end on tiny-random."""

from __future__ import annotations

import json
import math

import pytest

from lit_llama_lab.data.datamodule import ChatDataModule
from lit_llama_lab.model.source import ModelNotFoundError
from lit_llama_lab.tasks.common import sample_rows
from lit_llama_lab.tasks.emoji.evaluate import SHOWCASE, emoji_split, question_chats
from lit_llama_lab.tasks.emoji.rows import HELDOUT_WORDINGS, TRAIN_WORDINGS, build_emoji_rows, emoji_answer
from lit_llama_lab.tasks.emoji.scoring import EmojiAnswerMetrics, names_emoji, names_emoji_lenient, normalize
from lit_llama_lab.tools.evaluate import compare, evaluate


def test_names_emoji_hit_miss_and_case():
    assert names_emoji("🐼 is the panda emoji.", "panda")
    assert names_emoji("This is the FLAG: united states emoji", "flag: United States")
    assert names_emoji("🕗 is the eight o'clock emoji.", "eight o’clock")  # typographic apostrophe in CLDR names
    assert names_emoji("It is called panda.", "panda")
    assert names_emoji("🤘 is the sign of the horns emoji.", "sign of the horns")  # "the" inside the name
    assert names_emoji("🅰️ is the A button (blood type) emoji.", "A button (blood type)")
    assert names_emoji("🇸🇭 (SH) is the flag: St. Helena emoji.", "flag: St. Helena")  # a dot inside the name
    assert not names_emoji("This is a red panda.", "giant panda")
    assert not names_emoji("a flag of the USA", "flag: United States")
    assert not names_emoji("", "panda")
    assert not names_emoji("#️⃣ is the keycap: # emoji.", "keycap: *")
    assert names_emoji_lenient("It shows eight o'clock.", "eight o’clock")


def test_strict_scoring_rejects_a_trained_neighbour_the_old_scorer_accepted():
    """The traps of the held-out split: the reference lies inside a trained emoji's name, so answering with that
    neighbour passed the substring rule."""
    traps = [("🙎‍♂️ is the woman pouting emoji.", "man pouting"), ("🐂 is the bento box emoji.", "ox"),
             ("🦉 is the bowling emoji.", "owl"),
             ("💏🏻 is the kiss: woman, man, light skin tone, medium skin tone emoji.", "kiss: woman, man, light skin tone"),
             ("🤘 is the sign of the horns emoji.", "horns")]
    for answer, name in traps:
        assert names_emoji_lenient(answer, name), answer
        assert not names_emoji(answer, name), answer
    # on the real split: every held-out name inside a trained name is a trap the strict rule refuses
    train = [r["short description"] for r in emoji_split("train")]
    test = [r["short description"] for r in emoji_split("test")]
    pairs = [(t, n) for t in test for n in train if normalize(t) in normalize(n) and t != n]
    assert len({t for t, _ in pairs}) > 100
    for name, neighbour in pairs:
        answer = f"It is the {neighbour} emoji."
        assert names_emoji_lenient(answer, name) and not names_emoji(answer, name), (name, neighbour)
        assert names_emoji(f"It is the {name} emoji.", name)


def test_metric_counts_hand_made_answers():
    metric = EmojiAnswerMetrics()
    metric.update(
        answers=["🐼 is the panda emoji.", "🎂 is a cake for birthdays", "🤌 is the PINCHED FINGERS emoji."],
        names=["panda", "birthday cake", "pinched fingers"],
        stopped=[True, True, True],
        lengths=[7, 9, 10],
    )
    metric.update(answers=["🇺🇸 is the flag: United States emoji, and"], names=["flag: United States"],
                  stopped=[False], lengths=[48])  # named, but it ran out of budget without eos
    result = {k: v.item() for k, v in metric.compute().items()}
    assert (result["named"], result["stopped"], result["answers"]) == (3, 3, 4)
    assert result["name_accuracy"] == pytest.approx(0.75)
    assert result["eos_rate"] == pytest.approx(0.75)
    assert result["mean_answer_tokens"] == pytest.approx((7 + 9 + 10 + 48) / 4)
    metric.reset()
    assert metric.compute()["answers"].item() == 0
    with pytest.raises(ValueError, match="same length"):
        metric.update(["a"], ["a", "b"], [True], [1])


def test_splits_are_the_training_splits():
    rows = build_emoji_rows()
    expected = ChatDataModule(seed=7, test_fraction=0.3, val_fraction=0.05).split_rows(rows)
    for name in ("train", "val", "test"):
        assert emoji_split(name, seed=7, test_fraction=0.3, val_fraction=0.05) == expected[name]
    assert len(emoji_split("all")) == len(rows)
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        emoji_split("dev")


def test_sample_is_seeded_ordered_and_checked():
    rows = [{"i": i} for i in range(100)]
    sample = sample_rows(rows, 10, seed=1)
    assert sample == sample_rows(rows, 10, seed=1) and sample != sample_rows(rows, 10, seed=2)
    assert [r["i"] for r in sample] == sorted(r["i"] for r in sample)
    assert sample_rows(rows, None, seed=1) == rows and sample_rows(rows, 500, seed=1) == rows
    with pytest.raises(ValueError, match="limit must be at least 1"):
        sample_rows(rows, 0, seed=1)


def test_heldout_wordings_rotate_and_differ_from_training():
    rows = emoji_split("train")[:7]
    questions = [chat[0]["content"] for chat in question_chats(rows, "heldout")]
    assert questions[0] == HELDOUT_WORDINGS[0].format(e=rows[0]["character"])
    assert questions[5] == HELDOUT_WORDINGS[0].format(e=rows[5]["character"])
    assert {q.replace(r["character"], "{e}") for q, r in zip(questions, rows, strict=True)} == set(HELDOUT_WORDINGS)
    assert not set(HELDOUT_WORDINGS) & set(TRAIN_WORDINGS)
    train_chat = question_chats(rows[:1], "train")[0]
    assert train_chat[0]["content"] == f"What is {rows[0]['character']}?"
    assert train_chat[1]["content"] == emoji_answer(rows[0])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    results = evaluate(model="tiny-random", split="test", wordings=["train", "heldout"], limit=6,
                       max_new_tokens=4, batch_size=8, output_dir=str(out))
    return out, results


def test_end_to_end_tiny_random_writes_results(tiny_run):
    out, results = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["summary.md", "tiny-random-test-heldout", "tiny-random-test-train"]
    folder = out / "tiny-random-test-train"
    assert sorted(p.name for p in folder.iterdir()) == ["answers.jsonl", "metrics.json", "report.md"]  # no temp files
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved == results[0]
    assert set(saved["metrics"]) == {"name_accuracy", "name_accuracy_lenient", "eos_rate", "mean_answer_tokens",
                                     "perplexity", "named", "named_lenient", "stopped", "answers"}
    metrics = saved["metrics"]
    assert metrics["answers"] == 6 and 0 <= metrics["name_accuracy"] <= 1 and 0 <= metrics["eos_rate"] <= 1
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1
    records = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
    test_emoji = {r["character"] for r in emoji_split("test")}
    assert len(records) == 6 and all(r["emoji"] in test_emoji for r in records)
    assert metrics["stopped"] == sum(r["stopped"] for r in records)
    assert all(r["tokens"] <= 4 for r in records)
    report = (folder / "report.md").read_text()
    assert "| name accuracy | lenient (substring, old) | eos termination |" in report
    assert all(f"| {e} |" in report for e in SHOWCASE)
    heldout = [json.loads(line) for line in (out / "tiny-random-test-heldout" / "answers.jsonl").read_text().splitlines()]
    assert [r["emoji"] for r in heldout] == [r["emoji"] for r in records]  # same sample, other wordings
    assert not any(r["question"].startswith("What is") for r in heldout)


def test_compare_tables_saved_results(tiny_run):
    out, _ = tiny_run
    table = compare([out / "tiny-random-test-train", out / "tiny-random-test-heldout" / "metrics.json"])
    lines = table.splitlines()
    assert lines[0].startswith("| model | split | wordings | rows | name accuracy")
    assert len(lines) == 4 and "| tiny-random | test | heldout | 6 |" in lines[3]
    assert (out / "summary.md").read_text().endswith(table)
    with pytest.raises(FileNotFoundError, match="No metrics.json"):
        compare([out])


def test_an_adapter_is_evaluated_against_the_answer_style_it_records(tmp_path):
    """An adapter trained on ``name_no_copy`` records it; ``evaluate`` without ``answer_style`` then scores the
    perplexity of that style's reference answers, as if it had been given, not the task's default ``name``."""
    from lit_llama_lab.model.adapters import ADAPTER_METADATA, write_peft_files
    from lit_llama_lab.train.args import LoraArgs
    from lit_llama_lab.train.module import QLoRAModule

    module = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(r=8, alpha=16))
    module.configure_model()
    folder = tmp_path / "adapter"
    write_peft_files(module.model, module.adapter_state_dict(), folder)
    (folder / ADAPTER_METADATA).write_text(json.dumps({"base_model": "tiny-random", "quantize": "nf4",
                                                       "answer_style": "name_no_copy"}))

    def perplexity(**style):
        [result] = evaluate(model=str(folder), split="test", wordings="train", limit=3, max_new_tokens=2,
                            batch_size=4, output_dir=str(tmp_path / f"out-{len(list(tmp_path.iterdir()))}"), **style)
        return result["settings"]["answer_style"], result["metrics"]["perplexity"]

    recorded, given, default = perplexity(), perplexity(answer_style="name_no_copy"), perplexity(answer_style="name")
    assert recorded[0] == given[0] == "name_no_copy" and default[0] == "name"
    assert recorded[1] == pytest.approx(given[1]) and recorded[1] != pytest.approx(default[1])


def test_bad_model_path_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder. Accepted forms"):
        evaluate(model=["tiny-random", str(tmp_path / "no-such-adapter")], limit=2, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Unknown split or wordings"):
        evaluate(model="tiny-random", wordings="reworded")
    with pytest.raises(ValueError, match="max_new_tokens and batch_size"):
        evaluate(model="tiny-random", batch_size=0)


def test_cli_help_lists_the_options(capsys):
    from lit_llama_lab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--split", "--wordings", "--limit", "--max_new_tokens", "--output_dir"):
        assert option in help_text
    assert "never uses" in help_text  # the docstring's argument descriptions become --help


@pytest.mark.slow
def test_smollm2_base_eos_termination_is_counted():
    from lit_llama_lab.model.load import load_for_inference
    from lit_llama_lab.tasks.emoji.evaluate import answer_rows
    from lit_llama_lab.tasks.emoji.scoring import score

    model, tokenizer = load_for_inference("smollm2-135m")
    rows = [r for r in build_emoji_rows() if r["character"] in SHOWCASE]
    chats = question_chats(rows, "train")
    # A control question the base model answers briefly and ends (greedy, so always the same answer).
    rows.append({"character": "2+2", "short description": "4"})
    chats.append([{"role": "user", "content": "What is 2+2? Answer with a number only."},
                  {"role": "assistant", "content": "4"}])
    max_new_tokens = 16
    records = answer_rows(model, tokenizer, rows, chats, max_new_tokens, batch_size=5)
    metrics = score(records)
    assert sorted(r["emoji"] for r in records[:4]) == sorted(SHOWCASE)
    assert records[-1]["stopped"] and records[-1]["named_lenient"]  # "2 + 2 = 4" then eos (no name is stated)
    assert metrics["answers"] == 5 and metrics["stopped"] == sum(r["stopped"] for r in records) >= 1
    assert metrics["eos_rate"] == pytest.approx(metrics["stopped"] / 5)
    # An answer ended with eos exactly when it used less than the budget (eos itself is not counted).
    assert all(r["stopped"] == (r["tokens"] < max_new_tokens) for r in records)
    assert metrics["mean_answer_tokens"] == pytest.approx(sum(r["tokens"] for r in records) / 5)
    assert all(r["answer"] for r in records)
