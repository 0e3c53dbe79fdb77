"""Numerics of the base model: the compute dtype, the dtype 4-bit weights are stored in, and fp32 hidden states
between bf16 matmuls."""

from __future__ import annotations

from typing import Literal

import torch

from lit_llama_lab.model.adapters import unwrap_peft

QuantStorage = Literal["auto", "uint8", "bfloat16", "float16", "float32"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def resolve_compute_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it and fp32 elsewhere (``device``: where the model runs; default: a
    GPU when there is one): CPUs without bf16 matmul instructions run bf16 hundreds of times slower than fp32."""
    if name == "auto":
        on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def resolve_quant_storage(name: QuantStorage, compute_dtype: torch.dtype, sharded: bool = False) -> torch.dtype:
    """The dtype bitsandbytes packs 4-bit weights into. ``auto``: uint8, or the compute dtype when ``sharded``.

    Under FSDP (``sharded``) each decoder layer's 4-bit weights are flattened with its norms into one tensor, which
    needs one floating dtype: any other choice raises, naming the fix. The stored bits are the same in every dtype,
    so the model computes the same outputs.
    """
    if name == "auto":
        return compute_dtype if sharded else torch.uint8
    storage = {"uint8": torch.uint8, **DTYPES}[name]
    if sharded and storage != compute_dtype:
        wanted = dtype_name(compute_dtype)
        raise ValueError(
            f"FSDP shards each decoder layer's 4-bit weights together with its {wanted} norms, so they must be stored "
            f"as {wanted}, not {name}: pass --model.precision.quant_storage {wanted} (or auto)."
        )
    return storage


def _cast_in(module, args):
    """Forward pre-hook of an unquantized layer: remember the input's dtype, compute in the weight's."""
    module._input_dtype = args[0].dtype
    return (args[0].to(module.weight.dtype), *args[1:])


def keep_fp32_activations(model) -> bool:
    """Keep the hidden states between matmuls in fp32 while every matmul (4-bit base, adapters' inputs, attention)
    still runs in the model's bf16/fp16 compute dtype: the numerics of the plain stack, whose
    ``prepare_model_for_kbit_training`` gets them by upcasting embeddings, norms and lm_head to fp32 under bf16
    autocast, without upcasting any weight.

    With a bf16 model every projection's output is rounded to bf16, and with it the sum of the frozen output and
    the adapter's small update, so much of the update is lost in the forward pass while its gradient is not. Here:

    - the embedding output is cast to fp32, so the residual stream, the norms, the MLP's gate, up and activation
      and each adapter's sum with its frozen projection stay fp32 (bitsandbytes casts each 4-bit layer's input to
      the compute dtype for its matmul and returns the input's dtype; unquantized layers get hooks that do the
      same);
    - query, key and value are cast to the compute dtype (one rounding, as autocast does before attention) and so
      are the rotary cos/sin, so rotary and attention run in it as before;
    - the final norm's output is cast to the compute dtype for the vocabulary projection.

    The cost is memory for the fp32 stream (checkpointed block boundaries, MLP intermediates) and bandwidth.
    Returns False (nothing to do) when the model computes in fp32. Hooks only: weights are untouched, so the model
    saves, merges and exports as before. Works before or after peft wraps the projections.
    """
    causal_lm = unwrap_peft(model)
    decoder = causal_lm.get_decoder()
    compute = decoder.embed_tokens.weight.dtype
    if compute == torch.float32 or getattr(decoder, "_fp32_activations", False):
        return False
    attention = [layer.self_attn for layer in decoder.layers if hasattr(layer, "self_attn")]
    if not attention or not all(hasattr(a, name) for a in attention for name in ("q_proj", "k_proj", "v_proj")):
        raise ValueError(f"fp32_activations needs Llama-style attention (q_proj, k_proj, v_proj) in "
                         f"{type(decoder).__name__}; pass --model.precision.fp32_activations false.")
    to_compute = lambda module, args, out: out.to(compute)  # noqa: E731
    decoder.embed_tokens.register_forward_hook(lambda module, args, out: out.float())
    decoder.rotary_emb.register_forward_hook(lambda module, args, out: tuple(t.to(compute) for t in out))
    decoder.norm.register_forward_hook(to_compute)
    for attn in attention:
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(attn, name).register_forward_hook(to_compute)
    # plain (unquantized) layers: bitsandbytes' cast-in, input-dtype-out, which fp32 inputs need
    for name, linear in decoder.layers.named_modules():
        if type(linear) is torch.nn.Linear and linear.weight.dtype == compute and "lora_" not in name:
            linear.register_forward_pre_hook(_cast_in)
            linear.register_forward_hook(lambda module, args, out: out.to(module._input_dtype))
    decoder._fp32_activations = True
    return True


class ComputeDtypeLinear(torch.nn.Linear):
    """An adapter matrix kept in fp32 (what the optimizer updates) that multiplies in :attr:`compute_dtype`: input
    and weight are cast to it and so is the output, as bf16 autocast runs the plain stack's adapters. The caller
    (peft's LoRA layer) adds the output to the frozen projection's in the activations' dtype, so with fp32
    activations the sum keeps the adapter's update. A class swap only: parameters, names and checkpoints are those
    of the ``torch.nn.Linear`` it was."""

    compute_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def adopt(cls, linear: torch.nn.Linear, dtype: torch.dtype) -> None:
        """Make the plain ``linear`` multiply in ``dtype``, in place (its class swapped)."""
        linear.__class__ = cls
        linear.compute_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), self.weight.to(dtype), bias)


def adapter_matmuls_in(model, dtype: torch.dtype) -> int:
    """Make every LoRA A and B matrix of ``model`` multiply in ``dtype`` (:class:`ComputeDtypeLinear`); returns how
    many. fp32 adapters fed fp32 activations otherwise multiply in fp32 (TF32 on a GPU when allowed): at the 1B shape
    these thin matmuls read and write fp32 activation-sized tensors. Call after peft made the adapters. Adapters with
    a peft variant (DoRA) are left in fp32: their weight norms read the matrices directly."""
    from peft.tuners.lora import LoraLayer

    swapped = 0
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            plain = [name for name in layer.lora_A if name not in getattr(layer, "lora_variant", {})]
            for linear in [layer.lora_A[name] for name in plain] + [layer.lora_B[name] for name in plain]:
                if type(linear) is torch.nn.Linear:
                    ComputeDtypeLinear.adopt(linear, dtype)
                    swapped += 1
    return swapped
