"""The one generation path: the sample callback, evaluation and the UI all call :func:`generate`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lit_llama_lab.model.adapters import unwrap_peft
from lit_llama_lab.speed.attention import VARLEN

Chat = list[dict]


@dataclass
class Generation:
    """One answer: its text (special tokens removed), its new token ids, and whether it ended with eos."""

    text: str
    token_ids: list[int]
    stopped: bool


def chat_prompt_ids(tokenizer, chat: Chat) -> list[int]:
    """Token ids of ``chat`` rendered with the tokenizer's chat template and the assistant prompt appended."""
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])


@torch.no_grad()
def generate(
    model,
    tokenizer,
    chats: Sequence[Chat],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    min_p: float | None = None,
    batch_size: int = 16,
    streamer=None,
    progress: str | None = None,
) -> list[Generation]:
    """Answer each chat; greedy when ``temperature`` is 0. Batched with left padding, stops at eos.

    ``streamer`` (e.g. transformers' ``TextIteratorStreamer``) receives tokens as they come; it needs a single
    chat. ``progress``: a progress bar of that title over the batches. The model's training/eval mode is restored
    afterwards. Runs eagerly even when training compiled the
    decoder layers: a growing KV cache would recompile them at every new length. A model training with FlashAttention
    varlen (:data:`lit_llama_lab.speed.attention.VARLEN`) generates through sdpa, then gets varlen back: transformers builds no
    mask for varlen, so the left padding here would be attended to. A model with an ``answer_chats`` method (a GGUF in
    llama.cpp) answers through it, with its own tokenizer and chat template.
    """
    if streamer is not None and len(chats) != 1:
        raise ValueError("Streaming needs exactly one chat.")
    if hasattr(model, "answer_chats"):  # another runtime (lit_llama_lab.tools.llamacpp.LlamaCppModel): its own tokenizer
        return model.answer_chats(chats, max_new_tokens=max_new_tokens, temperature=temperature, min_p=min_p)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(p for p in model.parameters()).device
    was_training = model.training
    causal_lm = unwrap_peft(model)
    attention = causal_lm.config._attn_implementation
    if attention == VARLEN:
        causal_lm.set_attn_implementation("sdpa")
    model.eval()
    results: list[Generation] = []
    try:
        with torch.compiler.set_stance("force_eager"):
            starts = range(0, len(chats), batch_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc=progress, unit="batch")
            for start in starts:
                prompts = [chat_prompt_ids(tokenizer, chat) for chat in chats[start:start + batch_size]]
                width = max(map(len, prompts))
                input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
                attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
                sampling = temperature > 0
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=sampling,
                    temperature=temperature if sampling else None,
                    min_p=min_p if sampling else None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    streamer=streamer,
                )
                for row in output[:, width:].tolist():
                    stopped = eos in row
                    new = row[: row.index(eos)] if stopped else row
                    results.append(Generation(tokenizer.decode(new, skip_special_tokens=True).strip(), new, stopped))
    finally:
        model.train(was_training)
        if attention == VARLEN:
            causal_lm.set_attn_implementation(attention)
    return results
