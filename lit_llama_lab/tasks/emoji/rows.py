"""The offline emoji dataset, built from the ``emoji`` package's Unicode/CLDR data.

Rows carry the columns of the public ``badrex/llm-emoji-dataset`` (``character``, ``unicode``,
``short description``, ``tags``, ``LLM description``) so either source feeds the same code.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

COLUMNS = ("character", "unicode", "short description", "tags", "LLM description")

# Question wordings. TRAIN_WORDINGS may appear in training data; HELDOUT_WORDINGS never do: the evaluation
# uses them to measure whether the model learned the emoji or only the sentence.
TRAIN_WORDINGS = (
    "What is {e}?",
    "What does {e} mean?",
    "What is this emoji: {e}",
    "Describe the emoji {e}.",
    "{e} — what is it called?",
    "Explain {e}",
    "Which emoji is {e}?",
    "What's the name of {e}?",
)
HELDOUT_WORDINGS = (
    "Could you identify this emoji for me? {e}",
    "I received {e} in a message. Which emoji is that?",
    "Name the following emoji: {e}",
    "Tell me what {e} represents.",
    "Hey, what do people call {e}?",
)

SKIN_TONES = ("medium-light skin tone", "medium-dark skin tone", "light skin tone", "medium skin tone", "dark skin tone")
# Emoji version -> year it was released (Emoji 0.6/0.7 are the Unicode 6.0/7.0 sets from Japanese carriers).
EMOJI_YEARS = {0.6: 2010, 0.7: 2014, 1: 2015, 2: 2015, 3: 2016, 4: 2016, 5: 2017, 11: 2018, 12: 2019,
               12.1: 2019, 13: 2020, 13.1: 2020, 14: 2021, 15: 2022, 15.1: 2023, 16: 2024, 17: 2025}


def _is_flag(character: str) -> bool:
    points = [ord(c) for c in character]
    regional = all(0x1F1E6 <= p <= 0x1F1FF for p in points) and len(points) == 2
    subdivision = points[0] == 0x1F3F4 and any(0xE0020 <= p <= 0xE007F for p in points)
    return regional or subdivision


def cldr_short_name(character: str, package_name: str) -> str:
    """The CLDR short name (``flag: United States``, ``waving hand: medium skin tone``) from the package's
    ``:United_States:``-style name, which drops CLDR's punctuation."""
    name = package_name.strip(":").replace("_", " ")
    if _is_flag(character):
        return f"flag: {name}"
    if name.startswith("keycap "):
        return "keycap: " + name[len("keycap "):]
    match = re.search(r"(?<=\S) (?:" + "|".join(map(re.escape, SKIN_TONES)) + ")", name)
    if match:
        rest = re.sub(r"skin tone (?=\S)", "skin tone, ", name[match.start() + 1:])
        return f"{name[:match.start()]}: {rest}"
    return name


def _year(version: float) -> int | None:
    return EMOJI_YEARS.get(version) or EMOJI_YEARS.get(int(version))


def describe(character: str, name: str, aliases: Sequence[str], version: float) -> str:
    """A one-to-three sentence description that names the emoji and stays true to the Unicode data."""
    text = f"{character} is the {name} emoji."
    others = [a for a in aliases if a.lower() != name.lower()]
    if others:
        text += " It is also called " + " or ".join(others[:2]) + "."
    year = _year(version)
    text += f" It was added in Emoji {version:g}" + (f" ({year})." if year else ".")
    return text


def build_emoji_rows() -> list[dict]:
    """Every fully-qualified emoji as a row with the public dataset's columns (about 3,960 rows)."""
    import emoji

    fully_qualified = emoji.STATUS["fully_qualified"]
    rows = []
    for character, data in emoji.EMOJI_DATA.items():
        if data["status"] != fully_qualified:
            continue
        name = cldr_short_name(character, data["en"])
        aliases = [a.strip(":").replace("_", " ") for a in data.get("alias", [])]
        aliases = [a for a in aliases if not a.lower().startswith("flag for ")]
        rows.append(
            {
                "character": character,
                "unicode": " ".join(f"U+{ord(c):04X}" for c in character),
                "short description": name,
                "tags": ", ".join(dict.fromkeys([name, *aliases])),
                "LLM description": describe(character, name, aliases, data["E"]),
            }
        )
    return rows


def flag_letters(character: str) -> str | None:
    """The two letters a regional-indicator flag spells (🇩🇿 → "DZ"), or None for other emoji."""
    points = [ord(c) for c in character]
    if len(points) == 2 and all(0x1F1E6 <= p <= 0x1F1FF for p in points):
        return "".join(chr(p - 0x1F1E6 + ord("A")) for p in points)
    return None


ANSWER_STYLES = ("name", "name_fact", "name_no_copy", "description")


def row_fact(row: dict) -> str | None:
    """One short true sentence about the emoji from its ``LLM description`` column, other than the one naming it
    (the first sentence that contains neither the emoji nor its short name), or None when there is none."""
    character, name = row["character"], row["short description"].casefold()
    for sentence in re.split(r"(?<=[.!?])\s+", str(row.get("LLM description") or "").strip()):
        if sentence and character not in sentence and name not in sentence.casefold() and len(sentence) <= 200:
            return sentence
    return None


def emoji_answer(row: dict, style: str = "name") -> str:
    """The assistant's answer: ``name`` is "{e} is the {short description} emoji.", ``name_fact`` the same followed
    by one short true sentence from the row (:func:`row_fact`), ``name_no_copy`` the name without repeating the
    emoji ("That is the panda emoji."; flags: "Its letters are DZ: it is the flag: Algeria emoji."), ``description``
    the full LLM description column.

    ``name_no_copy`` was tried against the few answers that run on instead of ending (↩️, ©️: an emoji whose
    question token, such as " ↩", no training question holds). It did not remove them: on one H200, 3 of 4 runs
    ended every answer, the fourth did not ([retention.md](docs/retention.md#the-answers-that-do-not-end-2026-12-01));
    ``name`` stays the default.
    """
    if style == "description":
        return row["LLM description"]
    if style in ("name", "name_fact"):
        letters = flag_letters(row["character"])
        code = f" ({letters})" if letters else ""
        answer = f"{row['character']}{code} is the {row['short description']} emoji."
        fact = row_fact(row) if style == "name_fact" else None
        return f"{answer} {fact}" if fact else answer
    if style == "name_no_copy":
        letters = flag_letters(row["character"])
        lead = f"Its letters are {letters}: it is" if letters else "That is"
        return f"{lead} the {row['short description']} emoji."
    raise ValueError(f"Unknown emoji answer style {style!r}: use one of {', '.join(ANSWER_STYLES)}.")


def emoji_messages(row: dict, wording: str = TRAIN_WORDINGS[0], style: str = "name") -> list[dict]:
    """One emoji row as a chat: the user asks about the emoji, the assistant answers."""
    return [
        {"role": "user", "content": wording.format(e=row["character"])},
        {"role": "assistant", "content": emoji_answer(row, style)},
    ]


def pick_wording(index: int, seed: int, wordings: Sequence[str] = TRAIN_WORDINGS) -> str:
    """A seeded, per-row choice of wording: varied across rows, stable across runs."""
    return wordings[random.Random(f"{seed}:{index}").randrange(len(wordings))]
