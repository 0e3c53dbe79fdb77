"""Packing: best-fit bins into one neutral batch form, and packed examples that see exactly what they would see alone
once ``speed.attention`` gives them their mask (sdpa, eager, flex)."""

import pytest
import torch

from lit_llama_lab.data.masking import assistant_labels
from lit_llama_lab.data.packing import (
    collate_packed,
    collate_padded,
    count_documents,
    document_ids,
    pack_balanced,
    pack_best_fit,
    pad_packed_batch,
    padding_efficiency,
)
from lit_llama_lab.model.load import load_base_model
from lit_llama_lab.speed.attention import attention_inputs
from lit_llama_lab.speed.loss import label_loss

CHATS = [
    [{"role": "user", "content": "What is 🐼?"}, {"role": "assistant", "content": "🐼 is the panda emoji."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"},
     {"role": "assistant", "content": "Rome."}, {"role": "user", "content": "And of Spain?"},
     {"role": "assistant", "content": "Madrid, on the Manzanares river."}],
    [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two, three, four, five."}],
]


def first_fit(lengths, capacity):
    bins = []
    for i, n in enumerate(lengths):
        for b in bins:
            if sum(lengths[j] for j in b) + n <= capacity:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


def test_pack_best_fit_places_every_index_once_within_capacity():
    lengths = [int(x) for x in torch.randint(1, 100, (500,), generator=torch.Generator().manual_seed(0))]
    bins = pack_best_fit(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 128
    assert len(bins) <= len(first_fit(lengths, 128))


def test_pack_best_fit_beats_first_fit_on_a_fixed_case():
    lengths, capacity = [3, 3, 3, 7, 7, 7], 10  # arrival order fills the first bin with the three 3s
    assert len(first_fit(lengths, capacity)) == 4
    bins = pack_best_fit(lengths, capacity)
    assert len(bins) == 3 and sorted(sorted(lengths[i] for i in b) for b in bins) == [[3, 7]] * 3


def test_pack_balanced_uses_as_many_rows_but_a_narrower_widest_row():
    lengths = [900, 800, 700, 300, 200, 100, 60, 40]
    best, even = pack_best_fit(lengths, 2048), pack_balanced(lengths, 2048)
    assert len(even) == len(best) == 2 and sorted(i for b in even for i in b) == list(range(8))
    widest = [max(sum(lengths[i] for i in b) for b in bins) for bins in (best, even)]
    assert widest == [2040, 1560]
    assert pack_balanced([10, 10, 10], 10) == [[0], [1], [2]]


def test_pack_best_fit_refuses_an_example_over_capacity():
    with pytest.raises(ValueError, match="more than the bin capacity"):
        pack_best_fit([5, 11], 10)


def test_document_ids_number_each_rows_examples_and_mark_padding():
    assert document_ids([[2, 3]], 6).tolist() == [[0, 0, 1, 1, 1, -1]]
    assert count_documents(document_ids([[2, 3], [4]], 6)) == 3


def test_packed_batches_are_neutral_and_padding_them_keeps_them_so():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    batch = collate_packed([examples], 0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}  # no attention form
    padded = pad_packed_batch({**batch, "attention_mask": torch.ones(1, 1, 5, 5, dtype=torch.bool)}, 8, 0)
    assert "attention_mask" not in padded  # a mask no longer fits the widened rows: converted after padding
    assert padded["document_ids"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]


def tokenized(tokenizer):
    return [{"input_ids": c.input_ids, "labels": c.labels} for c in (assistant_labels(tokenizer, m) for m in CHATS)]


def packed_vs_alone(model, examples, attention, pad_id):
    """Per-token losses of the examples packed into one row (with ``attention``'s mask), and of each example run
    alone."""
    packed = attention_inputs(collate_packed([examples], pad_id), attention)
    with torch.no_grad():
        together, _, _ = label_loss(model, packed, reduction="none")
        alone = torch.cat([label_loss(model, collate_padded([ex], pad_id), reduction="none")[0] for ex in examples])
    return together, alone


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_examples_match_alone_on_tiny_llama(attn, no_compile):
    model, tokenizer = load_base_model("tiny-random", quantize="none", compute_dtype=torch.float32, device="cpu",
                                       attn_implementation=attn)
    examples = tokenized(tokenizer)
    together, alone = packed_vs_alone(model, examples, attn, tokenizer.pad_token_id)
    assert together.shape == alone.shape and together.numel() > 10
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # with a plain 2-D mask (restarting position_ids alone) the examples do leak into each other: the test can fail
    leaky = collate_packed([examples], tokenizer.pad_token_id)
    leaky["attention_mask"] = torch.ones_like(leaky["input_ids"])
    with torch.no_grad():
        assert not torch.allclose(label_loss(model, leaky, reduction="none")[0], alone, atol=1e-3)


@pytest.mark.slow
def test_packed_examples_match_alone_on_smollm2_4bit(smol_4bit):
    """sdpa and eager on the real model (flex's uncompiled reference path takes minutes at 30 layers on a CPU)."""
    model, tokenizer = smol_4bit
    examples = tokenized(tokenizer)
    try:
        for attn in ("sdpa", "eager"):
            model.set_attn_implementation(attn)
            together, alone = packed_vs_alone(model, examples, attn, tokenizer.pad_token_id)
            torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4, msg=lambda m, a=attn: f"{a}: {m}")
    finally:
        model.set_attn_implementation("sdpa")


def test_collate_padded_and_efficiency():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    padded = collate_padded(examples, 0)
    assert padded["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert padded["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert padding_efficiency(padded) == pytest.approx(4 / 6)
    packed = collate_packed([examples], 0)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0]] and padding_efficiency(packed) == 1.0


def test_shared_prefix_length_stops_before_the_first_trained_token_and_its_predecessor():
    from lit_llama_lab.data.packing import shared_prefix_length

    a = {"input_ids": [1, 2, 3, 4, 9, 9], "labels": [-100, -100, -100, -100, 9, 9]}
    b = {"input_ids": [1, 2, 3, 5, 8], "labels": [-100, -100, -100, -100, 8]}
    assert shared_prefix_length([a, b]) == 3  # the common prefix [1, 2, 3]
    early = {"input_ids": [1, 2, 3, 4, 7], "labels": [-100, -100, 3, 4, 7]}  # trained from index 2
    assert shared_prefix_length([a, early]) == 1  # token 2 is trained: its predecessor (index 1) is the example's own
    assert shared_prefix_length([a]) == 0 and shared_prefix_length([a, {"input_ids": [5], "labels": [-100]}]) == 0


def emoji_and_general_examples(tokenizer):
    """Three emoji chats and two ordinary ones, none with a system message: the template adds its default one."""
    from lit_llama_lab.tasks.emoji.rows import build_emoji_rows, emoji_messages

    chats = [emoji_messages(row) for row in build_emoji_rows()[:3]]
    chats += [CHATS[0], CHATS[2]]
    return [{"input_ids": c.input_ids, "labels": c.labels} for c in (assistant_labels(tokenizer, m) for m in chats)]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_a_shared_prefix_gives_every_trained_token_the_loss_it_has_alone_in_fewer_tokens(attn, no_compile):
    """--data.share_prefix: the default system prompt held once per row; the per-token losses equal each example's
    alone (tiny Llama, SmolLM2's real tokenizer and template), and the row is shorter by the copies left out."""
    model, tokenizer = load_base_model("tiny-random", quantize="none", compute_dtype=torch.float32, device="cpu",
                                       attn_implementation=attn)
    examples = emoji_and_general_examples(tokenizer)
    pad = tokenizer.pad_token_id
    shared = collate_packed([examples[:3], examples[3:]], pad, share_prefix=True)
    prefixes = shared["prefix_lengths"].tolist()
    system = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert "You are a helpful AI assistant" in system and min(prefixes) >= 20  # the default system prompt, once a row
    assert shared["input_ids"].shape[1] == max(sum(len(e["input_ids"]) for e in examples[:3]) - 2 * prefixes[0],
                                                sum(len(e["input_ids"]) for e in examples[3:]) - prefixes[1])
    assert shared["document_ids"][0, :prefixes[0]].eq(0).all() and shared["position_ids"][0, prefixes[0]] == prefixes[0]
    with torch.no_grad():
        together = label_loss(model, attention_inputs(shared, attn), reduction="none")[0]
        alone = torch.cat([label_loss(model, collate_padded([ex], pad), reduction="none")[0] for ex in examples])
    assert together.shape == alone.shape and together.numel() > 30
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # without the prefix in their mask the examples lose their system prompt: the test can fail
    blind = attention_inputs({k: v for k, v in shared.items() if k != "prefix_lengths"}, attn)
    with torch.no_grad():
        assert not torch.allclose(label_loss(model, blind, reduction="none")[0], alone, atol=1e-3)


def test_shared_prefix_batches_are_refused_by_varlen_and_lay_the_distill_mask_after_the_prefix(smol_tokenizer):
    examples = emoji_and_general_examples(smol_tokenizer)[:3]
    flagged = [{**e, "distill": i == 1, "replay_id": 0 if i == 1 else -1} for i, e in enumerate(examples)]
    batch = collate_packed([flagged], smol_tokenizer.pad_token_id, share_prefix=True)
    p = int(batch["prefix_lengths"][0])
    first = len(examples[0]["input_ids"]) - p
    second = slice(p + first, p + first + len(examples[1]["input_ids"]) - p)
    assert batch["distill_mask"][0].nonzero().flatten().tolist() == list(range(second.start, second.stop))
    assert batch["replay_ids"][0, second].eq(0).all() and batch["replay_ids"][0, :p].eq(-1).all()
    with pytest.raises(ValueError, match="share_prefix"):
        attention_inputs({**batch, "max_documents": 8}, "varlen")
