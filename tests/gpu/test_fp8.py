"""The 4-bit base's matmuls in fp8 on a GPU, through training's own build and step (compiled layers with the MLP in
row blocks and offloaded checkpoints, CUDA graphs): on by default for the 1B layer shape on an fp8-capable GPU, and the
losses follow the bf16 step's (the CPU checks: ``tests/speed/test_fp8.py``; the speed and the held-out loss at the 1B
shape: ``make bench``)."""

from __future__ import annotations

import pytest
import torch

from lit_llama_lab.train.plan import fp8_capable
from tests.gpu.test_memory import run, wide_model  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or not fp8_capable(torch.device("cuda")),
                                                  reason="needs a CUDA GPU with fp8 (compute capability 8.9+)")]


def test_fp8_matmuls_are_the_default_and_train_like_bf16(wide_model):  # noqa: F811
    fp8, bf16 = run(wide_model), run(wide_model, fp8_matmuls=False)
    print({"fp8 (auto)": fp8, "bf16": bf16})
    assert fp8["fp8"] and not bf16["fp8"] and fp8["graphed"] == bf16["graphed"] == 1
    assert fp8["losses"] != bf16["losses"]  # fp8 ran
    assert fp8["losses"] == pytest.approx(bf16["losses"], rel=1e-2)
    assert fp8["peak"] <= bf16["peak"] * 1.05
