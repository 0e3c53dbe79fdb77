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
from lit_llama_lab.fast import attention_inputs, keep_fp32_activations, linear_cross_entropy
from lit_llama_lab.models import load_base_model
from lit_llama_lab.module import LoraArgs


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
    """The bench builds training's offsets (``fast.varlen_keys``): without document ids a restart of the positions
    starts a document (a padding token is one of its own), each row ends with a padding segment (empty here)."""
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long),
             "position_ids": torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0]]), "attention_mask": torch.ones(2, 1, 4, 4)}
    out = attention_inputs(batch, "varlen")
    assert "attention_mask" not in out
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 4, 4, 6, 7, 8, 8]
    assert out["max_length_q"] == 4  # the row width: a bound fixed by the shape
    # with the collator's document ids the padding (-1) is one segment a row
    batch["document_ids"] = torch.tensor([[0, 0, 0, 1], [0, 0, -1, -1]])
    assert attention_inputs(batch, "varlen")["cu_seq_lens_q"].tolist() == [0, 3, 4, 4, 6, 8]


def test_fp32_activations_keep_the_adapter_update_that_bf16_rounds_away():
    """A bf16 model with a small LoRA update: with fp32 activations the blocks and the MLP see fp32 hidden states,
    queries/keys/values and the vocabulary projection's input are bf16, and the update's effect on the output is
    close to the same weights computed wholly in fp32; plain bf16 rounds much of it away."""
    from peft import get_peft_model

    base, _ = load_base_model("tiny-random", "none", torch.bfloat16, "cpu")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraArgs(r=4, alpha=4).peft_config())
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=1e-3)  # a small update, as early in training
    reference = copy.deepcopy(model).float()  # the same (bf16-rounded) weights, all math in fp32
    plain = copy.deepcopy(model)
    assert keep_fp32_activations(model) and not keep_fp32_activations(model)  # once only
    assert not keep_fp32_activations(reference)  # nothing to do in fp32
    seen = {}

    def record(module, args, kwargs, out, name):
        seen[name] = ((args[0] if args else kwargs["hidden_states"]).dtype, (out[0] if isinstance(out, tuple) else out).dtype)

    wanted = ("layers.0", "layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj",
              "layers.0.mlp.down_proj", "model.model.norm")
    hooks = [module.register_forward_hook(partial(record, name=name.removeprefix("base_model.model.").removeprefix("model.")),
                                          with_kwargs=True)
             for name, module in model.named_modules() if name.endswith(wanted) and "lora" not in name
             and "base_layer" not in name]
    ids = torch.randint(0, base.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))

    def residual_stream(m) -> torch.Tensor:  # the last block's output, before the final norm rounds it to bf16
        out = []
        hook = m.get_base_model().model.layers[-1].register_forward_hook(lambda mod, a, o: out.append(o))
        m.get_base_model().model(input_ids=ids)
        hook.remove()
        return (out[0][0] if isinstance(out[0], tuple) else out[0]).float()

    update = {}
    with torch.no_grad():
        for name, m in [("fp32 activations", model), ("bf16", plain), ("fp32", reference)]:
            with_adapter = residual_stream(m)
            with m.disable_adapter():
                update[name] = with_adapter - residual_stream(m)
    for hook in hooks:
        hook.remove()
    assert seen["layers.0"] == (torch.float32, torch.float32)
    assert seen["layers.0.self_attn.q_proj"] == (torch.float32, torch.bfloat16)
    assert seen["layers.0.self_attn.o_proj"] == (torch.bfloat16, torch.bfloat16)
    assert seen["layers.0.mlp.gate_proj"] == seen["layers.0.mlp.down_proj"] == (torch.float32, torch.float32)
    assert seen["norm"] == (torch.float32, torch.bfloat16)
    error = {k: ((update[k] - update["fp32"]).norm() / update["fp32"].norm()).item() for k in ("fp32 activations", "bf16")}
    assert error["fp32 activations"] < 0.6 * error["bf16"], error  # measured: 0.37 vs 0.70


def test_path_modifiers_and_clear_errors():
    builder, options = path_options("ours+flex+compile", {"attention": "sdpa", "compile": False})
    assert builder.__name__ == "build_ours" and options == {"amp": True, "attention": "flex", "compile": True}
    assert path_options("baseline", {}) == (path_options("baseline+amp", {})[0], {"amp": False})
    assert path_options("ours+graphs", {"graphs": False})[1]["graphs"] is True
    assert path_options("ours+bf16act", {"fp32_activations": True})[1]["fp32_activations"] is False
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
    results = bench(seq_len=64, micro_batch=1, steps=1, warmup=1, doc_len=32, loss_steps=2,
                    loss_batch=8, device="cpu", output=str(output))
    assert results["settings"]["shape"] == "tiny"  # shape=auto on a CPU; paths=auto: baseline and ours
    base, ours = results["paths"]["baseline"], results["paths"]["ours"]
    assert "error" not in base and "error" not in ours, (base, ours)
    # the same 4-bit model, data and adapter init: the plain HF loss and ours agree after the same AdamW steps
    assert ours["held_out_loss"] == pytest.approx(base["held_out_loss"], rel=1e-4)
    assert ours["train_loss_last"] == pytest.approx(base["train_loss_last"], rel=1e-4)
    assert ours["train_loss_last"] != pytest.approx(ours["train_loss_first"], rel=1e-6)  # the adapters did train
    assert ours["tokens_per_s"] > 0 and ours["trainable_params"] == base["trainable_params"]
    assert json.loads(output.read_text())["paths"]["ours"]["held_out_loss"] == ours["held_out_loss"]
    assert "| ours |" in capsys.readouterr().out


def test_isolated_bench_runs_each_path_in_its_own_process_with_the_same_results(tmp_path):
    kwargs = dict(shape="tiny", seq_len=64, micro_batch=1, steps=1, warmup=1, doc_len=32, loss_steps=2, loss_batch=8,
                  device="cpu", paths="baseline,ours,ours+nosuch")
    with pytest.raises(ValueError, match="Unknown modifier 'nosuch'"):  # bad paths fail before any child starts
        bench(**kwargs, isolate=True)
    kwargs["paths"] = "baseline,ours"
    isolated = bench(**kwargs, isolate=True, output=str(tmp_path / "isolated.json"))
    together = bench(**kwargs)
    assert isolated["settings"]["isolated"] == "True" and list(isolated["paths"]) == ["baseline", "ours"]
    for path in ("baseline", "ours"):  # deterministic on CPU: a child process gives the in-process figures
        assert isolated["paths"][path]["held_out_loss"] == pytest.approx(together["paths"][path]["held_out_loss"],
                                                                          rel=1e-6)
    assert json.loads((tmp_path / "isolated.json").read_text())["paths"]["ours"]["held_out_loss"] == \
        isolated["paths"]["ours"]["held_out_loss"]
    # a child that dies becomes its path's error entry, with the child's last line
    failed = bench(**{**kwargs, "paths": "ours"}, isolate=True, loss_model="no-such-model")
    assert failed["paths"]["ours"]["error"].startswith("process exited 1:"), failed
    assert "no-such-model" in failed["paths"]["ours"]["error"]
