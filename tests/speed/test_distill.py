"""KL to the frozen base on replay tokens: the fused chunked KL equals plain autograd, and on the tiny Llama the
distilled loss is the cross-entropy plus the weighted KL, zero where the model is the base."""

from types import SimpleNamespace

import pytest
import torch

from lit_llama_lab.data.packing import collate_packed, collate_padded, pad_packed_batch
from lit_llama_lab.speed.attention import attention_inputs
from lit_llama_lab.speed.distill import distilled_label_loss, linear_kl
from lit_llama_lab.speed.loss import fast_label_loss
from lit_llama_lab.train.args import LoraArgs


def reference_kl(hidden, base, weight, mask):
    logq = torch.log_softmax(hidden @ weight.T, -1)
    logp = torch.log_softmax(base @ weight.T, -1)
    per_row = (logp.exp() * (logp - logq)).sum(-1)
    return (per_row * mask).sum() / mask.sum().clamp(min=1)


def cpu_module(lora: LoraArgs) -> SimpleNamespace:
    """The tiny Llama with adapters as a CPU run builds it (``model``, ``tokenizer``, ``plan``), on a GPU host too:
    these tests compare fp32 sums on CPU batches."""
    from lit_llama_lab.train.args import PrecisionArgs, SpeedArgs
    from lit_llama_lab.train.build import build, plan_for

    plan = plan_for("tiny-random", "none", PrecisionArgs(), SpeedArgs(), lora, device="cpu")
    model, tokenizer = build("tiny-random", "none", lora, plan, None, training=True)
    return SimpleNamespace(model=model, tokenizer=tokenizer, plan=plan)


@pytest.mark.parametrize("chunk", [0, 3])
def test_linear_kl_matches_autograd_in_value_and_gradient(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, dtype=torch.float32, requires_grad=True)
    base, weight = torch.randn(10, 16, dtype=torch.float32), torch.randn(50, 16, dtype=torch.float32)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    ours = linear_kl(hidden, base, weight, mask, chunk)
    (grad,) = torch.autograd.grad(ours, hidden)
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = reference_kl(ref_hidden, base, weight, mask)
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, ref_hidden.grad)
    assert grad[~mask].abs().max() == 0  # unmasked rows get no gradient
    assert linear_kl(base.clone(), base, weight, mask).abs() < 1e-6  # the model equal to the base: no KL


def tiny_batch(tokenizer, distill):
    examples = [{"input_ids": tokenizer(t)["input_ids"], "labels": tokenizer(t)["input_ids"], "distill": d}
                for t, d in [("a red apple", 0), ("the sea is blue today", 1), ("one two", 1)]]
    packed = attention_inputs(collate_packed([examples[:2], examples[2:]], tokenizer.pad_token_id), "sdpa")
    return packed if distill else collate_padded(
        [{k: v for k, v in e.items() if k != "distill"} for e in examples], tokenizer.pad_token_id)


