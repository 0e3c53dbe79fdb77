"""How close two prompts are, to keep the replay pool apart from the general-ability suite.

Three criteria, any one of which makes a replay prompt too close to a suite prompt (:func:`too_close`):

- the same text once normalized (case, accents, punctuation and spacing ignored);
- near-identical wording: a character similarity (``difflib`` ratio) of at least :data:`MAX_RATIO`;
- the same content: a word-set Jaccard of at least :data:`MAX_JACCARD`, or the replay prompt containing at least
  :data:`MAX_CONTAINMENT` of the suite prompt's content words (asking the same thing in other words:
  "Tell me France's capital city" holds both content words of "What is the capital of France?").

Content words: lowercase words with stop words and question words removed (except inside quotes: in
'Translate "how are you" into Spanish' the quoted words are what is asked), arithmetic signs as words
("+" -> "plus"), possessives dropped and plurals reduced ("legs" -> "leg", "countries" -> "country").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from difflib import SequenceMatcher
from functools import cache

from lit_llama_lab.tasks.general import normalize

# Suite prompts are short (2-6 content words). Two prompts of one template with different topics ("Translate
# 'cat' into Spanish" / "Translate 'bread' into Spanish") share all but one word each: Jaccard 2/4 = 0.5. At 0.6
# the template-mates pass, while two prompts sharing 3 of 4 words, or 4 of 5, with one other word are caught.
MAX_JACCARD = 0.6
# A replay prompt that contains every content word of a 2-, 3- or 4-word suite prompt (and 4 of 5) asks the same
# thing, whatever else it adds; 0.8 lets a 3-word suite prompt share 2 words with a different question.
MAX_CONTAINMENT = 0.8
# Near-identical wording: a changed number ("What is 15 + 27?" / "What is 15 + 28?": 0.92) or a few characters.
# Not lower: different questions of one template already score 0.8-0.88 ("What is the tallest building in the
# world?" / "What is the tallest mountain in the world?"), and the word criteria catch a shared topic.
MAX_RATIO = 0.9
# Containment needs at least this many suite content words: one shared word is not the same question.
MIN_CONTAINED = 2
STOP_WORDS = frozenset(
    "a an the of in on at to for from by with into about as and or but if then than so is are was were be been "
    "being am do does did have has had can could would should will shall may might must what which who whom whose "
    "when where why how many much this that these those it its i me my you your we our they their he she his her "
    "there here some any please tell give name say write answer yes no not one me let us just also very".split()
)
_SIGNS = {"+": " plus ", "×": " times ", "*": " times ", "÷": " divided ", "/": " divided ", "%": " percent ",
          "=": " equals ", "^": " power "}
_QUOTED = re.compile(r'"([^"]*)"')


@cache
def plain(text: str) -> str:
    """``text`` normalized for comparison: casefolded, accents removed, arithmetic signs as words, other
    punctuation dropped, spaces collapsed."""
    text = re.sub(r"(?<=\d)\s*-\s*(?=\d)|\s-\s", " minus ", re.sub(r"'s\b", "", normalize(text)))
    text = "".join(_SIGNS.get(char, char) for char in text)
    return " ".join(re.findall(r"[a-z0-9]+", text))


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@cache
def content_words(text: str) -> frozenset[str]:
    """The content words of ``text``: stop words removed outside quotes, plurals reduced."""
    quoted = " ".join(_QUOTED.findall(normalize(text)))
    words = [word for word in plain(_QUOTED.sub(" ", normalize(text))).split() if word not in STOP_WORDS]
    return frozenset(_stem(word) for word in words + plain(quoted).split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Shared words over all words of the two sets (0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 0.0


def containment(inner: frozenset[str], outer: frozenset[str]) -> float:
    """The share of ``inner``'s words that ``outer`` holds (0 for an empty ``inner``)."""
    return len(inner & outer) / len(inner) if inner else 0.0


def closeness(replay: str, suite_prompt: str) -> str | None:
    """Which criterion makes ``replay`` too close to ``suite_prompt`` (a phrase), or None."""
    a, b = plain(replay), plain(suite_prompt)
    if a == b:
        return "same text"
    words_a, words_b = content_words(replay), content_words(suite_prompt)
    if jaccard(words_a, words_b) >= MAX_JACCARD:
        return f"Jaccard {jaccard(words_a, words_b):.2f}"
    if len(words_b) >= MIN_CONTAINED and containment(words_b, words_a) >= MAX_CONTAINMENT:
        return f"holds {containment(words_b, words_a):.0%} of its content words"
    if 2 * min(len(a), len(b)) < MAX_RATIO * (len(a) + len(b)):  # the ratio's upper bound, without a matcher
        return None
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    if matcher.quick_ratio() >= MAX_RATIO and matcher.ratio() >= MAX_RATIO:
        return f"character similarity {matcher.ratio():.2f}"
    return None


def too_close(replay: str, suite_prompts: Iterable[str]) -> str | None:
    """The first suite prompt that ``replay`` is too close to, with the criterion, or None."""
    for suite_prompt in suite_prompts:
        reason = closeness(replay, suite_prompt)
        if reason:
            return f"{suite_prompt} [{reason}]"
    return None
