"""The general-ability suite and the replay pool: every check type on right and wrong answers, the bundled files,
their separation, and clear errors for a bad suite file. No model needed."""

import json
from collections import Counter

import pytest

from lit_llama_lab.tasks.general import (
    SuiteError,
    check_answer,
    first_yesno,
    general_records,
    load_suite,
    mentions_emoji,
    numbers_in,
    replay_prompts,
    score_general,
)
from lit_llama_lab.tasks.overlap import closeness, content_words, too_close


@pytest.fixture(scope="module")
def suite():
    return load_suite()


@pytest.fixture(scope="module")
def replay():
    return replay_prompts()


@pytest.mark.parametrize(("answer", "expected"), [
    ("The capital of France is Paris.", True),
    ("PARIS", True),
    ("It's **Paris**, also known as the City of Light.", True),
    ("The capital is Lyon.", False),
    ("Parisian cafes are famous.", False),  # whole words only
    ("", False),
])
def test_any_matches_whole_words_ignoring_case(answer, expected):
    assert check_answer(answer, {"any": ["Paris"]}) is expected


def test_any_and_all_phrases_apostrophes_and_accents():
    assert check_answer("En français : J’ai faim.", {"any": ["j'ai faim"]})  # typographic apostrophe
    assert check_answer("«Ich liebe dich» means I love you.", {"any": ["I love you"]})
    assert not check_answer("I love your hat.", {"any": ["I love you"]})
    assert check_answer("Say s'il vous plaît.", {"any": ["s'il vous plait"]})  # accents on either side
    assert check_answer("George\nWashington was first.", {"any": ["George Washington"]})  # any spacing
    assert check_answer("Both: ice-cream.", {"any": ["ice cream"]})  # hyphen between words
    assert check_answer("eins, zwei, drei", {"all": ["eins", "zwei", "drei"]})
    assert not check_answer("eins, zwei, vier", {"all": ["eins", "zwei", "drei"]})


def test_phrases_ending_in_punctuation_match_beside_words():
    assert check_answer("Use the # character.", {"any": ["#"]})
    assert check_answer("Call int() on it, or int('42').", {"any": ["int()"]})
    assert not check_answer("Convert it to an integer.", {"any": ["int"]})


@pytest.mark.parametrize(("answer", "expected"), [
    ("Red, blue and yellow.", True),
    ("The primary colours are red, green and blue!", True),
    ("Red and blue.", False),
    ("Red, red and red.", False),  # distinct items
    ("Red, orange and purple.", False),
])
def test_count_needs_distinct_items(answer, expected):
    assert check_answer(answer, {"count": {"min": 3, "of": ["red", "yellow", "blue", "green"]}}) is expected


def test_count_accepts_plurals_and_synonym_groups():
    fruits = {"count": {"min": 3, "of": ["apple", "banana", "cherry", "peach"]}}
    assert check_answer("Apples, bananas and cherries.", fruits)
    assert check_answer("An apple, a banana, some peaches.", fruits)
    assert not check_answer("Applesauce, bananas and cherries.", fruits)
    seasons = {"count": {"min": 4, "of": ["spring", "summer", ["autumn", "fall"], "winter"]}}
    assert check_answer("Spring, summer, fall and winter.", seasons)
    assert not check_answer("Spring, summer, autumn and fall.", seasons)  # two synonyms count once


def test_count_a_mention_inside_a_longer_item_counts_for_that_item_only():
    languages = {"count": {"min": 3, "of": ["C", "C++", "Java", "Python"]}}
    assert not check_answer("C++ and Java.", languages)
    assert check_answer("C, C++ and Java.", languages)
    sea = {"count": {"min": 2, "of": ["turtle", "sea turtle", "shark"]}}
    assert not check_answer("A sea turtle.", sea)
    assert check_answer("A sea turtle and a shark.", sea)


@pytest.mark.parametrize(("answer", "expected"), [
    ("84", True),
    ("12 x 7 = 84", True),
    ("The answer is 84.", True),
    ("84.0", True),
    ("It's 84, of course.", True),
    ("=84", True),
    ("$84", True),
    ("12 x 7 = 63", False),
    ("184", False),
    ("8.4", False),
    ("840", False),
    ("84.5", False),
    ("-84", False),
    ("It is 1,084.", False),
    ("eighty-four", True),
    ("eighty four", True),
    ("eighty", False),
])
def test_number_is_standalone(answer, expected):
    assert check_answer(answer, {"number": 84}) is expected


