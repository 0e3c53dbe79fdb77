"""Chats → ``input_ids`` + ``labels`` with loss on assistant tokens only, for any chat template.

No marker strings are hard-coded: the template is rendered for growing prefixes of the chat and the text each
assistant message adds (its content and the template's end-of-turn token) is located by character offsets, then
mapped onto the tokens of the whole rendered chat. Everything else is labelled ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_llama_lab.model.tokens import end_of_turn_token

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


def _end_of_turn(tokenizer) -> str | None:
    """The template's end-of-turn token, found once per tokenizer and template (rendering it costs a template call)."""
    key = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_lit_llama_lab_eot", None)
    if cached is None or cached[0] != key:
        cached = (key, end_of_turn_token(tokenizer) or tokenizer.eos_token)
        tokenizer._lit_llama_lab_eot = cached
    return cached[1]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the ``[start, end)`` character span of each assistant turn, end-of-turn included.

    A turn's span runs from the end of the assistant prompt (``<|im_start|>assistant\\n``) to the end of the
    template's end-of-turn token; whitespace the template adds after that token is not trained.
    """
    text = _render(tokenizer, messages)
    eot = _end_of_turn(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
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


def _labels_from_offsets(input_ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
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
    return labels


def assistant_labels_batch(tokenizer, chats: list[list[dict]], max_length: int | None = None) -> list[TokenizedChat]:
    """:func:`assistant_labels` for many chats with one (parallel, much faster) tokenizer call."""
    rendered = [assistant_char_spans(tokenizer, messages) for messages in chats]
    if not rendered:
        return []
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), input_ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        labels = _labels_from_offsets(input_ids, offsets, spans)
        truncated = max_length is not None and len(input_ids) > max_length
        if truncated:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        out.append(TokenizedChat(input_ids, labels, truncated))
    return out


def assistant_labels(tokenizer, messages: list[dict], max_length: int | None = None) -> TokenizedChat:
    """Tokenize a chat; labels equal ``input_ids`` on assistant tokens (end-of-turn included), -100 elsewhere.

    ``max_length`` truncates from the right; check :attr:`TokenizedChat.num_labels` for examples left without
    any trained token.
    """
    return assistant_labels_batch(tokenizer, [messages], max_length)[0]


def labelled_next_tokens(labels) -> int:
    """How many positions of a ``[batch, seq]`` label tensor predict a labelled next token (the loss's count)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
