"""4-bit weights dequantized once (``--model.speed.dequantize_once``): each frozen 4-bit layer runs on a copy of its
weight in the compute dtype instead of dequantizing it in every forward and backward.
``tests/speed/test_dequantize.py`` checks it trains exactly like bitsandbytes' layers."""

from __future__ import annotations

import torch


def four_bit_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bitsandbytes' 4-bit layer math over its weight already dequantized (``weight``, in the compute dtype): input
    cast to the compute dtype, one matmul, output in the input's dtype."""
    bias = None if bias is None else bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A 4-bit layer's forward over its cached dequantized weight, without dequantizing again."""
    return four_bit_linear(x, self._dequantized, self.bias)


def is_four_bit(module) -> bool:
    """``module`` is a bitsandbytes 4-bit linear layer holding a quantized weight."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    return isinstance(module, Linear4bit) and getattr(module.weight, "quant_state", None) is not None


def dequantize_weight(module) -> torch.Tensor:
    """A 4-bit layer's weight dequantized to its compute dtype (bitsandbytes' own dequantization)."""
    import bitsandbytes.functional as bnbf

    state = module.weight.quant_state
    return bnbf.dequantize_4bit(module.weight, state).to(module.compute_dtype or state.dtype)


def four_bit_layers(model) -> list:
    """bitsandbytes' 4-bit linear layers of ``model`` (not the peft wrappers around them, whose ``weight`` is
    theirs)."""
    return [m for m in model.modules() if is_four_bit(m)]


def dequantized_bytes(model) -> int:
    """Bytes that :func:`cache_dequantized_weights` would add: every 4-bit layer's weight in its compute dtype."""
    return sum(m.weight.quant_state.shape.numel() * (m.compute_dtype or m.weight.quant_state.dtype).itemsize
               for m in four_bit_layers(model))


def cache_dequantized_weights(model) -> int:
    """Dequantize each frozen 4-bit layer once and run its forward and backward on that copy.

    bitsandbytes dequantizes a 4-bit weight at every use: in the forward matmul and again for the input gradient
    in backward (a few kernels each, for each of a Llama layer's seven projections). The base is frozen, so every
    step dequantizes the same NF4 values to the same weights; keeping them costs the weights' size in the compute
    dtype (SmolLM2-135M: 0.2 GB) and changes no value the layer computes with. For a small model, whose step is
    thousands of tiny kernels, it removes the dequantizing ones: 1,250 of a SmolLM2 emoji step's 8,900 (46.1 to
    44.0 ms a step on an H200, ``scripts/gpu_profile.py``). The 4-bit weight stays the parameter: state
    dicts, checkpoints, merging and export see the quantized model. Returns the number of layers cached.

    The copy is a non-persistent buffer: it moves with the module and stays out of state dicts. A weight changed
    later (a merge) must not be trained through the cache.
    """
    count = 0
    for module in four_bit_layers(model):
        if getattr(module, "_dequantized", None) is not None:
            continue
        with torch.no_grad():
            dequantized = dequantize_weight(module)
        # a buffer moves with the module (``.cuda()``); non-persistent: never in a state dict or checkpoint
        module.register_buffer("_dequantized", dequantized, persistent=False)
        module.forward = _dequantized_forward.__get__(module)
        count += 1
    return count


def four_bit_params(config) -> int:
    """How many weights the 4-bit layers of a Llama-style model with HF ``config`` hold: every attention and MLP
    projection of every decoder layer (embeddings and the vocabulary projection stay unquantized). Times the compute
    dtype's size it is what :func:`dequantized_bytes` reports after loading, known before any weight loads."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return layers * (2 * hidden * q + 2 * hidden * kv + 3 * hidden * config.intermediate_size)