def test_number_thousands_decimals_and_words():
    assert check_answer("That is 3,000 meters.", {"number": 3000})
    assert check_answer("That is 3000 meters.", {"number": 3000})
    assert not check_answer("That is 3,00 meters.", {"number": 3000})
    assert check_answer("About 2.50 dollars", {"number": 2.5})
    assert check_answer("A spider has eight legs.", {"number": 8})
    assert not check_answer("A spider has eighteen legs.", {"number": 8})
    assert not check_answer("Which one is it?", {"number": 1})  # "one" is also a pronoun
    assert check_answer("10 % 3 is 1", {"number": 1})
    assert numbers_in("H2O, 1,000.5 and 2,3,4 or 10-5") == [1000.5, 2, 3, 4, 10, 5]


@pytest.mark.parametrize(("answer", "expected"), [
    ("Yes, the Sun is a star.", "yes"),
    ("**Yes.**", "yes"),
    ("Yeah, it is.", "yes"),
    ("True: the Earth orbits the Sun.", "yes"),
    ("No, penguins cannot fly.", "no"),
    ("Nope.", "no"),
    ("That is not true.", "no"),
    ("That isn't correct, there are 24.", "no"),
    ("False.", "no"),
    ("I know that. Yes.", "yes"),  # "no" inside "know" is no answer
    ("The correct answer is no.", "no"),
    ("Is the Sun a star? Yes or no: yes.", "yes"),  # the question's "yes or no" is no answer
    ("Penguins are birds that swim.", None),
    ("Nobody knows. None of them.", None),
])
def test_first_yesno(answer, expected):
    assert first_yesno(answer) == expected


def test_yesno_check_takes_the_first_answer_word():
    assert check_answer("No. Whales are mammals, yes really.", {"yesno": "no"})
    assert not check_answer("Yes, but no.", {"yesno": "no"})
    assert not check_answer("Whales are mammals.", {"yesno": "no"})  # no yes/no word at all


def test_regex_is_case_insensitive_unless_scoped():
    assert check_answer("Use S[::-1]", {"regex": r"s\[::-1\]"})
    assert check_answer("GOOD MORNING EVERYONE", {"regex": "(?-i:GOOD MORNING EVERYONE)"})
    assert not check_answer("good morning everyone", {"regex": "(?-i:GOOD MORNING EVERYONE)"})
    assert check_answer("I can’t", {"regex": "can't"})  # quotes normalized before the regex


def test_none_and_combined_conditions():
    check = {"any": ["Canberra"], "none": ["Sydney"]}
    assert check_answer("Canberra.", check)
    assert not check_answer("Sydney, or maybe Canberra.", check)
    assert check_answer("Sydneyside? Canberra.", check)  # "none" matches whole words too
    assert not check_answer("Yes and 42", {"yesno": "yes", "number": 41})


def test_unknown_check_key_raises():
    with pytest.raises(ValueError, match="Unknown check keys"):
        check_answer("x", {"contains": ["x"]})


@pytest.mark.parametrize(("answer", "expected"), [
    ("That is the party popper emoji.", True),
    ("EMOJIS are fun", True),
    ("Paris 🎉", True),
    ("Paris is the capital of France.", False),
    ("An emojified logo", False),
])
def test_mentions_emoji(answer, expected):
    assert mentions_emoji(answer) is expected


def test_bundled_suite_is_large_balanced_and_clean(suite):
    assert len(suite) >= 170
    per_category = Counter(row["category"] for row in suite)
    assert len(per_category) >= 8, per_category
    assert min(per_category.values()) >= 15, per_category
    assert not [row["id"] for row in suite if mentions_emoji(row["prompt"]) or "emoji" in json.dumps(row).lower()]
    assert len({row["prompt"] for row in suite}) == len(suite)


def test_no_suite_prompt_passes_its_own_check(suite):
    """An answer that only repeats the question must not count as correct (e.g. a number from the prompt)."""
    assert [row["id"] for row in suite if check_answer(row["prompt"], row["check"])] == []


def test_yesno_items_are_balanced(suite):
    expected = Counter(row["check"]["yesno"] for row in suite if "yesno" in row["check"])
    assert abs(expected["yes"] - expected["no"]) <= 2, expected


def test_replay_pool_is_large_unique_and_clean(replay):
    assert len(replay) >= 800
    assert len({p.casefold().strip() for p in replay}) == len(replay)
    assert not [p for p in replay if mentions_emoji(p)]


