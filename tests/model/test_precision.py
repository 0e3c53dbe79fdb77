"""The base model's numerics: fp32 hidden states between bf16 matmuls keep the adapter's update, and the storage
dtype of 4-bit weights."""

from __future__ import annotations

import copy
from functools import partial

import torch

from lit_llama_lab.model.load import load_base_model
from lit_llama_lab.model.precision import ComputeDtypeLinear, adapter_matmuls_in, keep_fp32_activations
from lit_llama_lab.train.args import LoraArgs


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
    bf16_adapters = copy.deepcopy(model)  # fp32 activations, the adapters multiplying in bf16 (their sums fp32)
    keys = list(bf16_adapters.state_dict())
    layers = base.config.num_hidden_layers
    assert adapter_matmuls_in(bf16_adapters, torch.bfloat16) == 2 * 7 * layers
    assert list(bf16_adapters.state_dict()) == keys  # checkpoints keep their names
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
        for name, m in [("fp32 activations", model), ("bf16", plain), ("fp32", reference),
                        ("bf16 adapter matmuls", bf16_adapters)]:
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
    error = {k: ((update[k] - update["fp32"]).norm() / update["fp32"].norm()).item()
             for k in ("fp32 activations", "bf16", "bf16 adapter matmuls")}
    assert error["fp32 activations"] < 0.6 * error["bf16"], error  # measured: 0.365 vs 0.70
    # the sums stay fp32, so the update survives the adapters' bf16 matmuls as well as fp32 ones (measured: 0.361)
    assert error["bf16 adapter matmuls"] < 0.6 * error["bf16"], error


def test_adapter_matmuls_in_bf16_compute_what_bf16_autocast_computes_and_train_fp32_weights():
    """A swapped LoRA matrix gives autocast's bf16 output and gradients, bit for bit, and its weight and gradient
    stay fp32 for the optimizer."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 8, bias=False)
    swapped = copy.deepcopy(plain)
    ComputeDtypeLinear.adopt(swapped, torch.bfloat16)
    x = torch.randn(5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(x)
    got = swapped(x2)
    assert got.dtype == expected.dtype == torch.bfloat16 and torch.equal(got, expected)
    expected.float().square().sum().backward()
    got.float().square().sum().backward()
    assert swapped.weight.dtype == swapped.weight.grad.dtype == torch.float32
    assert torch.equal(swapped.weight.grad, plain.weight.grad) and torch.equal(x2.grad, x.grad)
    assert not torch.equal(plain.weight.grad, _fp32_grad(plain, x))  # bf16 is not fp32: the test can tell them apart


def _fp32_grad(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = linear.weight.detach().clone().requires_grad_()
    torch.nn.functional.linear(x.detach(), weight).square().sum().backward()
    return weight.grad
