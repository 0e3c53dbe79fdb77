"""Chats → ``input_ids`` + ``labels`` with loss on assistant tokens only, for any chat template.

No marker strings are hard-coded: the template is rendered for growing prefixes of the chat and the text each
assistant message adds (its content and the template's end-of-turn token) is located by character offsets, then
mapped onto the tokens of the whole rendered chat. Everything else is labelled ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_llama_lab.models import end_of_turn_token

IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    """The chat template renders a chat in a way the assistant spans cannot be located in."""


@dataclass
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_labels(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the ``[start, end)`` character span of each assistant turn, end-of-turn included.

    A turn's span runs from the end of the assistant prompt (``<|im_start|>assistant\\n``) to the end of the
    template's end-of-turn token; whitespace the template adds after that token is not trained.
    """
    text = _render(tokenizer, messages)
    eot = end_of_turn_token(tokenizer) or tokenizer.eos_token
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(prompt) and text.startswith(through) and len(through) > len(prompt)):
            raise ChatTemplateError(
                "The chat template does not render a chat as the concatenation of its turns, so assistant tokens "
                "cannot be located; use a template where each turn only appends text."
            )
        start, end = len(prompt), len(through)
        eot_at = text.rfind(eot, start, end) if eot else -1
        if eot_at >= 0:
            end = eot_at + len(eot)
        spans.append((start, end))
    return text, spans


def assistant_labels(tokenizer, messages: list[dict], max_length: int | None = None) -> TokenizedChat:
    """Tokenize a chat; labels equal ``input_ids`` on assistant tokens (end-of-turn included), -100 elsewhere.

    ``max_length`` truncates from the right; check :attr:`TokenizedChat.num_labels` for examples left without
    any trained token.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for t, (begin, finish) in enumerate(offsets):
        while span_index < len(spans) and begin >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        start, end = spans[span_index]
        if begin >= start and finish <= end and finish > begin:
            labels[t] = input_ids[t]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedChat(input_ids, labels, truncated)
