"""The UI's logic without a browser: model listing, LRU, transcription, streaming answers and bad input.

Runs on the tiny random Llama and a real LoRA adapter saved on it; speech is a real espeak-ng recording
(tests/assets/capital_of_france.wav) transcribed by the embedded Whisper tiny.en. That WAV (1.9 s, 16 kHz mono,
60 KB) was made with ``espeak-ng -s 150 -w q.wav "What is the capital of France?"``, resampled to 16 kHz with
PyAV and trimmed of silence; espeak-ng is not needed to run the tests.
"""

from __future__ import annotations

import json
import shutil
import time
import wave
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio", reason="the UI needs the 'ui' extra: pip install -e '.[ui]'")
pytest.importorskip("faster_whisper", reason="the UI needs the 'ui' extra: pip install -e '.[ui]'")

from lit_llama_lab.tools.ui.app import WARNING, ChatApp, history_to_chat, message_text  # noqa: E402
from lit_llama_lab.tools.ui.asr import AudioError, Transcriber, audio_duration, default_asr_model  # noqa: E402
from lit_llama_lab.tools.ui.registry import ModelCache, ModelUnavailableError, scan_models  # noqa: E402

SPOKEN = Path(__file__).parents[1] / "assets" / "capital_of_france.wav"
SAMPLING = {"max_new_tokens": 12, "temperature": 1.0, "min_p": 0.0}  # tiny-random's greedy answer is blank lines


