"""Assistant-only labels: exactly the assistant tokens (content + end-of-turn), for three input formats under two
chat templates (SmolLM2's ChatML and a Llama-3-style template), with no marker string known to the code."""

import pytest
from transformers import AutoTokenizer

from lit_llama_lab.data.formats import row_to_messages
from lit_llama_lab.data.masking import IGNORE_INDEX, assistant_labels, assistant_labels_batch
from lit_llama_lab.model.folders import converted_folder
from lit_llama_lab.model.source import resolve_model_source
from lit_llama_lab.model.tokens import fix_special_tokens

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ROWS = {
    "sharegpt": {"conversations": [
        {"from": "system", "value": "You answer in one sentence."},
        {"from": "human", "value": "What is 2 + 2?"},
        {"from": "gpt", "value": "2 + 2 equals 4."},
        {"from": "human", "value": "And 3 + 3?"},
        {"from": "gpt", "value": "3 + 3 equals 6, twice three."},
    ]},
    "messages": {"messages": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, like grass 🌱."},
    ]},
    "alpaca": {"instruction": "Reverse the word.", "input": "stressed", "output": "desserts"},
}


@pytest.fixture(scope="module")
def smol(smol_tokenizer):
    return smol_tokenizer


@pytest.fixture(scope="module")
def llama3():
    """SmolLM2's vocabulary with Llama 3's special tokens and chat template (no download)."""
    tokenizer = AutoTokenizer.from_pretrained(converted_folder(resolve_model_source("smollm2-135m")))
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    fix_special_tokens(tokenizer)
    assert tokenizer.eos_token == "<|eot_id|>"
    return tokenizer


def labelled_runs(chat) -> list[list[int]]:
    """The contiguous runs of trained tokens."""
    runs, current = [], []
    for token, label in zip(chat.input_ids, chat.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["smol", "llama3"])
@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_labels_are_exactly_the_assistant_turns(template, fmt, request):
    tokenizer = request.getfixturevalue(template)
    messages = row_to_messages(ROWS[fmt], fmt)
    chat = assistant_labels(tokenizer, messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = labelled_runs(chat)
    assert [tokenizer.decode(run) for run in runs] == [a + tokenizer.eos_token for a in answers]
    # everything else (system, user, role headers, template text) is untrained but present in the input
    text = tokenizer.decode(chat.input_ids)
    assert all(m["content"] in text for m in messages)
    assert chat.num_labels == sum(len(r) for r in runs)


def test_labels_under_llama3_skip_header_tokens(llama3):
    chat = assistant_labels(llama3, row_to_messages(ROWS["messages"], "messages"))
    header = {llama3.convert_tokens_to_ids(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>")}
    trained = {t for t, label in zip(chat.input_ids, chat.labels, strict=True) if label != IGNORE_INDEX}
    assert not trained & header
    assert llama3.convert_tokens_to_ids("<|eot_id|>") in trained


def test_truncation_keeps_the_prefix_and_flags_it(smol):
    messages = row_to_messages(ROWS["sharegpt"], "sharegpt")
    full = assistant_labels(smol, messages)
    cut = assistant_labels(smol, messages, max_length=len(full.input_ids) - 5)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:-5] and cut.labels == full.labels[:-5]
    assert assistant_labels(smol, messages, max_length=10).num_labels == 0


def test_batch_matches_one_by_one(smol):
    chats = [row_to_messages(ROWS[f], f) for f in sorted(ROWS)]
    assert assistant_labels_batch(smol, chats, 64) == [assistant_labels(smol, c, 64) for c in chats]
