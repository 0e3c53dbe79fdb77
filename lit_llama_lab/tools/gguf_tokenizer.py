"""The tokenizer half of a GGUF file: vocabulary, merges, pre-tokenizer name, special ids and chat template.

llama.cpp splits text before BPE with a regex it picks by the ``tokenizer.ggml.pre`` name; a wrong name loads
fine and tokenizes differently (or, for a name it does not know, refuses to load). llama.cpp's own converter
finds the name by tokenizing one fixed text and hashing the ids; :func:`pre_tokenizer_name` does the same with
the hashes of the tokenizers this project exports, so a Llama 3 tokenizer gets ``llama-bpe`` and SmolLM2's
``smollm``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

# llama.cpp's fixed check text (``get_vocab_base_pre`` of its converter), reproduced character for character:
# the hashes below are of ``str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT))``, so one changed byte breaks them.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 of the check text's ids -> llama.cpp pre-tokenizer name, for the tokenizer families we export.
# Values as llama.cpp 0.3.36's converter has them (Meta-Llama-3-8B, SmolLM-135M, openai-community/gpt2).
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
_LOOKS_SPECIAL = re.compile(r"^<\|.*\|>$")


class TokenizerExportError(ValueError):
    """A tokenizer GGUF cannot represent faithfully; the message names the fix."""


def pre_tokenizer_hash(tokenizer) -> str:
    """The sha256 llama.cpp's converter computes: of ``str(tokenizer.encode(check text))`` (special tokens added)."""
    return hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer, source_gguf: Path | None = None, override: str | None = None) -> str:
    """The ``tokenizer.ggml.pre`` llama.cpp should split text with.

    In order: ``override``; the name whose hash matches (as llama.cpp's converter decides); the name in the GGUF the
    base came from; else :class:`TokenizerExportError` naming the hash and the fix.
    """
    if override:
        return override
    digest = pre_tokenizer_hash(tokenizer)
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    if source_gguf is not None and Path(source_gguf).is_file():
        import gguf

        field = gguf.GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return field.contents()
    raise TokenizerExportError(
        f"No llama.cpp pre-tokenizer is known for this tokenizer (check-text hash {digest[:16]}…): llama.cpp would "
        "split its text differently. Pass --gguf_pre NAME with the name llama.cpp's convert_hf_to_gguf.py gives "
        "this tokenizer family, or --gguf none to skip GGUF."
    )


def token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text (byte-level spelling, ``Ġ`` for a space) and GGUF token type, ``vocab_size`` long.

    Special added tokens, and added ones that look special (``<|…|>``), are CONTROL; other added tokens
    USER_DEFINED; ids the tokenizer lacks (embedding rows kept for padding) ``[PAD<id>]`` placeholders, UNUSED.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise TokenizerExportError(f"GGUF export supports byte-level BPE tokenizers only, not {model.get('type')!r}.")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            control = added["special"] or _LOOKS_SPECIAL.match(added["content"])
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED
    return tokens, types


def _merges(tokenizer) -> list[str]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def adds_bos(tokenizer) -> bool:
    """Whether encoding plain text prepends bos (Llama 3: yes; SmolLM2: no): llama.cpp should do the same."""
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos, eos, eot, unk and pad ids to write. eos is the tokenizer's (our end-of-turn after ``fix_special_tokens``);
    eot is the token the chat template ends an assistant turn with, so llama.cpp stops where training stops."""
    from lit_llama_lab.model.tokens import end_of_turn_token

    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        ids["eot"] = tokenizer.convert_tokens_to_ids(eot)
    return {key: value for key, value in ids.items() if value is not None}


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    """Write the byte-level BPE vocabulary, merges, ``pre``, special ids, bos rule and chat template of ``tokenizer``."""
    tokens, types = token_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    for key, token_id in special_token_ids(tokenizer).items():
        getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
