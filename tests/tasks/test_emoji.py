from lit_llama_lab.tasks.emoji.rows import (
    COLUMNS,
    HELDOUT_WORDINGS,
    TRAIN_WORDINGS,
    build_emoji_rows,
    cldr_short_name,
    emoji_answer,
    emoji_messages,
    flag_letters,
)


def test_rows_have_public_dataset_columns_and_cover_all_fully_qualified_emoji():
    rows = build_emoji_rows()
    assert len(rows) >= 3500
    assert all(tuple(r) == COLUMNS for r in rows)
    assert len({r["character"] for r in rows}) == len(rows)
    by_char = {r["character"]: r for r in rows}
    assert by_char["🐼"]["short description"] == "panda"
    assert by_char["🇺🇸"]["short description"] == "flag: United States"
    assert by_char["🎂"]["short description"] == "birthday cake"
    assert by_char["🤌"]["short description"] == "pinched fingers"
    assert by_char["🐼"]["unicode"] == "U+1F43C"
    assert "panda face" in by_char["🐼"]["tags"]


def test_descriptions_name_the_emoji_and_state_its_version():
    for row in build_emoji_rows()[::97]:
        text = row["LLM description"]
        assert text.startswith(f"{row['character']} is the {row['short description']} emoji.")
        assert "It was added in Emoji" in text


def test_cldr_names_restore_punctuation():
    assert cldr_short_name("👋🏽", ":waving_hand_medium_skin_tone:") == "waving hand: medium skin tone"
    assert cldr_short_name("#️⃣", ":keycap_#:") == "keycap: #"
    assert (cldr_short_name("💑🏿", ":couple_with_heart_man_man_dark_skin_tone_light_skin_tone:")
            == "couple with heart man man: dark skin tone, light skin tone")


def test_answers_name_the_emoji_and_flags_spell_their_letters():
    rows = {r["character"]: r for r in build_emoji_rows()}
    assert emoji_answer(rows["🐼"]) == "🐼 is the panda emoji."
    assert emoji_answer(rows["🇩🇿"]) == "🇩🇿 (DZ) is the flag: Algeria emoji."
    assert flag_letters("🐼") is None
    chat = emoji_messages(rows["🎂"], wording=TRAIN_WORDINGS[0])
    assert chat == [{"role": "user", "content": "What is 🎂?"},
                    {"role": "assistant", "content": "🎂 is the birthday cake emoji."}]


def test_the_no_copy_style_never_repeats_the_emoji_and_every_answer_scores_as_its_own_name(smol_tokenizer):
    from lit_llama_lab.tasks.emoji.scoring import names_emoji

    rows = build_emoji_rows()
    by_char = {r["character"]: r for r in rows}
    assert emoji_answer(by_char["🐼"], "name_no_copy") == "That is the panda emoji."
    assert emoji_answer(by_char["🇩🇿"], "name_no_copy") == "Its letters are DZ: it is the flag: Algeria emoji."
    assert all(r["character"] not in emoji_answer(r, "name_no_copy") for r in rows)
    assert all(names_emoji(emoji_answer(r, "name_no_copy"), r["short description"]) for r in rows)
    # what the style was built around: the emoji after the question's space and at the answer's start differ as tokens
    tok = smol_tokenizer
    spaced = tok(" \u21a9\ufe0f", add_special_tokens=False).input_ids
    leading = tok("\u21a9\ufe0f", add_special_tokens=False).input_ids
    assert not set(spaced[:1]) & set(leading)


def test_heldout_wordings_never_used_in_training():
    assert not set(HELDOUT_WORDINGS) & set(TRAIN_WORDINGS)
    assert all("{e}" in w for w in HELDOUT_WORDINGS + TRAIN_WORDINGS)


def test_contrast_symbols_are_no_part_of_any_emoji_and_are_named_in_the_answer_template():
    import unicodedata

    import emoji

    from lit_llama_lab.tasks.emoji.symbols import contrast_chats, symbol_answer, symbol_pool

    pool = symbol_pool()
    points = {c for e in emoji.EMOJI_DATA for c in e}
    assert len(pool) > 1500 and not {c for c, _ in pool} & points  # ↩, ©, ™ are emoji: never contrast rows
    assert ("\u21d0", "leftwards double arrow") in pool and ("\u20ac", "euro sign") in pool
    assert symbol_answer("\u21d0", "leftwards double arrow") == "\u21d0 is the leftwards double arrow symbol."
    assert symbol_answer("\u20ac", "euro sign", "name_no_copy") == "That is the euro sign."
    chats = contrast_chats(300, seed=42)
    assert len(chats) == 300 and chats == contrast_chats(300, seed=42) and chats != contrast_chats(300, seed=1)
    assert len({c[0]["content"] for c in chats}) == 300
    for user, assistant in chats:
        char = assistant["content"].split(" is the ")[0]
        assert char in user["content"] and unicodedata.name(char).lower() in assistant["content"]
        assert "emoji" not in assistant["content"]
    assert len(contrast_chats(10**6, seed=0)) == len(pool)


def test_contrast_ratio_adds_symbol_chats_to_training_only_and_refuses_bad_values(tmp_path):
    import json

    import pytest

    from lit_llama_lab.data.datamodule import ChatDataModule

    plain = ChatDataModule(source="emoji", tokenizer="tiny-random", batch_size=8)
    plain.setup()
    data = ChatDataModule(source="emoji", tokenizer="tiny-random", batch_size=8, contrast_ratio=0.1)
    data.setup()
    added = len(data.splits["train"]) - len(plain.splits["train"])
    assert added == round(0.1 * len(plain.rows["train"])) > 300
    assert {k: len(v) for k, v in data.splits.items() if k != "train"} == \
        {k: len(v) for k, v in plain.splits.items() if k != "train"}
    tok = data.tokenizer
    texts = [tok.decode(ids) for ids in data.splits["train"][-added:]["input_ids"]]
    assert all(" symbol." in t or " sign." in t for t in texts) and not any(" emoji." in t for t in texts)
    with pytest.raises(ValueError, match=r"contrast_ratio must be in \[0, 1\).*got 1.0"):
        ChatDataModule(contrast_ratio=1.0)
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    other = ChatDataModule(source=str(chats), tokenizer="tiny-random", test_fraction=0, val_fraction=0,
                           contrast_ratio=0.1)
    with pytest.raises(ValueError, match="the messages format has none: set it to 0"):
        other.setup()
