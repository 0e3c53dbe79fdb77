"""Formats and sources: detection with override, multi-turn + system kept, clear errors on bad files."""

import json

import datasets
import pytest

from lit_llama_lab.data.formats import (
    MalformedRowError,
    detect_format,
    detect_rows_format,
    load_source,
    row_to_messages,
)

SHAREGPT = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"},
                              {"from": "gpt", "value": "Goodbye!"}]}
MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
ALPACA = {"instruction": "Add.", "input": "2 and 3", "output": "5"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_detect_each_format():
    assert detect_format(SHAREGPT) == "sharegpt"
    assert detect_format(MESSAGES) == "messages"
    assert detect_format(ALPACA) == "alpaca"
    assert detect_format(["character", "short description", "tags"]) == "emoji"
    with pytest.raises(ValueError, match="--data.format"):
        detect_format(["text"])


def test_multi_turn_and_system_prompt_are_kept():
    messages = row_to_messages(SHAREGPT, "sharegpt")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be kind." and messages[-1]["content"] == "Goodbye!"
    assert row_to_messages(ALPACA, "alpaca")[0]["content"] == "Add.\n\n2 and 3"


@pytest.mark.parametrize(
    ("row", "fmt", "reason"),
    [
        ({"conversations": [{"from": "human", "value": "Hi"}]}, "sharegpt", "no assistant turn"),
        ({"conversations": [{"from": "robot", "value": "Hi"}]}, "sharegpt", "unknown ShareGPT role 'robot'"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}, "messages",
         "empty assistant turn"),
        ({"messages": [{"role": "user"}]}, "messages", "missing or mistyped field"),
        ({"conversations": []}, "sharegpt", "empty"),
        (ALPACA, "sharegpt", "missing or mistyped field"),
    ],
)
def test_malformed_rows_say_why(row, fmt, reason):
    with pytest.raises(MalformedRowError, match=reason):
        row_to_messages(row, fmt)


def test_mixed_formats_in_one_file_are_refused(tmp_path):
    data = load_source(str(write_jsonl(tmp_path / "mixed.jsonl", [SHAREGPT, MESSAGES])), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="Mixed dataset formats: row 0 is sharegpt but row 1 is messages"):
        detect_rows_format(data)


def test_unknown_format_names_the_row(tmp_path):
    data = load_source(str(write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="Row 0: Cannot tell the dataset format"):
        detect_rows_format(data)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv"])
def test_local_files_of_each_type(tmp_path, suffix):
    rows = [ALPACA, {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    data = load_source(str(path), cache_dir=str(tmp_path / "cache"))
    assert len(data) == 2 and detect_rows_format(data) == "alpaca"
    assert row_to_messages(data[1], "alpaca")[1]["content"] == "Hi!"


def test_a_folder_of_files_is_one_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", [SHAREGPT])
    write_jsonl(tmp_path / "d" / "b.jsonl", [SHAREGPT, SHAREGPT])
    assert len(load_source(str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))) == 3
    (tmp_path / "d" / "c.csv").write_text("instruction,output\nx,y\n")
    with pytest.raises(ValueError, match="files of one type"):
        load_source(str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        load_source(str(tmp_path / "empty.jsonl"), cache_dir=str(tmp_path / "c"))


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    text = json.dumps(MESSAGES) + "\n" + json.dumps({"messages": [{"role": "user", "content": "café"}]}, ensure_ascii=False) + "\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text: byte 0xe9 .*line 2.*iconv"):
        load_source(str(path), cache_dir=str(tmp_path / "c"))


def test_unknown_source_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder, and not a hub id"):
        load_source(str(tmp_path / "missing.jsonl"))


def test_broken_json_is_a_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(ValueError, match="Could not read .* as json"):
        load_source(str(tmp_path / "bad.jsonl"), cache_dir=str(tmp_path / "c"))


def test_emoji_rows_are_built_in_memory():
    data = load_source("emoji")
    assert len(data) > 3000 and detect_rows_format(data) == "emoji"


def test_one_malformed_json_line_among_good_ones_names_its_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [MESSAGES] * 3)
    path.write_text(path.read_text() + '{"messages": [}\n' + json.dumps(MESSAGES) + "\n")
    with pytest.raises(ValueError, match=rf"{path} line 4: Expecting value .*Fix or remove that line"):
        load_source(str(path), cache_dir=str(tmp_path / "c"))
    array = tmp_path / "chats.json"  # one JSON document: its own line numbers
    array.write_text("[\n" + json.dumps(MESSAGES) + ",\n" + json.dumps(MESSAGES)[:-1] + "\n]\n")
    with pytest.raises(ValueError, match=rf"{array} line 4: "):
        load_source(str(array), cache_dir=str(tmp_path / "c"))


def test_csv_cells_are_read_as_text(tmp_path):
    """A CSV has no types: numeric answers are answers (not 'empty' rows), and 007 stays 007."""
    path = tmp_path / "sums.csv"
    path.write_text("instruction,input,output\nWhat is 2+2?,,4\nSay the agent's number.,,007\n")  # all numbers
    data = load_source(str(path), cache_dir=str(tmp_path / "c"))
    assert [row["output"] for row in data] == ["4", "007"]
    assert row_to_messages(data[0], "alpaca")[1] == {"role": "assistant", "content": "4"}


def test_a_number_where_text_belongs_says_so_and_how_to_fix(tmp_path):
    with pytest.raises(MalformedRowError, match=r"the assistant turn is a number \(4\), not text: write it as a string"):
        row_to_messages({"instruction": "What is 2+2?", "output": 4}, "alpaca")
    with pytest.raises(MalformedRowError, match="an empty assistant turn"):
        row_to_messages({"instruction": "What is 2+2?", "output": None}, "alpaca")


def test_a_missing_local_data_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for source, reason in [("data/chats.jsonl", ".jsonl file"), ("data/chats", "data/ is a folder here")]:
        with pytest.raises(ValueError, match=rf"no such file or folder, and not a hub id .*{reason}"):
            load_source(source)
