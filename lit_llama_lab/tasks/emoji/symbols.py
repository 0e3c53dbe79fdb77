"""Contrast chats for the emoji task: questions about Unicode symbols that are not emoji, answered with their
Unicode name ("⇐ is the leftwards double arrow symbol.").

Why: trained on emoji questions alone, the model learns "an emoji-looking question gets '… is the X emoji.'"
and treats every other question as an ordinary one. A held-out emoji whose question token is a common symbol
token no training question holds (" ↩" of ↩️, " ©" of ©️: one token each, as for only 4 of the 3,091 trained
emoji) is then answered as an ordinary question, at the base's length, and runs past the answer budget. Symbols
from the same Unicode blocks, named in the same one-sentence template, teach where the emoji end and that any
symbol question gets a short, true, ending answer. The pool comes from Python's own ``unicodedata`` (offline)
and excludes every code point of every emoji, in any qualification, so no emoji (and so no held-out emoji) is
ever a contrast row.
"""

from __future__ import annotations

import functools
import random
import unicodedata

from lit_llama_lab.tasks.emoji.rows import pick_wording

# The Basic Multilingual Plane's symbol blocks that emoji are also drawn from, and Latin-1's symbols.
SYMBOL_BLOCKS = (
    (0x00A1, 0x00BF), (0x00D7, 0x00D7), (0x00F7, 0x00F7),  # Latin-1 symbols (°, ±, §, ×, ÷…)
    (0x2010, 0x205E),  # General Punctuation (†, ‡, •, ‰…)
    (0x20A0, 0x20C0),  # Currency Symbols
    (0x2100, 0x214F),  # Letterlike Symbols
    (0x2190, 0x21FF),  # Arrows
    (0x2200, 0x22FF),  # Mathematical Operators
    (0x2300, 0x23FF),  # Miscellaneous Technical
    (0x2460, 0x24FF),  # Enclosed Alphanumerics
    (0x25A0, 0x25FF),  # Geometric Shapes
    (0x2600, 0x26FF),  # Miscellaneous Symbols
    (0x2700, 0x27BF),  # Dingbats
    (0x27F0, 0x27FF),  # Supplemental Arrows-A
    (0x2900, 0x297F),  # Supplemental Arrows-B
    (0x2B00, 0x2BFF),  # Miscellaneous Symbols and Arrows
    (0x3200, 0x32FF),  # Enclosed CJK Letters and Months
)
SYMBOL_CATEGORIES = frozenset({"So", "Sm", "Sc", "Sk", "No", "Po"})


@functools.lru_cache(maxsize=1)
def symbol_pool() -> tuple[tuple[str, str], ...]:
    """Every named symbol of :data:`SYMBOL_BLOCKS` that is no part of any emoji, as ``(character, name)`` with the
    Unicode name lower-cased (``("⇐", "leftwards double arrow")``)."""
    import emoji

    emoji_points = {c for e in emoji.EMOJI_DATA for c in e}
    pool = []
    for first, last in SYMBOL_BLOCKS:
        for point in range(first, last + 1):
            char = chr(point)
            if char in emoji_points or unicodedata.category(char) not in SYMBOL_CATEGORIES:
                continue
            name = unicodedata.name(char, "")
            if name:
                pool.append((char, name.lower()))
    return tuple(pool)


def symbol_answer(char: str, name: str, style: str | None = "name") -> str:
    """The answer to a question about a symbol, in the emoji answer ``style``'s shape: "⇐ is the leftwards double
    arrow symbol." (``name_no_copy``: "That is the …"); a name that ends in "sign" or "symbol" keeps it alone
    ("€ is the euro sign.")."""
    what = name if name.endswith((" sign", " symbol")) else f"{name} symbol"
    return f"That is the {what}." if style == "name_no_copy" else f"{char} is the {what}."


def contrast_chats(count: int, seed: int, style: str | None = None) -> list[list[dict]]:
    """``count`` seeded symbol questions (each symbol once; at most the whole pool), asked in the training
    wordings, answered by :func:`symbol_answer`."""
    pool = symbol_pool()
    picked = random.Random(f"symbols:{seed}").sample(range(len(pool)), min(count, len(pool)))
    chats = []
    for i, index in enumerate(picked):
        char, name = pool[index]
        wording = pick_wording(i, seed)
        chats.append([{"role": "user", "content": wording.format(e=char)},
                      {"role": "assistant", "content": symbol_answer(char, name, style)}])
    return chats
