"""The benchmark's CPU mode: ours and the plain transformers+peft+bitsandbytes stack give the same loss on the tiny
4-bit model, and the speed-path pieces compute the plain math."""

from __future__ import annotations

import copy
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lit_llama_lab.bench import bench, path_options, step_flops
from lit_llama_lab.fast import attention_inputs, keep_fp32_residual, linear_cross_entropy
from lit_llama_lab.models import load_base_model


def test_linear_cross_entropy_matches_plain_cross_entropy_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(100, 16, requires_grad=True)
    targets = torch.randint(0, 100, (37,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk=5)  # 8 chunks, the last one short
    (2 * loss).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.T, targets)
    (2 * expected).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_linear_cross_entropy_rejects_unselected_rows():
    with pytest.raises(ValueError, match="select labelled rows"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))


def test_varlen_inputs_split_the_flattened_batch_where_positions_restart():
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long),
             "position_ids": torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0]]), "attention_mask": torch.ones(2, 1, 4, 4)}
    out = attention_inputs(batch, "varlen")
    assert "attention_mask" not in out
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 4, 6, 7, 8]
    assert out["max_length_q"] == 3


def test_fp32_residual_keeps_the_stream_fp32_and_the_matmuls_bf16_and_is_closer_to_fp32():
    """A bf16 model with the fp32 residual stream: the blocks receive fp32 hidden states, every projection still
    gets bf16 inputs, and the final hidden state is closer to the same weights computed wholly in fp32."""
    model, _ = load_base_model("tiny-random", "none", torch.bfloat16, "cpu")
    reference = copy.deepcopy(model).float()  # the same (bf16-rounded) weights, all math in fp32
    plain = copy.deepcopy(model)
    assert keep_fp32_residual(model) and not keep_fp32_residual(model)  # once only
    assert not keep_fp32_residual(reference)  # nothing to do in fp32
    seen = {}

    def record(module, args, kwargs, name):
        seen.setdefault(name, (args[0] if args else kwargs["hidden_states"]).dtype)

    hooks = [module.register_forward_pre_hook(partial(record, name=name), with_kwargs=True)
             for name, module in model.named_modules() if name.endswith(("layers.0", "q_proj", "down_proj", "norm"))]
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = {name: m.model(input_ids=ids).last_hidden_state.float() for name, m in
                  [("fp32 residual", model), ("bf16", plain), ("fp32", reference)]}
    for hook in hooks:
        hook.remove()
    assert seen["model.layers.0"] == torch.float32 and seen["model.norm"] == torch.float32
    assert seen["model.layers.0.self_attn.q_proj"] == seen["model.layers.0.mlp.down_proj"] == torch.bfloat16
    assert hidden["fp32 residual"].dtype == torch.float32
    error = {k: (hidden[k] - hidden["fp32"]).abs().max().item() for k in ("fp32 residual", "bf16")}
    assert error["fp32 residual"] < 0.8 * error["bf16"], error


def test_path_modifiers_and_clear_errors():
    builder, options = path_options("ours+flex+compile", {"attention": "sdpa", "compile": False})
    assert builder.__name__ == "build_ours" and options == {"amp": True, "attention": "flex", "compile": True}
    assert path_options("baseline", {}) == (path_options("baseline+amp", {})[0], {"amp": False})
    assert path_options("ours+graphs", {"graphs": False})[1]["graphs"] is True
    assert path_options("ours+bf16res", {"fp32_residual": True})[1]["fp32_residual"] is False
    with pytest.raises(ValueError, match="Unknown modifier 'fast'"):
        path_options("ours+fast", {})
    with pytest.raises(ValueError, match=r"use baseline, baseline\+amp, ours"):
        path_options("unsloth", {})
    with pytest.raises(ValueError, match="Unknown shape"):
        bench(shape="llama-70b", device="cpu")


def test_flops_formula_counts_frozen_linears_twice_in_backward():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=16, vocab_size=10)
    linear = 2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16 + 10 * 8  # q,o + k,v + mlp + lm_head
    attention = 4 * 8 * 6 * (3 + 1) / 2  # 6 tokens in documents of 3
    assert step_flops(config, tokens=6, doc_len=3, lora_params=5) == 4 * linear * 6 + 3 * attention + 6 * 5 * 6


def test_bench_cpu_ours_and_baseline_give_the_same_loss(tmp_path, capsys):
    output = tmp_path / "bench.json"
    results = bench(shape="tiny", seq_len=64, micro_batch=1, steps=1, warmup=1, doc_len=32, loss_steps=2,
                    loss_batch=8, device="cpu", output=str(output))
    base, ours = results["paths"]["baseline"], results["paths"]["ours"]
    assert "error" not in base and "error" not in ours, (base, ours)
    # the same 4-bit model, data and adapter init: the plain HF loss and ours agree after the same AdamW steps
    assert ours["held_out_loss"] == pytest.approx(base["held_out_loss"], rel=1e-4)
    assert ours["train_loss_last"] == pytest.approx(base["train_loss_last"], rel=1e-4)
    assert ours["train_loss_last"] != pytest.approx(ours["train_loss_first"], rel=1e-6)  # the adapters did train
    assert ours["tokens_per_s"] > 0 and ours["trainable_params"] == base["trainable_params"]
    assert json.loads(output.read_text())["paths"]["ours"]["held_out_loss"] == ours["held_out_loss"]
    assert "| ours |" in capsys.readouterr().out
