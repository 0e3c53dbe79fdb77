"""An Ollama ``Modelfile`` for an exported GGUF: the chat template in Ollama's Go template syntax and its stops.

Nothing is hand-written per model family: the template's pieces are read off the tokenizer's own (Jinja) chat
template by rendering chats with marker contents (:func:`chat_frame`), and the stop strings are the end-of-turn
token training stops at (:func:`lit_llama_lab.model.tokens.end_of_turn_token`) plus the token that opens a turn. Every
literal of the Go template is a quoted Go string (``{{ "<|im_end|>\\n" }}``), so Go's whitespace trimming can never
eat a newline the model was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
_MARK = "Qz{}mark"


class TemplateError(ValueError):
    """A chat template whose turns cannot be read off as prefix + content + suffix per role."""


@dataclass(frozen=True)
class ChatFrame:
    """What a chat template wraps around each turn: ``frames[role] = (prefix, suffix)``; ``preamble`` once before
    the first turn (bos for Llama 3), ``generation`` after the last to open the assistant's answer, and
    ``default_system`` the system prompt the template inserts when a chat has none ("" when it inserts none)."""

    frames: dict[str, tuple[str, str]]
    preamble: str
    generation: str
    default_system: str


def _render(tokenizer, chat: list[dict], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)


def _strip(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise TemplateError(f"The chat template does not render {what} as a plain extension of the chat before it.")
    return text[len(prefix):]


def chat_frame(tokenizer) -> ChatFrame:
    """Read the per-role framing off ``tokenizer.chat_template`` by rendering marker chats and diffing them.

    Raises :class:`TemplateError` for templates whose turns are not ``prefix + content + suffix`` (e.g. ones that
    rewrite earlier turns); such a model needs a hand-written Modelfile TEMPLATE.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("The tokenizer has no chat template: set one before exporting (tokenizer.chat_template).")
    chat = [{"role": "system", "content": _MARK.format(0)}]
    rendered = _render(tokenizer, chat)
    frames = {}
    for i, role in enumerate(("user", "assistant", "user", "system"), start=1):
        longer = [*chat, {"role": role, "content": _MARK.format(i)}]
        text = _render(tokenizer, longer)
        turn = _strip(text, rendered, f"a {role} turn")
        before, marker, after = turn.partition(_MARK.format(i))
        if not marker:
            raise TemplateError(f"The chat template drops the content of a {role} turn.")
        if frames.setdefault(role, (before, after)) != (before, after):
            raise TemplateError(f"The chat template frames {role} turns differently by position.")
        chat, rendered = longer, text
    sys_prefix, sys_suffix = frames["system"]
    first = _render(tokenizer, chat[:1])
    preamble = first[: first.index(_MARK.format(0))]
    preamble = preamble[: len(preamble) - len(sys_prefix)] if preamble.endswith(sys_prefix) else preamble
    generation = _strip(_render(tokenizer, chat, generation=True), rendered, "the generation prompt")
    return ChatFrame(frames, preamble, generation, _default_system(tokenizer, frames, preamble))


def _default_system(tokenizer, frames: dict[str, tuple[str, str]], preamble: str) -> str:
    """The system prompt the template adds to a chat that has none, read off a user-only chat."""
    user = _MARK.format(9)
    text = _strip(_render(tokenizer, [{"role": "user", "content": user}]), preamble, "a user-only chat")
    head = text[: text.index(user) - len(frames["user"][0])]
    prefix, suffix = frames["system"]
    if not head:
        return ""
    if not (head.startswith(prefix) and head.endswith(suffix)):
        raise TemplateError("The chat template adds text before a user-only chat that is no system turn.")
    return head[len(prefix): len(head) - len(suffix)]


def _go(text: str) -> str:
    """``text`` as a Go template action printing it (a JSON string is a valid Go string literal)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(frame: ChatFrame, runtime_bos: str | None = None) -> str:
    """Ollama's TEMPLATE for ``frame``: every message in order, then the assistant prompt after a last user turn.

    The preamble is left out when it is ``runtime_bos``: the bos token the runtime adds itself (the GGUF's
    ``add_bos_token``), which the template would otherwise double.
    """
    lines = [_go(frame.preamble) if frame.preamble != runtime_bos else "", "{{- range $i, $_ := .Messages }}",
             "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
    for n, role in enumerate(ROLES):
        prefix, suffix = frame.frames[role]
        keyword = "if" if n == 0 else "else if"
        closing = f"{{{{- if not $last }}}}{_go(suffix)}{{{{- end }}}}" if role == "assistant" else _go(suffix)
        lines.append(f'{{{{- {keyword} eq .Role "{role}" }}}}{_go(prefix)}{{{{ .Content }}}}{closing}')
    lines += ["{{- end }}", f'{{{{- if and $last (ne .Role "assistant") }}}}{_go(frame.generation)}{{{{- end }}}}',
              "{{- end }}"]
    return "\n".join(line for line in lines if line)


def stop_strings(tokenizer) -> list[str]:
    """The Modelfile's ``PARAMETER stop`` values: the end-of-turn token, then the token that opens a new turn."""
    from lit_llama_lab.model.tokens import end_of_turn_token

    eot = end_of_turn_token(tokenizer)
    if eot is None:
        raise TemplateError("The chat template ends assistant turns with no special token: nothing to stop at.")
    stops = [eot]
    prefix = chat_frame(tokenizer).frames["user"][0]
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    opener = next((t for t in specials if t and prefix.startswith(t)), None)
    if opener and opener not in stops:
        stops.append(opener)
    return stops


def modelfile_text(gguf_name: str, tokenizer, adds_bos: bool) -> str:
    """The Modelfile for the GGUF file ``gguf_name`` lying beside it."""
    frame = chat_frame(tokenizer)
    template = go_template(frame, tokenizer.bos_token if adds_bos else None)
    if '"""' in template:
        raise TemplateError('The chat template holds """, which a Modelfile TEMPLATE cannot quote.')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if frame.default_system:
        lines.append(f"SYSTEM {json.dumps(frame.default_system, ensure_ascii=False)}")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stop_strings(tokenizer)]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer, adds_bos: bool) -> Path:
    """Write ``<name>.Modelfile`` beside ``gguf_path`` (``ollama create NAME -f <that file>``); returns its path."""
    path = Path(gguf_path).with_suffix(".Modelfile")
    path.write_text(modelfile_text(Path(gguf_path).name, tokenizer, adds_bos), encoding="utf-8")
    return path