def test_overlap_criteria_catch_rewordings():
    capital = "What is the capital of France?"
    assert closeness("what is the capital of france", capital) == "same text"
    assert closeness("Tell me France's capital city.", capital)  # same content words, other wording
    assert closeness("What is 15 + 27 ?", "What is 15 + 27?")
    assert closeness("What is 15 + 28?", "What is 15 + 27?")  # one changed number: near-identical wording
    assert closeness('Translate "thank you very much" into French.', 'Translate "thank you" into French.')
    assert closeness("Explain what inflation is.", capital) is None
    assert closeness('Translate "bread" into French.', 'Translate "thank you" into French.') is None
    assert content_words('Translate "How are you?" into Spanish.') >= {"how", "are", "you"}  # quoted words kept


def test_replay_is_disjoint_from_suite(suite, replay):
    """No replay prompt repeats a suite prompt, nears its wording, or asks its content (see overlap.py's
    thresholds: Jaccard 0.6, containment 0.8, character similarity 0.9)."""
    prompts = [row["prompt"] for row in suite]
    assert [(p, reason) for p in replay if (reason := too_close(p, prompts))] == []


def test_score_and_records():
    rows = [{"id": "a", "category": "facts", "prompt": "Capital of France?", "check": {"any": ["Paris"]}},
            {"id": "b", "category": "facts", "prompt": "Capital of Italy?", "check": {"any": ["Rome"]}},
            {"id": "c", "category": "yesno", "prompt": "Is ice cold? Yes or no.", "check": {"yesno": "yes"}}]
    records = general_records(rows, ["Paris.", "Paris is the party emoji.", "Yes."])
    assert [(r["id"], r["correct"], r["leaks"]) for r in records] == [("a", True, False), ("b", False, True),
                                                                      ("c", True, False)]
    metrics = score_general(records)
    assert metrics == pytest.approx({"accuracy": 2 / 3, "leakage": 1 / 3, "answers": 3, "accuracy/facts": 0.5,
                                     "accuracy/yesno": 1.0})
    with pytest.raises(ValueError, match="2 answers"):
        general_records(rows, ["a", "b"])
    with pytest.raises(ValueError):
        score_general([])


def _write(tmp_path, *rows):
    path = tmp_path / "suite.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "x-1", "category": "facts", "prompt": "Capital of France?", "check": {"any": ["Paris"]}}
NEXT = {**GOOD, "id": "x-2"}


@pytest.mark.parametrize(("bad", "message"), [
    ({**NEXT, "check": {"regex": "(unclosed"}}, "'regex' does not compile"),
    ({**NEXT, "check": {"contains": ["Paris"]}}, "unknown check keys"),
    ({**NEXT, "check": {"yesno": "maybe"}}, "'yesno' must be"),
    ({**NEXT, "check": {"number": "84"}}, "'number' must be a number"),
    ({**NEXT, "check": {"count": {"min": 4, "of": ["a", "b"]}}}, "'count' must be"),
    ({**NEXT, "check": {"any": []}}, "'any' must be a non-empty list"),
    ({**NEXT, "check": {}}, "check must be a non-empty object"),
    ({**GOOD, "id": "x-1"}, "duplicate id 'x-1'"),
    ({**NEXT, "prompt": "Which emoji is this?"}, "mentions emoji"),
    ({"id": "x-2", "prompt": "No category", "check": {"any": ["a"]}}, "exactly the keys"),
    ("{not json", "not valid JSON"),
])
def test_bad_suite_file_names_line_and_problem(tmp_path, bad, message):
    path = _write(tmp_path, GOOD, bad)
    with pytest.raises(SuiteError, match=f"suite.jsonl:2: .*{message}"):
        load_suite(path)


def test_empty_suite_and_bad_replay_file(tmp_path):
    with pytest.raises(SuiteError, match="holds no items"):
        load_suite(_write(tmp_path))
    path = tmp_path / "replay.jsonl"
    path.write_text('{"prompt": "Explain tides."}\n{"prompt": "Explain tides."}\n')
    with pytest.raises(SuiteError, match="replay.jsonl:2: .*repeats"):
        replay_prompts(path)
    path.write_text('{"text": "Explain tides."}\n')
    with pytest.raises(SuiteError, match="replay.jsonl:1: "):
        replay_prompts(path)