def make_adapter(folder: Path, step: int = 5, score: float = 1.234) -> Path:
    """A real LoRA adapter on tiny-random (random B, so it changes the output) with checkpoint metadata beside it."""
    from peft import LoraConfig, get_peft_model

    from lit_llama_lab.model.load import load_base_model

    base, _ = load_base_model("tiny-random", quantize="none", compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    meta = {"base_model": "tiny-random", "quantize": "nf4", "global_step": step, "epoch": 0,
            "monitor": "val_loss", "score": score, "run": "demo"}
    (folder / "lit_llama_lab.json").write_text(json.dumps(meta))
    return folder


def write_wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    """A silent 8-bit mono WAV of the given length (real samples, not just a header)."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(rate)
        out.writeframes(b"\x80" * int(seconds * rate))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_adapter(root / "demo" / "checkpoints" / "step-5")
    return root


@pytest.fixture(scope="module")
def chat_app(runs) -> ChatApp:
    return ChatApp(runs_dir=str(runs), base_model="tiny-random")


def adapter_value(app: ChatApp) -> str:
    return next(value for label, value in app.model_choices() if label.endswith("(adapter)"))


def test_scan_lists_base_adapters_merged_exports_and_gguf(runs, tmp_path):
    from lit_llama_lab.model.folders import converted_folder
    from lit_llama_lab.model.source import resolve_model_source

    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    shutil.copytree(converted_folder(resolve_model_source("tiny-random")), root / "exports" / "merged-demo")
    (root / "exports" / "demo.Q8_0.gguf").write_bytes(b"GGUF")
    shutil.copytree(root / "demo", root / ".demo.tmp123")  # an atomic write in progress is not a model
    choices = scan_models(root, base="tiny-random")
    labels = [choice.label for choice in choices]
    assert labels[0] == "tiny-random (base)"
    assert "demo/step-5 · step 5 · val_loss=1.234 (adapter)" in labels
    assert "exports/merged-demo (merged)" in labels
    assert "exports/demo.Q8_0.gguf (gguf)" in labels
    assert len(choices) == 4
    assert scan_models(tmp_path / "no-runs-yet", base="tiny-random")[0].value == "tiny-random"


def test_refresh_picks_up_a_new_adapter(runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    app = ChatApp(runs_dir=str(root), base_model="tiny-random")
    before = app.model_choices()
    shutil.copytree(root / "demo", root / "second")
    (root / "second" / "checkpoints" / "step-5" / "lit_llama_lab.json").write_text(
        json.dumps({"base_model": "tiny-random", "global_step": 9, "monitor": "val_loss", "score": 0.5, "run": "second"})
    )
    after = app.model_choices()
    assert len(after) == len(before) + 1
    assert "second/step-5 · step 9 · val_loss=0.5 (adapter)" in [label for label, _ in after]


def test_adapters_of_runs_sharing_a_name_get_distinct_labels(runs, tmp_path):
    """Two save_dirs each holding a run `debug/version_0`: their `last` adapters must not look the same."""
    root = tmp_path / "runs"
    for save_dir in ("a", "b"):
        folder = root / save_dir / "debug" / "checkpoints" / "last"
        shutil.copytree(runs / "demo" / "checkpoints" / "step-5", folder)
        (folder / "lit_llama_lab.json").write_text(json.dumps(
            {"base_model": "tiny-random", "global_step": 6, "monitor": "val_loss", "score": 1.5, "run": "debug/version_0"}))
    labels = [choice.label for choice in scan_models(root, base="tiny-random") if choice.kind == "adapter"]
    assert sorted(labels) == ["a/debug/last · version_0 · step 6 · val_loss=1.5 (adapter)",
                              "b/debug/last · version_0 · step 6 · val_loss=1.5 (adapter)"]


def test_an_adapter_without_its_weights_file_gives_a_clear_message(runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    app = ChatApp(runs_dir=str(root), base_model="tiny-random")
    value = adapter_value(app)
    (Path(value) / "adapter_model.safetensors").unlink()  # a checkpoint copied without its weights
    answer = list(app.respond([], "Hello", None, value, **SAMPLING))[-1][0][-1]["content"]
    assert answer.startswith(WARNING) and f"{value} has no adapter_model.safetensors" in answer
    assert "Pick another checkpoint" in answer and "Repo id" not in answer


def test_model_cache_keeps_the_two_most_recent(runs, tmp_path):
    from lit_llama_lab.model.load import load_for_inference

    second = tmp_path / "second-adapter"
    shutil.copytree(runs / "demo" / "checkpoints" / "step-5", second)
    loads: list[str] = []

    def loader(value: str):
        loads.append(value)
        return load_for_inference(value, quantize="none")

    cache = ModelCache(loader, size=2)
    first = str(runs / "demo" / "checkpoints" / "step-5")
    model, _ = cache.get("tiny-random")
    assert cache.get("tiny-random")[0] is model  # cached, not reloaded
    cache.get(first)
    cache.get("tiny-random")  # now the most recent
    cache.get(str(second))  # evicts the adapter, the least recently used
    assert cache.loaded() == ["tiny-random", str(second)]
    assert loads == ["tiny-random", first, str(second)]
    with pytest.raises(ValueError, match="at least 1"):
        ModelCache(loader, size=0)


def test_transcribes_a_spoken_wav():
    transcriber = Transcriber()
    assert Path(default_asr_model(), "model.bin").is_file()  # the embedded tiny.en, offline
    text = transcriber.transcribe(SPOKEN).lower()
    assert "capital" in text and "france" in text


def test_respond_streams_a_growing_answer(chat_app):
    torch.manual_seed(0)
    states = list(chat_app.respond([], "Hello there", None, "tiny-random", **SAMPLING))
    first_history = states[0][0]
    assert first_history == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": ""}]
    answers = [history[-1]["content"] for history, _, _ in states[1:]]
    streamed, final = answers[:-1], answers[-1]
    assert len(set(streamed)) >= 3, f"expected several partial answers, got {streamed}"
    assert all(later.startswith(earlier) for earlier, later in zip(streamed, streamed[1:], strict=False))
    assert final and not final.startswith(WARNING)
    assert all(textbox == "" for _, textbox, _ in states)  # the textbox is cleared as soon as the turn is sent


def test_spoken_text_joins_the_typed_text(chat_app):
    torch.manual_seed(0)
    history = list(chat_app.respond([], "Please answer:", str(SPOKEN), "tiny-random", **SAMPLING))[-1][0]
    user = history[-2]["content"].lower()
    assert user.startswith("please answer:") and "capital" in user and "france" in user
    assert history[-1]["role"] == "assistant" and history[-1]["content"]


def test_adapter_answers_differently_from_its_base(chat_app):
    answers = []
    for value in ("tiny-random", adapter_value(chat_app)):
        torch.manual_seed(0)
        answers.append(list(chat_app.respond([], "Name this emoji: 🐙", None, value, **SAMPLING))[-1][0][-1]["content"])
    assert all(answer and not answer.startswith(WARNING) for answer in answers)
    assert answers[0] != answers[1]


def test_empty_message_is_a_warning_and_the_app_keeps_serving(chat_app):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    states = list(chat_app.respond(history, "   ", None, "tiny-random", **SAMPLING))
    assert len(states) == 1
    shown = states[0][0]
    assert shown[:2] == history and "message is empty" in shown[-1]["content"]
    torch.manual_seed(0)
    assert list(chat_app.respond(shown, "again", None, "tiny-random", **SAMPLING))[-1][0][-1]["content"]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda path: write_wav(path, 2.0), "No speech was heard"),
        (lambda path: path.write_bytes(b"RIFF\x00\x00not really a wave file" * 20) and path, "Could not read"),
        (lambda path: path.write_bytes(b"") and path, "missing or empty"),
    ],
    ids=["silent", "corrupt", "empty-file"],
)
def test_bad_audio_is_a_warning(chat_app, tmp_path, make, expected):
    path = tmp_path / "input.wav"
    make(path)
    states = list(chat_app.respond([], "", str(path), "tiny-random", **SAMPLING))
    assert len(states) == 1
    assert states[0][0][-1]["content"].startswith(WARNING) and expected in states[0][0][-1]["content"]


def test_ten_minute_audio_is_rejected_before_decoding(tmp_path):
    long = write_wav(tmp_path / "long.wav", 600.0)
    assert audio_duration(long) == pytest.approx(600.0)
    transcriber = Transcriber(max_seconds=120)
    start = time.perf_counter()
    with pytest.raises(AudioError, match=r"600 s long; the limit is 120 s"):
        transcriber.transcribe(long)
    assert time.perf_counter() - start < 2.0
    assert transcriber._model is None  # rejected before Whisper was even loaded


def test_a_model_deleted_after_listing_gives_a_message(runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    app = ChatApp(runs_dir=str(root), base_model="tiny-random")
    doomed = adapter_value(app)
    shutil.rmtree(doomed)
    states = list(app.respond([], "Hello", None, doomed, **SAMPLING))
    assert "no longer exists" in states[-1][0][-1]["content"] and "Refresh models" in states[-1][0][-1]["content"]
    with pytest.raises(ModelUnavailableError):
        app.cache.get(doomed)
    torch.manual_seed(0)
    later = list(app.respond(states[-1][0], "Hello", None, "tiny-random", **SAMPLING))[-1][0]
    assert later[-1]["content"] and not later[-1]["content"].startswith(WARNING)
    assert history_to_chat(later) == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": later[-1]["content"]}]


def test_gradio_content_blocks_become_plain_text():
    assert message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert message_text("plain") == "plain"
    history = [
        {"role": "user", "content": [{"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": WARNING + "The model failed"},
        {"role": "user", "content": "q2"},
    ]
    assert history_to_chat(history) == [{"role": "user", "content": "q2"}]


def test_cli_lists_the_ui_options(capsys):
    from lit_llama_lab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["ui", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--host", "--port", "--share", "--runs_dir", "--asr_model", "--max_audio_seconds", "--cache_size"):
        assert option in help_text
    assert "127.0.0.1" in help_text


def test_the_cli_serves_on_localhost(tmp_path):
    """``lit-llama-lab ui`` starts a real server bound to 127.0.0.1 only."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "lit_llama_lab.cli", "ui", "--port", str(port), "--runs_dir", str(tmp_path),
               "--base_model", "tiny-random"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    assert response.status == 200 and b"lit-llama-lab chat" in response.read()
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.5)
        else:
            pytest.fail("the UI did not answer within 120 s")
        listening = [line for line in Path("/proc/net/tcp").read_text().splitlines() if f":{port:04X} " in line]
        assert listening and all(line.split()[1].startswith("0100007F") for line in listening)  # 127.0.0.1 only
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_build_app_wires_a_queued_blocks(chat_app):
    demo = __import__("lit_llama_lab.tools.ui.app", fromlist=["build_app"]).build_app(chat_app, concurrency=1)
    assert demo._queue.default_concurrency_limit == 1
    assert {"model", "chat", "message", "audio", "send", "clear", "refresh"} <= {
        block.elem_id for block in demo.blocks.values()
    }


@pytest.mark.slow
def test_smollm2_answers_a_spoken_question(tmp_path):
    app = ChatApp(runs_dir=str(tmp_path))
    history = list(app.respond([], "", str(SPOKEN), "smollm2-135m", max_new_tokens=24, temperature=0.0))[-1][0]
    assert "capital" in history[0]["content"].lower()
    assert "paris" in history[-1]["content"].lower()
