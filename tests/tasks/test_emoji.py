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
