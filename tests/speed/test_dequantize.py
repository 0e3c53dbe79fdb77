"""``--model.speed.dequantize_once``: 4-bit layers that run on a weight dequantized once train exactly like bitsandbytes'
dequantize-at-every-use layers, and the checkpoints do not change."""

from __future__ import annotations

import pytest
import torch

from lit_llama_lab.speed.dequantize import dequantized_bytes, four_bit_layers, four_bit_params
from tests.helpers import emoji_batch, make_module, train


def test_dequantized_layers_train_exactly_like_bitsandbytes():
    runs = {}
    for once in (False, True):
        torch.manual_seed(0)  # the same adapter init
        module = make_module(dequantize_once=once, learning_rate=1e-2, compute_dtype="float32", tf32=False)
        layers = four_bit_layers(module.model)
        assert len(layers) == 14 and all((getattr(m, "_dequantized", None) is not None) == once for m in layers)
        device = next(module.model.parameters()).device  # CUDA on the GPU host
        batch = {k: v.to(device) for k, v in emoji_batch(module.tokenizer, 8).items()}
        runs[once] = (train(module, batch, 3), module.adapter_state_dict(), module.state_dict())
    (plain_losses, plain_weights, plain_state), (once_losses, once_weights, once_state) = runs[False], runs[True]
    assert plain_losses[-1] != pytest.approx(plain_losses[0], rel=1e-4)  # the adapters trained
    # on a CPU the very same fp32 matmuls; on a GPU cuBLAS may sum in another order than bitsandbytes' 4-bit GEMM
    tol = 1e-5 if torch.cuda.is_available() else 1e-6
    assert once_losses == pytest.approx(plain_losses, rel=tol)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(once_weights[name], weight, rtol=10 * tol, atol=tol)
    # the cache is no part of the module's state: the same keys (4-bit weights and their quant state) as without
    assert set(once_state) == set(plain_state) and not any("_dequantized" in k for k in once_state)


def test_dequantized_bytes_counts_every_4bit_weight_in_the_compute_dtype():
    module = make_module(compute_dtype="float32", dequantize_once=True)
    layers = four_bit_layers(module.model)
    cached = sum(m._dequantized.numel() * m._dequantized.element_size() for m in layers)
    assert dequantized_bytes(module.model) == cached == sum(4 * m.in_features * m.out_features for m in layers) > 0
    assert dequantized_bytes(make_module(quantize="none").model) == 0  # nothing to dequantize
    # the plan's estimate, from the config before any weight loads, is the same count
    assert four_bit_params(module.model.config) * 4 == dequantized_bytes(module.model)


def test_dequantize_once_auto_is_on_for_a_small_model_on_cuda_only_and_bad_values_are_refused():
    on = torch.cuda.is_available()  # the tiny model's copy is far below 1 GiB
    assert all(hasattr(m, "_dequantized") == on for m in four_bit_layers(make_module().model))
    with pytest.raises(ValueError, match="dequantize_once='yes'"):
        make_module(dequantize_once="yes")


def test_dequantize_once_true_is_refused_under_fsdp():
    from lit_llama_lab.train.args import PrecisionArgs, SpeedArgs
    from lit_llama_lab.train.plan import Target, resolve

    with pytest.raises(ValueError, match="--model.speed.dequantize_once false"):
        resolve(PrecisionArgs(), SpeedArgs(dequantize_once=True), 0.0, Target(torch.device("cpu"), 2, fsdp=True))
