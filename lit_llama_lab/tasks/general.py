"""The general-ability suite: ordinary chat prompts with checkable expectations, and the pool of replay prompts.

``data/general_suite.jsonl`` holds one item a line, ``{"id", "category", "prompt", "check"}``; the check is a dict
of conditions that must all hold for an answer to count as correct (:func:`check_answer`):

- ``any``: at least one of these phrases appears; ``all``: every one appears;
- ``count``: ``{"min": k, "of": [...]}``, at least ``k`` distinct items appear (an item may be a list of synonyms;
  plural forms count: "apples" for "apple", "cherries" for "cherry"; a mention inside a longer item's mention
  counts for the longer item only: "C++" is not also "C");
- ``number``: the answer states this number on its own ("84", "84.0", "1,000", "= 84"; not "184" or "8.4"); a
  spelled-out English number from zero to a hundred counts too, except "one" (also a pronoun);
- ``yesno``: the first yes/no word of the answer is the expected ``"yes"`` or ``"no"``;
- ``regex``: a Python regex that must ``search`` the answer, case-insensitively (``(?-i:...)`` for case);
- ``none``: none of these phrases appears.

Phrases match case-insensitively on whole words (a phrase's words may be split by spaces or hyphens), with
accents removed and typographic quotes made plain on both sides. ``data/replay_prompts.jsonl`` holds general
prompts (``{"prompt"}``) for the frozen base model to answer once, as replay during fine-tuning. They were written
to ask nothing the suite asks, and no replay prompt repeats a suite prompt, nears its wording or holds its content
words (:mod:`lit_llama_lab.tasks.overlap`; ``tests/test_general.py`` checks the bundled files).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import emoji

DATA = Path(__file__).parent / "data"
SUITE_FILE = DATA / "general_suite.jsonl"
REPLAY_FILE = DATA / "replay_prompts.jsonl"
ROW_KEYS = ("id", "category", "prompt", "check")
CHECK_KEYS = ("any", "all", "count", "number", "yesno", "regex", "none")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"', "\u2212": "-",
                         "\u2013": "-", "\u00a0": " "})
_EMOJI_WORD = re.compile(r"(?<!\w)emojis?(?!\w)", re.IGNORECASE)
# One number: optional minus, digits with optional thousands groups, optional decimals; not glued to a letter or a
# digit before it (the 84 of "184", the 2 of "H2O"), nor the tail of a decimal ("8.4" holds no 4).
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)(?!\.\d)")
_YES = ("yes", "yeah", "yep", "yup", "true")
_NO = ("no", "nope", "nah", "false", "incorrect")
# "not true" / "isn't correct" are a no, tried before the bare words. A bare "correct" is left out: "the correct
# answer is no" starts with it.
_YESNO = re.compile(r"((?:(?<!\w)not\s+|n't\s+)(?:true|correct)|(?<!\w)(?:" + "|".join(_YES + _NO) + r"))(?!\w)")
# "yes or no" / "true or false" name the choice, they are no answer (an answer may repeat the question's wording).
_CHOICE = re.compile(r"(?<!\w)(?:yes or no|true or false)(?!\w)")
_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


class SuiteError(ValueError):
    """A suite or replay file that cannot be used; the message names the file, the line and the problem."""


def normalize(text: str, casefold: bool = True) -> str:
    """``text`` with accents removed, typographic quotes and dashes made plain, and (by default) casefolded."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text.translate(_QUOTES)) if not unicodedata.combining(c))
    return text.casefold() if casefold else text


@cache
def _phrase(phrase: str, plural: bool = False) -> re.Pattern:
    """Whole-word pattern for ``phrase`` (already normalized): words split by spaces or hyphens, optional plural."""
    words = [re.escape(word) for word in phrase.split()]
    if plural:
        last = words[-1]
        words[-1] = f"{last[:-1]}(?:y|ies)" if re.search(r"[^aeiou]y$", last) else f"{last}(?:e?s)?"
    body = r"[\s-]+".join(words)
    left = r"(?<!\w)" if re.match(r"\w", phrase) else ""
    right = r"(?!\w)" if re.search(r"\w$", phrase) else ""
    return re.compile(left + body + right)


