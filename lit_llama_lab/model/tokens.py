"""The special tokens training depends on: eos is the chat template's end-of-turn token, pad a token other than eos.

The one surprising thing: a GGUF conversion of SmolLM2 reads eos/pad/bos as ``<|im_start|>``; a model that pads with
its eos token never learns to stop when padding is masked by token id. No marker string is hard-coded: the end of
turn is read off the rendered chat template.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``…).

    Found by rendering a one-turn chat and reading the first special token after the assistant's text, so no
    marker string is hard-coded.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Zq7xmarker"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    tail = text[text.rindex(marker) + len(marker):]
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    for start in range(len(tail)):
        for token in specials:
            if token and tail.startswith(token, start):
                return token
    return None


def fix_special_tokens(tokenizer, model=None) -> None:
    """Make eos the template's end-of-turn token and pad a token other than eos, in tokenizer and model.

    Raises when no distinct pad token exists, naming the fix.
    """
    eot = end_of_turn_token(tokenizer)
    if eot is not None and tokenizer.eos_token != eot:
        log.info("eos token %r -> %r (the chat template's end of turn)", tokenizer.eos_token, eot)
        tokenizer.eos_token = eot
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has no eos token and its chat template names none: set one before training.")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        pad = _pick_pad_token(tokenizer)
        if pad is None:
            raise ValueError(
                f"pad token equals eos ({tokenizer.eos_token!r}) and the vocabulary has no spare token to pad with; "
                "add one (tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) and resize the embeddings)."
            )
        log.info("pad token %r -> %r (must differ from eos)", tokenizer.pad_token, pad)
        tokenizer.pad_token = pad
    if model is not None:
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                cfg.eos_token_id = tokenizer.eos_token_id
                cfg.pad_token_id = tokenizer.pad_token_id
                if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
                    cfg.bos_token_id = tokenizer.bos_token_id


def _pick_pad_token(tokenizer) -> str | None:
    vocab = tokenizer.get_vocab()
    candidates = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", tokenizer.unk_token, "<|endoftext|>"]
    for token in candidates:
        if token and token in vocab and token != tokenizer.eos_token:
            return token
    return None

