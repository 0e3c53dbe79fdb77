"""Compiled decoder layers (``--model.compile``): the same training as eager, and checkpointing that still frees
memory under torch.compile.

The CPU tests compile a tiny 4-bit model (about 25 s of compilation on a cold cache). The memory test needs CUDA:
``pytest tests/test_compile.py`` on the GPU host runs it; CI has no GPU and skips it.
"""

from __future__ import annotations

import pytest
import torch

from lit_llama_lab.fast import checkpoint_kwargs
from lit_llama_lab.module import label_loss
from tests.test_module import emoji_batch, make_module


def train(module, batch, steps: int) -> list[float]:
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(steps):
        loss = label_loss(module.model, batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


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
    from lightning.pytorch.strategies import FSDPStrategy

    from lit_llama_lab.module import QLoRAModule

    with pytest.raises(ValueError, match="not supported under FSDP"):
        QLoRAModule(name_or_path="tiny-random", compile=True).use_compile(None, FSDPStrategy())


def test_checkpoint_kwargs_add_the_policy_only_when_compiled():
    from torch.utils.checkpoint import CheckpointPolicy

    assert checkpoint_kwargs(False, preserve_rng_state=False) == {"use_reentrant": False, "preserve_rng_state": False}
    compiled = checkpoint_kwargs(True)
    assert compiled["use_reentrant"] is False and compiled["preserve_rng_state"] is True
    policy = compiled["context_fn"].args[0]
    assert policy(None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_RECOMPUTE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU host runs it)")
def test_compiled_checkpointing_keeps_no_more_than_eager_on_gpu(tmp_path):
    """What the forward keeps for backward, compiled vs eager, on a 4-bit model with a 1B-like layer (hidden 2048,
    MLP 8192). At the 1B shape without the must-recompute policy torch 2.11 kept every layer's 4-bit matmul outputs:
    6.3 GiB against eager's 1.1 (``scripts/gpu_memprobe.py``). The figures of all three runs are in the message."""
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from lit_llama_lab.fast import compile_decoder_layers, fast_label_loss
    from lit_llama_lab.module import LoraArgs

    config = LlamaConfig(hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=8192, vocab_size=4096)
    held = {}
    for compiled, policy in ((False, False), (True, True), (True, False)):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).to(torch.bfloat16)
        base.save_pretrained(tmp_path)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cuda")
        base.config.use_cache = False
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(policy))
        model = get_peft_model(base, LoraArgs(r=16, alpha=16).peft_config())
        model.train()
        if compiled:
            compile_decoder_layers(model)
        ids = torch.randint(0, 4096, (4, 2048), device="cuda")
        batch = {"input_ids": ids, "labels": ids}
        for _ in range(2):  # the first call compiles
            with torch.autocast("cuda", dtype=torch.bfloat16):
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
                loss = fast_label_loss(model, batch)
                held[compiled, policy] = (torch.cuda.memory_allocated() - start) / 2**20
            loss.backward()
        del model, base, loss
        torch.cuda.empty_cache()
    print(f"MiB held after the forward (compiled, policy): {held}")
    assert held[True, True] <= 1.15 * held[False, False], held
