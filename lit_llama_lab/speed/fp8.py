"""The frozen 4-bit base's matmuls in fp8 (``--model.speed.fp8_matmuls``): each projection's forward and input-gradient
GEMMs run as ``torch._scaled_mm`` on float8 (e4m3) operands with a scale per row, the recipe torchao calls "rowwise"
for float8 training. The base is frozen, so no weight gradient is computed in any precision; the LoRA adapters keep
their own matmuls (``--model.precision.adapter_matmuls``). ``tests/speed/test_fp8.py`` checks it trains like the bf16
step on a CPU, ``tests/gpu/test_fp8.py`` on a GPU."""

from __future__ import annotations

import types

import torch

from lit_llama_lab.speed.dequantize import dequantize_weight, four_bit_layers

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MULTIPLE = 16  # torch._scaled_mm needs both dimensions of the weight to be multiples of 16


def rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D) in float8 e4m3 with one scale per row: each row's largest magnitude maps to e4m3's largest value.
    Returns the fp8 tensor and the fp32 factors that multiply it back (``x ≈ q.float() * scale``), shaped
    ``[rows, 1]`` as ``torch._scaled_mm`` takes them. An all-zero row gets a tiny scale and stays zero."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    return (x.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8), amax / FP8_MAX


def _scaled_matmul(a: torch.Tensor, b_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b_rows.T`` with both operands in rowwise fp8 (``a``'s rows, ``b_rows``' rows = the output's columns)."""
    qa, sa = rowwise_fp8(a)
    qb, sb = rowwise_fp8(b_rows)
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=dtype)


class _FrozenFp8Linear(torch.autograd.Function):
    """``x @ weight.T`` for a frozen ``weight`` [out, in]: forward with ``x``'s rows and ``weight``'s rows (output
    channels) scaled, backward ``grad @ weight`` with the gradient's rows and ``weight``'s columns (input channels)
    scaled. No gradient for ``weight``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _scaled_matmul(x.reshape(-1, x.shape[-1]), weight, weight.dtype).reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = _scaled_matmul(grad2d, weight.t().contiguous(), weight.dtype)
        return grad_x.reshape(*grad.shape[:-1], -1), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bitsandbytes' 4-bit layer math (input cast to the weight's dtype, output in the input's dtype) with the matmul
    in rowwise fp8; ``weight`` is the frozen weight already dequantized."""
    out = _FrozenFp8Linear.apply(x.to(weight.dtype).contiguous(), weight)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype)


def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A 4-bit layer's forward: in training, the matmul in fp8 over the weight dequantized (or its cached copy);
    in evaluation and generation, bitsandbytes' own forward."""
    if not self.training:
        return self._bf16_forward(x)
    cached = getattr(self, "_dequantized", None)
    return fp8_linear(x, cached if cached is not None else dequantize_weight(self), self.bias)


def fp8_ready(module) -> bool:
    """A 4-bit layer that :func:`use_fp8_matmuls` switched to fp8 matmuls (and is training)."""
    return getattr(module, "_fp8", False) and module.training


def check_fp8(model) -> None:
    """Refuse, naming the fix, a model whose 4-bit layers cannot multiply in fp8 (shapes ``torch._scaled_mm``
    rejects, a compute dtype other than bf16) or a torch without float8."""
    if not hasattr(torch, "_scaled_mm"):
        raise ValueError(f"fp8_matmuls needs torch._scaled_mm (torch {torch.__version__} lacks it): "
                         "use --model.speed.fp8_matmuls false.")
    for module in four_bit_layers(model):
        out, inp = module.weight.quant_state.shape
        dtype = module.compute_dtype or module.weight.quant_state.dtype
        if out % MULTIPLE or inp % MULTIPLE or dtype != torch.bfloat16:
            raise ValueError(f"fp8_matmuls needs 4-bit layers of bf16 compute with both sides a multiple of "
                             f"{MULTIPLE}; a {out} x {inp} layer in {dtype} is not: use "
                             "--model.speed.fp8_matmuls false (or --model.precision.compute_dtype bfloat16).")


def use_fp8_matmuls(model) -> int:
    """Run every frozen 4-bit projection's forward and input-gradient matmuls in rowwise fp8 while training.

    At the 1B shape on an H200, a 8,192 × 2,048 × 8,192 GEMM takes 0.37 ms in bf16 (750 TFLOP/s) and 0.23 ms in fp8
    (``docs/speed.md``); the quantization of each operand (a max per row, a scale, a cast) is fused by the compiled
    layer into the kernels around it. The weight is dequantized from NF4 to bf16 as before and quantized per output
    channel for the forward, per input channel for the backward. Evaluation and generation keep bitsandbytes'
    forward. Returns the number of layers switched.
    """
    check_fp8(model)
    count = 0
    for module in four_bit_layers(model):
        if not getattr(module, "_fp8", False):
            module._bf16_forward = module.forward
            module.forward = types.MethodType(_fp8_forward, module)
            module._fp8 = True
            count += 1
    return count
