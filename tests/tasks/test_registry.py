"""Tasks are plug-ins: the data layer, the sample callback and the evaluate tool ask the registry, so a task
registered from outside works everywhere the built-in ones do."""

from __future__ import annotations

import json

import pytest

from lit_llama_lab.tasks import registry
from lit_llama_lab.tasks.task import RowContext, Task


@pytest.fixture
def echo_task():
    """A task whose rows ``{"word": ...}`` become "Say {word}." / "{word}!" chats, registered for one test."""

    def messages(row: dict, context: RowContext) -> list[dict]:
        if not row.get("word"):
            raise ValueError("missing ['word']")
        answer = row["word"].upper() if context.style == "loud" else row["word"]
        return [{"role": "user", "content": f"Say {row['word']}."}, {"role": "assistant", "content": f"{answer}!"}]

    task = Task(name="echo", columns=frozenset({"word"}), styles=("plain", "loud"), messages=messages,
                sample_questions=lambda items: [f"Say {w}." for w in items or ["hi"]])
    registry.register(task)
    yield task
    registry._TASKS.pop("echo")


def test_the_built_in_tasks_and_a_clear_error_for_others():
    assert registry.task_names() == ["emoji", "general"]
    assert registry.task_names("messages") == ["emoji"] and registry.task_names("evaluate") == ["emoji", "general"]
    with pytest.raises(ValueError, match="Unknown task 'nope': known tasks are emoji, general"):
        registry.get_task("nope")


def test_a_registered_task_is_a_data_format_the_data_module_detects_and_styles(echo_task, tmp_path):
    from lit_llama_lab.data.datamodule import ChatDataModule
    from lit_llama_lab.data.formats import MalformedRowError, detect_format, formats, row_to_messages

    assert detect_format(["word"]) == "echo" and "echo" in formats()
    with pytest.raises(MalformedRowError, match=r"missing \['word'\]"):
        row_to_messages({"word": ""}, "echo")
    source = tmp_path / "words.jsonl"
    source.write_text("\n".join(json.dumps({"word": f"w{i}"}) for i in range(10)))
    data = ChatDataModule(source=str(source), tokenizer="tiny-random", test_fraction=0, val_fraction=0,
                          answer_style="loud", cache_dir=str(tmp_path / "cache"))
    data.setup()
    assert len(data.splits["train"]) == 10
    text = data.tokenizer.decode(data.splits["train"][0]["input_ids"])
    assert "Say w" in text and "W" in text.split("Say")[1]  # the loud style reached the task's format
    bad = ChatDataModule(source=str(source), tokenizer="tiny-random", answer_style="whisper",
                         cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="answer_style='whisper' does not apply to the echo format: use one of plain, loud"):
        bad.setup()


def test_sample_questions_come_from_the_task(echo_task):
    from lit_llama_lab.train.callbacks import SampleGenerations

    assert SampleGenerations(task="echo", items=["yes"], prompts=[]).questions() == ["Say yes."]
    assert SampleGenerations(prompts=["Hi?"]).questions() == ["Hi?"]  # no task: the prompts alone
    with pytest.raises(ValueError, match="has no sample questions"):
        SampleGenerations(task="general")
    with pytest.raises(ValueError, match="need a task"):
        SampleGenerations(items=["🐼"])