def has_phrase(answer: str, phrase: str, plural: bool = False) -> bool:
    """True when ``phrase`` appears in ``answer`` as whole words (case, accents and quote styles ignored)."""
    return _phrase(normalize(phrase).strip(), plural).search(normalize(answer)) is not None


def numbers_in(answer: str) -> list[float]:
    """The standalone numbers written in digits in ``answer``, in order ("1,000" is 1000, "-3" is -3)."""
    return [float(match.replace(",", "")) for match in _NUMBER.findall(normalize(answer))]


def number_words(value: float) -> list[str]:
    """English words for an integer from 0 to 100 other than 1 ("twenty-one"), else nothing."""
    if value != int(value) or not 0 <= value <= 100 or value == 1:
        return []
    n = int(value)
    if n == 100:
        return ["one hundred", "a hundred"]
    if n < 20:
        return [_UNITS[n]]
    return [_TENS[n // 10] + (f" {_UNITS[n % 10]}" if n % 10 else "")]


def states_number(answer: str, value: float) -> bool:
    """True when ``answer`` states ``value`` as a standalone number, in digits or (0-100) in words."""
    if any(abs(found - value) < 1e-9 for found in numbers_in(answer)):
        return True
    return any(has_phrase(answer, words) for words in number_words(value))


def first_yesno(answer: str) -> str | None:
    """``"yes"`` or ``"no"``: the first yes/no word of ``answer`` ("yeah", "true", "nope", "not true", ...)."""
    match = _YESNO.search(_CHOICE.sub(" ", normalize(answer)))
    if match is None:
        return None
    return "yes" if match.group(1) in _YES else "no"


def _counted(answer: str, count: dict) -> int:
    """Distinct items of ``count["of"]`` named in ``answer``. A mention inside a longer item's mention is that item
    alone: "C++" is not also "C", "sea turtle" not also "turtle"."""
    text = normalize(answer)
    items = [[item] if isinstance(item, str) else item for item in count["of"]]
    found = [(match.start(), match.end(), index) for index, item in enumerate(items) for phrase in item
             for match in _phrase(normalize(phrase).strip(), True).finditer(text)]

    def inside_another(start: int, end: int, index: int) -> bool:
        return any(other != index and s <= start and end <= e and (s, e) != (start, end) for s, e, other in found)

    return len({index for start, end, index in found if not inside_another(start, end, index)})


def check_answer(answer: str, check: dict) -> bool:
    """True when ``answer`` meets every condition of ``check`` (see the module docstring for the check types)."""
    conditions = {
        "any": lambda phrases: any(has_phrase(answer, p) for p in phrases),
        "all": lambda phrases: all(has_phrase(answer, p) for p in phrases),
        "none": lambda phrases: not any(has_phrase(answer, p) for p in phrases),
        "count": lambda count: _counted(answer, count) >= count["min"],
        "number": lambda value: states_number(answer, value),
        "yesno": lambda expected: first_yesno(answer) == expected,
        "regex": lambda pattern: re.search(pattern, normalize(answer, casefold=False), re.IGNORECASE) is not None,
    }
    unknown = set(check) - set(conditions)
    if unknown:
        raise ValueError(f"Unknown check keys {sorted(unknown)}; known: {list(CHECK_KEYS)}.")
    return all(conditions[key](value) for key, value in check.items())


def mentions_emoji(answer: str) -> bool:
    """Template leakage: ``answer`` says "emoji"/"emojis" (any case) or holds an emoji character."""
    return _EMOJI_WORD.search(answer) is not None or emoji.emoji_count(answer) > 0


def _is_phrases(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, str) and p.strip() for p in value)


def check_problem(check) -> str | None:
    """What is wrong with ``check`` (a sentence), or None when it is a valid check."""
    if not isinstance(check, dict) or not check:
        return "check must be a non-empty object"
    unknown = sorted(set(check) - set(CHECK_KEYS))
    if unknown:
        return f"unknown check keys {unknown} (known: {', '.join(CHECK_KEYS)})"
    for key in ("any", "all", "none"):
        if key in check and not _is_phrases(check[key]):
            return f"'{key}' must be a non-empty list of non-empty strings"
    if "count" in check:
        count = check["count"]
        if not (isinstance(count, dict) and set(count) == {"min", "of"} and isinstance(count["min"], int)
                and isinstance(count["of"], list) and 1 <= count["min"] <= len(count["of"])
                and all(_is_phrases([item] if isinstance(item, str) else item) for item in count["of"])):
            return "'count' must be {\"min\": k, \"of\": [phrases or lists of synonyms]} with 1 <= k <= len(of)"
    if "number" in check and (isinstance(check["number"], bool) or not isinstance(check["number"], int | float)):
        return "'number' must be a number"
    if "yesno" in check and check["yesno"] not in ("yes", "no"):
        return "'yesno' must be \"yes\" or \"no\""
    if "regex" in check:
        try:
            re.compile(check["regex"])
        except (re.error, TypeError) as error:
            return f"'regex' does not compile: {error}"
    return None


def _row_problem(row, seen: set[str]) -> str | None:
    if not isinstance(row, dict) or set(row) != set(ROW_KEYS):
        return f"an item must have exactly the keys {list(ROW_KEYS)}"
    if not all(isinstance(row[key], str) and row[key].strip() for key in ("id", "category", "prompt")):
        return "id, category and prompt must be non-empty strings"
    if row["id"] in seen:
        return f"duplicate id {row['id']!r}"
    if mentions_emoji(row["prompt"]):
        return f"prompt of {row['id']!r} mentions emoji"
    problem = check_problem(row["check"])
    return f"{row['id']}: {problem}" if problem else None


def _json_lines(path: Path) -> Iterable[tuple[int, object]]:
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise SuiteError(f"{path}:{number}: not valid JSON ({error.msg})") from None


def load_suite(path: str | Path = SUITE_FILE) -> list[dict]:
    """The suite's items, validated: exact keys, unique ids, known and well-formed checks, compiling regexes,
    no prompt mentioning emoji. A bad file raises :class:`SuiteError` naming the file, the line and the problem."""
    rows: list[dict] = []
    seen: set[str] = set()
    for number, row in _json_lines(path):
        problem = _row_problem(row, seen)
        if problem:
            raise SuiteError(f"{path}:{number}: {problem}")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise SuiteError(f"{path}: holds no items")
    return rows


def replay_prompts(path: str | Path = REPLAY_FILE) -> list[str]:
    """The replay pool: general prompts for the frozen base to answer, unique, none mentioning emoji."""
    prompts: list[str] = []
    seen: set[str] = set()
    for number, row in _json_lines(path):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise SuiteError(f"{path}:{number}: a line must be {{\"prompt\": non-empty string}}")
        if mentions_emoji(prompt) or prompt in seen:
            raise SuiteError(f"{path}:{number}: prompt mentions emoji or repeats an earlier one: {prompt!r}")
        seen.add(prompt)
        prompts.append(prompt)
    return prompts


def general_records(rows: Sequence[dict], answers: Sequence[str]) -> list[dict]:
    """One record per suite item and its answer: id, category, prompt, answer, correct, leaks."""
    if len(rows) != len(answers):
        raise ValueError(f"{len(rows)} suite items but {len(answers)} answers.")
    return [
        {"id": row["id"], "category": row["category"], "prompt": row["prompt"], "answer": answer,
         "correct": check_answer(answer, row["check"]), "leaks": mentions_emoji(answer)}
        for row, answer in zip(rows, answers, strict=True)
    ]


def score_general(records: Sequence[dict]) -> dict:
    """``accuracy``, ``leakage`` (share of answers mentioning emoji), ``answers`` and ``accuracy/<category>``."""
    if not records:
        raise ValueError("No records to score.")
    metrics = {
        "accuracy": sum(bool(r["correct"]) for r in records) / len(records),
        "leakage": sum(bool(r["leaks"]) for r in records) / len(records),
        "answers": len(records),
    }
    for category in sorted({r["category"] for r in records}):
        group = [r for r in records if r["category"] == category]
        metrics[f"accuracy/{category}"] = sum(bool(r["correct"]) for r in group) / len(group)
    return metrics
