"""The 4-bit base's matmuls in rowwise fp8 (``speed/fp8.py``), on a CPU (torch's ``_scaled_mm`` runs there too): the
quantization, the matmul and its input gradient against bf16, and the tiny 4-bit model training through it (with and
without the MLP row blocks) close to the bf16 step while evaluation stays bitsandbytes' own. On a GPU, compiled:
``tests/gpu/test_fp8.py``."""

from __future__ import annotations

import pytest
import torch

from lit_llama_lab.speed.dequantize import four_bit_layers
from lit_llama_lab.speed.fp8 import FP8_MAX, check_fp8, fp8_linear, rowwise_fp8, use_fp8_matmuls
from lit_llama_lab.speed.memory import chunk_mlp
from lit_llama_lab.train.args import PrecisionArgs, SpeedArgs
from lit_llama_lab.train.plan import Target, resolve
from tests.helpers import make_module


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rowwise_fp8_keeps_each_row_to_e4m3_precision():
    x = torch.randn(64, 256, dtype=torch.bfloat16) * torch.logspace(-3, 3, 64).unsqueeze(1).to(torch.bfloat16)
    x[5] = 0
    q, scale = rowwise_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    assert torch.equal(back[5], torch.zeros(256))
    # each row's largest magnitude lands on e4m3's largest value; every value within half a step (3 mantissa bits)
    assert torch.equal(q.float().abs().amax(dim=1)[torch.arange(64) != 5], torch.full((63,), FP8_MAX))
    rows = torch.arange(64) != 5
    assert relative(back[rows], x[rows]) < 0.04


def test_fp8_linear_and_its_input_gradient_match_bf16():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 128, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(96, 128, dtype=torch.bfloat16) * 0.05
    grad = torch.randn(3, 40, 96, dtype=torch.bfloat16)
    out = fp8_linear(x, weight)
    out.backward(grad)
    expected = torch.nn.functional.linear(x.detach().float(), weight.float())
    assert out.shape == (3, 40, 96) and out.dtype == torch.bfloat16
    assert 1e-3 < relative(out, expected) < 0.06  # fp8 (not bf16: the error is fp8's), and close
    expected_grad = grad.float() @ weight.float()
    assert 1e-3 < relative(x.grad, expected_grad) < 0.06
    bias = torch.randn(96, dtype=torch.bfloat16)
    assert torch.equal(fp8_linear(x.detach(), weight, bias), (fp8_linear(x.detach(), weight).float() + bias.float())
                       .to(torch.bfloat16))


def bf16_module(fp8: bool, chunks: int = 1):
    torch.manual_seed(0)
    module = make_module(compute_dtype="bfloat16", tf32=False)
    if fp8:
        assert use_fp8_matmuls(module.model) == len(four_bit_layers(module.model)) > 0
    chunk_mlp(module.model, chunks)
    module.model.train()
    return module


def train_losses(module, ids, steps: int = 8) -> tuple[list[float], dict]:
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = module.model(input_ids=ids, labels=ids).loss
        loss.backward()
        if not losses:
            grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, grads


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1000, (2, 256), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bf16_run(ids):
    return train_losses(bf16_module(False), ids)


@pytest.mark.parametrize("chunks", [1, 3])
def test_training_through_fp8_follows_the_bf16_step(ids, bf16_run, chunks):
    module = bf16_module(True, chunks)
    (losses, grads), (expected, expected_grads) = train_losses(module, ids), bf16_run
    assert losses != expected  # fp8 ran
    assert losses == pytest.approx(expected, rel=0.01)
    assert losses[-1] < losses[0] - 0.2  # and it learns
    for name, grad in expected_grads.items():  # the first step's: LoRA B starts at zero, so A's gradients are zero
        if not grad.any():
            assert not grads[name].any(), name
            continue
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten().float(), grad.flatten().float(), dim=0)
        assert cosine > 0.97, name
    # evaluation and generation run bitsandbytes' own forward: exactly the bf16 model's logits
    module.model.eval()
    reference = bf16_module(False, chunks)
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in reference.model.named_parameters():
            if param.requires_grad:
                param.copy_(trained[name])
    reference.model.eval()
    with torch.no_grad():
        assert torch.equal(module.model(input_ids=ids).logits, reference.model(input_ids=ids).logits)


def test_fp8_refuses_what_scaled_mm_cannot_run():
    module = make_module(compute_dtype="float32", tf32=False)
    with pytest.raises(ValueError, match="fp8_matmuls false"):
        check_fp8(module.model)


def test_plan_turns_fp8_on_only_where_it_pays():
    def plan(device="cpu", hidden=2048, **speed):
        return resolve(PrecisionArgs(compute_dtype="bfloat16"), SpeedArgs(**speed), 0.0,
                       Target(torch.device(device), hidden_size=hidden, four_bit_params=10**9))

    assert not plan().fp8_matmuls  # auto: no fp8 hardware on a CPU
    assert plan(fp8_matmuls=True).fp8_matmuls
    assert "fp8" in plan(fp8_matmuls=True).summary()
    with pytest.raises(ValueError, match="fp8_matmuls"):
        resolve(PrecisionArgs(compute_dtype="float32"), SpeedArgs(fp8_matmuls=True), 0.0,
                Target(torch.device("cpu"), hidden_size=2048, four_bit_params=10**9))
    with pytest.raises(ValueError, match="true, false or auto"):
        plan(fp8_matmuls="yes")
