"""Compiled decoder layers (``--model.speed.compile``): the same training as eager, and checkpointing that still frees
memory under torch.compile.

The CPU tests compile a tiny 4-bit model (about 25 s of compilation on a cold cache). The memory test needs CUDA:
it is in ``tests/gpu/test_compile.py`` (the GPU host runs it; CI has no GPU and skips it).
"""

from __future__ import annotations

import pytest
import torch

from lit_llama_lab.speed.compile import checkpoint_kwargs
from tests.helpers import emoji_batch, make_module, train


@pytest.mark.proof
def test_compiled_checkpointed_layers_train_like_eager():
    runs = {}
    for compile in (False, True):
        torch.manual_seed(0)  # the same adapter init
        module = make_module(gradient_checkpointing=True, compile=compile, learning_rate=1e-2, compute_dtype="float32",
                             tf32=False)  # fp32 as on a CPU: TF32 on the GPU host would round the two differently
        module.model.train()
        device = next(module.model.parameters()).device
        batch = {k: v.to(device) for k, v in emoji_batch(module.tokenizer, 8).items()}
        runs[compile] = (train(module, batch, 3), module.adapter_state_dict())
        layers = module.model.get_base_model().get_decoder().layers
        assert all((layer._compiled_call_impl is not None) == compile for layer in layers)
        # compiled layers get the must-recompute checkpoint policy; eager ones the plain checkpoint
        assert all(("context_fn" in layer._gradient_checkpointing_func.keywords) == compile for layer in layers)
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs[False], runs[True]
    assert compiled_losses[-1] != pytest.approx(compiled_losses[0], rel=1e-4)  # the adapters trained
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-3, atol=1e-5)  # fused kernels round differently


def test_compile_auto_is_off_on_cpu_and_bad_values_are_refused():
    module = make_module(compile="auto")
    assert all(layer._compiled_call_impl is None for layer in module.model.get_base_model().get_decoder().layers)
    with pytest.raises(ValueError, match="use true, false or auto"):
        make_module(compile="yes")


def test_compile_true_is_refused_under_fsdp():
    from lit_llama_lab.train.args import PrecisionArgs, SpeedArgs
    from lit_llama_lab.train.plan import Target, resolve

    with pytest.raises(ValueError, match="not supported under FSDP"):
        resolve(PrecisionArgs(), SpeedArgs(compile=True), 0.0, Target(torch.device("cpu"), world_size=2, fsdp=True))


def test_checkpoint_kwargs_add_the_policy_only_when_compiled():
    from torch.utils.checkpoint import CheckpointPolicy

    assert checkpoint_kwargs(False, preserve_rng_state=False) == {"use_reentrant": False, "preserve_rng_state": False}
    compiled = checkpoint_kwargs(True)
    assert compiled["use_reentrant"] is False and compiled["preserve_rng_state"] is True
    policy = compiled["context_fn"].args[0]
    assert policy(None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_RECOMPUTE
