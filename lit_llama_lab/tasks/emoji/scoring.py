"""Strict emoji scoring: does an answer state the emoji's CLDR short name, word for word (and the old lenient
substring rule beside it, for one release)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from lit_llama_lab.tasks.emoji.rows import build_emoji_rows


def normalize(text: str) -> str:
    """Casefolded text with typographic apostrophes made plain and whitespace collapsed, for name matching."""
    return re.sub(r"\s+", " ", text.replace("\u2019", "'").replace("\u2018", "'")).casefold().strip()


WORD = re.compile(r"\w+|[#*]|[.!?\n]")  # name words (keycaps keep # and *), and sentence ends
NAME_STARTS = frozenset({"the", "a", "an", "called", "named"})
NAME_ENDS = frozenset({"emoji", "emojis", ".", "!", "?", "\n"})
MAX_NAME_WORDS = 16


def name_words(text: str) -> tuple[str, ...]:
    """A name as comparable words: casefolded, punctuation dropped (``#`` and ``*`` of keycaps kept), a leading
    ``flag`` dropped (``flag: United States`` → ``united states``)."""
    return _phrase(WORD.findall(normalize(text)))


@functools.lru_cache(maxsize=1)
def known_names() -> frozenset[tuple[str, ...]]:
    """Every emoji's CLDR short name as :func:`name_words`: what an answer can state as a name."""
    return frozenset(name_words(row["short description"]) for row in build_emoji_rows())


def stated_name(answer: str, known: frozenset[tuple[str, ...]] | None = None) -> tuple[str, ...] | None:
    """The emoji name ``answer`` states first, as :func:`name_words`, or None when it states none.

    A name is stated as a phrase that starts after ``the``/``a``/``an``/``called``/``named`` or at the start of a
    sentence, and ends before the word ``emoji`` or at a sentence end: "🐼 is *the panda* emoji.", "It is called
    *panda*.". Of the phrases ending at the first end that closes a known name, the longest known one is the stated
    name, so "the sign of the horns emoji" states "sign of the horns", not "horns", and "the woman pouting emoji"
    states "woman pouting", never "man pouting".
    """
    known = known_names() if known is None else known
    tokens = WORD.findall(normalize(answer))
    starts = [-1]  # a phrase starts after one of these token positions
    for at, token in enumerate(tokens):
        if token in NAME_ENDS or at == len(tokens) - 1:
            end = at if token in NAME_ENDS else at + 1
            found = [words for s in starts if 0 < len(words := _phrase(tokens[s + 1:end])) <= MAX_NAME_WORDS
                     and words in known]
            if found:
                return max(found, key=len)
        if token in NAME_STARTS or token in ".!?\n":
            starts.append(at)
    return None


def _phrase(tokens: list[str]) -> tuple[str, ...]:
    words = [t for t in tokens if t not in ".!?\n"]
    return tuple(words[1:] if words[:1] == ["flag"] and len(words) > 1 else words)


def names_emoji(answer: str, name: str, known: frozenset[tuple[str, ...]] | None = None) -> bool:
    """Strict: True when the name ``answer`` states (:func:`stated_name`) equals the emoji's short name, word for
    word (case, punctuation and the ``flag:`` prefix ignored). A reference that only appears inside another name
    ("man pouting" in "woman pouting", "ox" in "bento box") does not count."""
    target = name_words(name)
    return stated_name(answer, (known_names() if known is None else known) | {target}) == target


def names_emoji_lenient(answer: str, name: str) -> bool:
    """The previous scoring, reported beside the strict one for one release: the short name appears anywhere in
    ``answer`` as a substring, ignoring case."""
    return normalize(name) in normalize(answer)


class EmojiAnswerMetrics(Metric):
    """Counts over generated answers: how many name the emoji (strictly, and by the old substring rule), how many
    ended with eos, and their token total.

    ``compute()`` returns ``name_accuracy`` (strict, :func:`names_emoji`), ``name_accuracy_lenient``
    (:func:`names_emoji_lenient`) and ``eos_rate`` (fractions), ``mean_answer_tokens`` and the raw counts ``named``,
    ``named_lenient``, ``stopped``, ``answers``.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for state in ("named", "named_lenient", "stopped", "tokens", "answers"):
            self.add_state(state, default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, answers: Sequence[str], names: Sequence[str], stopped: Sequence[bool],
               lengths: Sequence[int]) -> None:
        """Add a batch: answer texts, expected short names, eos flags and answer lengths in tokens."""
        if not len(answers) == len(names) == len(stopped) == len(lengths):
            raise ValueError("answers, names, stopped and lengths must have the same length.")
        self.named += sum(names_emoji(a, n) for a, n in zip(answers, names, strict=True))
        self.named_lenient += sum(names_emoji_lenient(a, n) for a, n in zip(answers, names, strict=True))
        self.stopped += sum(bool(s) for s in stopped)
        self.tokens += sum(int(n) for n in lengths)
        self.answers += len(answers)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.answers.clamp(min=1).float()
        return {
            "name_accuracy": self.named / total,
            "name_accuracy_lenient": self.named_lenient / total,
            "eos_rate": self.stopped / total,
            "mean_answer_tokens": self.tokens / total,
            "named": self.named,
            "named_lenient": self.named_lenient,
            "stopped": self.stopped,
            "answers": self.answers,
        }


def score(records: Sequence[dict]) -> dict[str, float | int]:
    """The answer metrics of ``records`` (see :class:`EmojiAnswerMetrics`) as plain numbers."""
    metric = EmojiAnswerMetrics()
    metric.update([r["answer"] for r in records], [r["name"] for r in records],
                  [r["stopped"] for r in records], [r["tokens"] for r in records])
    return {k: v.item() for k, v in metric.compute().items()}