def test_distilled_loss_is_cross_entropy_plus_weighted_kl_to_the_base():
    module = cpu_module(LoraArgs(r=4, alpha=8))
    batch = tiny_batch(module.tokenizer, distill=True)
    assert batch["distill_mask"].tolist()[1][:2] == [True, True] and not batch["distill_mask"][0, 0]
    plain = fast_label_loss(module.model, batch)
    # fresh adapters (B = 0) compute the base: the KL term is zero
    torch.testing.assert_close(distilled_label_loss(module.model, batch, weight=5.0), plain)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    plain = fast_label_loss(module.model, batch)
    distilled = distilled_label_loss(module.model, batch, weight=2.0)
    kl = (distilled - plain) / 2
    assert kl > 1e-4
    # without CUDA graphs the labelled and replay positions are picked first: the same loss and gradients
    picked = distilled_label_loss(module.model, batch, weight=2.0, fixed_shapes=False)
    torch.testing.assert_close(picked, distilled)
    fixed_grads = torch.autograd.grad(distilled, [p for p in module.model.parameters() if p.requires_grad],
                                      retain_graph=True)
    picked_grads = torch.autograd.grad(picked, [p for p in module.model.parameters() if p.requires_grad])
    for a, b in zip(picked_grads, fixed_grads, strict=True):
        torch.testing.assert_close(a, b)
    # the plan's compile (wide models on a GPU) runs the cross-entropy's chunks compiled: the same loss and gradients
    compiled = distilled_label_loss(module.model, batch, weight=2.0, compiled=True)
    torch.testing.assert_close(compiled, distilled)
    compiled_grads = torch.autograd.grad(compiled, [p for p in module.model.parameters() if p.requires_grad])
    for a, b in zip(compiled_grads, fixed_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    none = {**batch, "distill_mask": torch.zeros_like(batch["distill_mask"])}
    torch.testing.assert_close(distilled_label_loss(module.model, none, weight=2.0), plain)
    distilled.backward()
    grads = [p.grad for n, p in module.model.named_parameters() if "lora_" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.requires_grad for n, p in module.model.named_parameters() if "lora_" in n)  # re-enabled after the base


def test_distill_mask_survives_padding_and_plain_batches_have_none():
    from lit_llama_lab.model.load import load_tokenizer

    tok = load_tokenizer("tiny-random")
    batch = tiny_batch(tok, distill=True)
    wide = pad_packed_batch(batch, 64, tok.pad_token_id)
    assert wide["distill_mask"].shape == wide["input_ids"].shape and wide["distill_mask"].sum() == batch["distill_mask"].sum()
    assert "distill_mask" not in tiny_batch(tok, distill=False)


def test_cached_teacher_gives_the_loss_and_gradients_of_the_base_run_in_the_step():
    """The KL targets read from a TeacherCache (the base run once over the replay chats, one chat per row) equal the
    base run inside the step on packed rows: same loss and adapter gradients (fp32, tiny Llama, trained adapters)."""
    from lit_llama_lab.speed.distill import TeacherCache
    from lit_llama_lab.train.step import TrainStep

    module = cpu_module(LoraArgs(r=4, alpha=8, dropout=0.0))
    tok = module.tokenizer
    texts = [("a red apple", 0, -1), ("the sea is blue today", 1, 0), ("one two", 1, 1), ("green tea, hot", 1, 2)]
    examples = [{"input_ids": tok(t)["input_ids"], "labels": tok(t)["input_ids"], "distill": d, "replay_id": i}
                for t, d, i in texts]
    batch = collate_packed([examples[:2], examples[2:]], tok.pad_token_id)  # replay chats share rows with others
    assert batch["replay_ids"].tolist()[1][:3] == [1, 1, 2]
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    step = TrainStep(module.model, module.plan, tok.pad_token_id, distill_weight=2.0)

    def loss_and_grads():
        module.model.zero_grad(set_to_none=True)
        loss = step(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad]

    in_step, in_step_grads = loss_and_grads()
    cache = step.cache_teacher([e["input_ids"] for e in examples[1:]])
    assert isinstance(cache, TeacherCache) and cache.table.shape[0] == sum(len(e["input_ids"]) for e in examples[1:])
    cached, cached_grads = loss_and_grads()
    torch.testing.assert_close(cached, in_step, rtol=1e-5, atol=1e-6)
    for a, b in zip(cached_grads, in_step_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a wrong row (every replay token reading chat 0's states) moves the loss: the index is what is tested
    wrong = TeacherCache(cache.table, torch.zeros_like(cache.offsets))
    step.teacher = wrong
    assert abs(float(step(batch)) - float(in_step)) > 1e-4


def test_a_shared_prefix_trains_the_same_loss_and_gradients_with_the_teacher_in_the_step_or_cached():
    """--data.share_prefix on chats with replay among them: TrainStep's distilled loss and adapter gradients equal
    those of the same rows without sharing, with the base run in the step and read from a TeacherCache (whose
    index then meets positions that start after the prefix)."""
    from lit_llama_lab.data.masking import assistant_labels
    from lit_llama_lab.train.step import TrainStep

    cpu = cpu_module(LoraArgs(r=4, alpha=8, dropout=0.0))
    model, tok, plan = cpu.model, cpu.tokenizer, cpu.plan
    chats = [("What is 🐼?", "That is the panda emoji.", -1), ("Name a red fruit.", "An apple is a red fruit.", 0),
             ("Count to three.", "One, two, three.", 1), ("What is 🎂?", "That is the birthday cake emoji.", -1)]
    examples = []
    for question, answer, replay in chats:
        chat = assistant_labels(tok, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
        examples.append({"input_ids": chat.input_ids, "labels": chat.labels, "distill": replay >= 0,
                         "replay_id": replay})
    bins = [examples[:2], examples[2:]]
    plain, shared = (collate_packed(bins, tok.pad_token_id, share_prefix=s) for s in (False, True))
    assert shared["input_ids"].numel() < plain["input_ids"].numel() - 30
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    step = TrainStep(model, plan, tok.pad_token_id, distill_weight=2.0)

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        loss = step(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]

    for teacher in ("in the step", "cached"):
        if teacher == "cached":
            step.cache_teacher([examples[1]["input_ids"], examples[2]["input_ids"]])
        (a, a_grads), (b, b_grads) = loss_and_grads(plain), loss_and_grads(shared)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, t=teacher: f"{t}: {m}")
        for x, y in zip(b_grads, a_grads, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    import dataclasses

    step.plan = dataclasses.replace(step.plan, cuda_graphs=True)  # a GPU plan's graphs: refused before any capture
    with pytest.raises(ValueError, match="share_prefix false, or --model.speed.cuda_graphs false"):
        step(shared)
