"""Dequantized-once 4-bit layers through the CUDA-graph training path match bitsandbytes' (GPU only; the CPU
equality is in ``tests/speed/test_dequantize.py``)."""

from __future__ import annotations

import pytest
import torch

from lit_llama_lab.data.packing import pad_packed_batch
from lit_llama_lab.speed.dequantize import four_bit_layers
from tests.helpers import make_module, packed_emoji

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU host)")]


def test_dequantized_layers_under_cuda_graphs_match_bitsandbytes_on_gpu():
    """bf16 on a GPU, through the CUDA-graph training path: the same losses and adapter weights within bf16
    rounding (cuBLAS may order a plain matmul's sums differently from bitsandbytes' 4-bit GEMM)."""

    def run(once: bool) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        module = make_module(quantize="nf4", compute_dtype="bfloat16", dequantize_once=once)
        module.model.cuda()
        assert all((getattr(m, "_dequantized", None) is not None) == once for m in four_bit_layers(module.model))
        if once:
            assert all(m._dequantized.is_cuda for m in four_bit_layers(module.model))  # moved with the module
        optimizer = module.configure_optimizers()
        losses = []
        for n in (8, 16, 8):
            batch = {k: v.cuda() for k, v in pad_packed_batch(packed_emoji(module.tokenizer, n), 128,
                                                              module.tokenizer.pad_token_id).items()}
            loss = module.training_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        assert module._graphed is not None and module._graphed.eager_calls == 0
        return losses, module.adapter_state_dict()

    plain_losses, plain_weights = run(False)
    once_losses, once_weights = run(True)
    assert once_losses == pytest.approx(plain_losses, rel=2e-3)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(once_weights[name].float(), weight.float(), rtol=2e-2, atol=2e-4)
