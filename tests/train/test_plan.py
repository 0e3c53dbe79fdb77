"""One decision of every ``auto`` (``train/plan.py``): what resolve() decides for a target, what it refuses, and that
the plan is logged once at fit start and never written back into the settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lit_llama_lab.train.args import PrecisionArgs, SpeedArgs
from lit_llama_lab.train.plan import DEQUANTIZED_MAX_BYTES, Plan, Target, resolve

CPU = Target(torch.device("cpu"), hidden_size=64, four_bit_params=1000)
GPU = Target(torch.device("cuda"), hidden_size=2048, four_bit_params=10**9)


def test_cpu_defaults_are_fp32_sdpa_eager_without_graphs_and_say_why():
    plan = resolve(PrecisionArgs(), SpeedArgs(), 0.0, CPU)
    assert plan.compute_dtype == torch.float32 and plan.quant_storage == torch.uint8
    assert (plan.attention, plan.compile, plan.dequantize_once, plan.cuda_graphs, plan.tf32) == ("sdpa", False, False,
                                                                                                  False, False)
    assert not plan.fp32_activations  # nothing to keep in fp32 when everything is fp32
    assert plan.adapter_matmul_dtype == torch.float32
    assert plan.autocast == "none" and plan.eval_attention == plan.load_attention == "sdpa"
    assert any("varlen is off (the model is not on a CUDA GPU)" in r for r in plan.reasons)
    assert any(r.startswith("compile off") for r in plan.reasons)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.cuda_graphs = True  # nothing downstream re-decides


def test_a_varlen_plan_loads_with_sdpa_and_validates_through_sdpa():
    plan = dataclasses.replace(resolve(PrecisionArgs(), SpeedArgs(), 0.0, CPU), attention="varlen")
    assert plan.load_attention == "sdpa" and plan.eval_attention == "sdpa"
    assert dataclasses.replace(plan, attention="eager").eval_attention == "eager"


def test_forced_settings_and_refusals_name_the_fix():
    assert resolve(PrecisionArgs(), SpeedArgs(compile=True, dequantize_once=True), 0.0, CPU).compile
    with pytest.raises(ValueError, match="use true, false or auto"):
        resolve(PrecisionArgs(), SpeedArgs(compile="yes"), 0.0, CPU)
    with pytest.raises(ValueError, match="varlen cannot run here: the model is not on a CUDA GPU"):
        resolve(PrecisionArgs(), SpeedArgs(attention="varlen"), 0.0, CPU)
    fsdp = dataclasses.replace(CPU, world_size=2, fsdp=True)
    with pytest.raises(ValueError, match="--model.precision.quant_storage float32"):
        resolve(PrecisionArgs(quant_storage="uint8"), SpeedArgs(), 0.0, fsdp)
    assert resolve(PrecisionArgs(), SpeedArgs(), 0.0, fsdp).quant_storage == torch.float32


def test_gpu_auto_decisions_follow_the_model(monkeypatch):
    """On a target GPU (decided without one: varlen's check is stubbed): compile for wide models on one process
    (or unwrapped DDP ranks),
    dequantize once when the copy fits 1 GiB, graphs unless checkpointing meets dropout."""
    import lit_llama_lab.train.plan as plan_module

    monkeypatch.setattr(plan_module, "varlen_unsupported", lambda device, dtype: None)
    monkeypatch.setattr(plan_module, "resolve_compute_dtype", lambda name, device: torch.bfloat16)
    big = resolve(PrecisionArgs(), SpeedArgs(), 0.0, GPU)
    assert (big.attention, big.compile, big.dequantize_once, big.cuda_graphs, big.tf32) == ("varlen", True, False,
                                                                                             True, True)
    small = resolve(PrecisionArgs(), SpeedArgs(), 0.0, Target(torch.device("cuda"), 1, False, 576,
                                                               DEQUANTIZED_MAX_BYTES // 2))
    assert (small.compile, small.dequantize_once) == (False, True)
    assert big.adapter_matmul_dtype == torch.bfloat16 and small.adapter_matmul_dtype == torch.float32
    assert "adapter matmuls in bfloat16" in big.summary() and big.as_dict()["adapter_matmul_dtype"] == "bfloat16"
    # wide models keep their activations in bf16, small ones (SmolLM2, the emoji configs) in fp32
    assert not big.fp32_activations and small.fp32_activations
    assert "activations in the compute dtype" in big.summary()
    assert any(r.startswith("fp32_activations off: cuda, hidden size 2048") for r in big.reasons)
    fp32act = resolve(PrecisionArgs(fp32_activations=True), SpeedArgs(), 0.0, GPU)
    assert fp32act.fp32_activations and fp32act.adapter_matmul_dtype == torch.bfloat16  # forced; adapters by width
    with pytest.raises(ValueError, match="use true, false or auto"):
        resolve(PrecisionArgs(fp32_activations="yes"), SpeedArgs(), 0.0, GPU)
    forced = resolve(PrecisionArgs(adapter_matmuls="compute"), SpeedArgs(), 0.0,
                     Target(torch.device("cuda"), hidden_size=576))
    assert forced.adapter_matmul_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="use auto, compute or float32"):
        resolve(PrecisionArgs(adapter_matmuls="bf16"), SpeedArgs(), 0.0, GPU)
    unwrapped = resolve(PrecisionArgs(), SpeedArgs(), 0.0, dataclasses.replace(GPU, world_size=2))
    assert unwrapped.compile and unwrapped.cuda_graphs  # QLoRADDPStrategy's ranks run as one process does
    wrapped = resolve(PrecisionArgs(), SpeedArgs(), 0.0, dataclasses.replace(GPU, world_size=2, wrapped=True))
    assert not wrapped.compile and not wrapped.cuda_graphs
    assert any("--trainer.strategy ddp keeps them" in r for r in wrapped.reasons)
    dropout = resolve(PrecisionArgs(), SpeedArgs(gradient_checkpointing=True), 0.1, GPU)
    assert not dropout.cuda_graphs and any("LoRA dropout" in r for r in dropout.reasons)



def test_mlp_blocks_and_offload_follow_compiled_checkpointed_layers(monkeypatch):
    """Both are for compiled layers with checkpointing (the 1B default on a GPU); offload on a GPU only; forced values
    are checked and bad ones refused, naming the fix."""
    import lit_llama_lab.train.plan as plan_module

    monkeypatch.setattr(plan_module, "varlen_unsupported", lambda device, dtype: None)
    checkpointed = SpeedArgs(gradient_checkpointing=True)
    wide = resolve(PrecisionArgs(), checkpointed, 0.0, GPU)
    assert (wide.mlp_chunks, wide.offload_checkpoints) == (6, True)
    assert "MLP in 6 row blocks (micro-batches of 8,192+ tokens)" in wide.summary()
    assert "checkpoints in host memory" in wide.summary() and wide.memory_min_tokens == 8192
    for named in ({"mlp_chunks": 6}, {"offload_checkpoints": True}):  # asked for by name: on every batch
        forced = resolve(PrecisionArgs(), dataclasses.replace(checkpointed, **named), 0.0, GPU)
        assert (forced.mlp_chunks, forced.offload_checkpoints, forced.memory_min_tokens) == (6, True, 0)
        assert "MLP in 6 row blocks," in forced.summary()
    for speed, target in ((SpeedArgs(), GPU), (checkpointed, Target(torch.device("cuda"), hidden_size=576)),
                          (dataclasses.replace(checkpointed, compile=True), CPU)):
        plan = resolve(PrecisionArgs(), speed, 0.0, target)  # no checkpointing; eager layers; a CPU
        assert plan.mlp_chunks == (6 if plan.compile and plan.gradient_checkpointing else 1)
        assert not plan.offload_checkpoints and any(r.startswith("offload_checkpoints off") for r in plan.reasons)
    assert resolve(PrecisionArgs(), dataclasses.replace(checkpointed, mlp_chunks=8), 0.0, CPU).mlp_chunks == 8
    assert not resolve(PrecisionArgs(), dataclasses.replace(checkpointed, offload_checkpoints=False), 0.0,
                       GPU).offload_checkpoints
    for bad in (0, "two", True):
        with pytest.raises(ValueError, match="use auto, 1"):
            resolve(PrecisionArgs(), dataclasses.replace(checkpointed, mlp_chunks=bad), 0.0, GPU)
    with pytest.raises(ValueError, match="needs compiled layers .* on a CUDA GPU"):
        resolve(PrecisionArgs(), SpeedArgs(offload_checkpoints=True), 0.0, GPU)  # no checkpointing

def test_the_plan_is_logged_at_fit_start_and_the_settings_stay_as_given(tmp_path):
    import json

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from tests.train.test_callbacks import make_data, make_model

    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Name animal {i}."},
                                                        {"role": "assistant", "content": "It is the panda."}]})
                               for i in range(16)))
    model = make_model(speed=SpeedArgs(gradient_checkpointing=True, cuda_graphs=True))
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=logger, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, make_data(chats))
    assert isinstance(model.plan, Plan) and logger.hparams["plan"] == model.plan.as_dict()
    assert model.hparams["speed"]["cuda_graphs"] is True  # the setting, not the plan's decision (False on a CPU)


def test_the_build_makes_the_adapters_multiply_in_the_plans_dtype():
    """``adapter_matmuls compute`` on a bf16 model: every LoRA matrix multiplies in bf16 and trains in fp32; the
    default (fp32 on a CPU) leaves them plain."""
    from lit_llama_lab.model.precision import ComputeDtypeLinear
    from lit_llama_lab.train.args import LoraArgs
    from lit_llama_lab.train.module import QLoRAModule
    from tests.helpers import label_loss, make_module, module_args, packed_emoji

    for setting, expected in (("compute", torch.bfloat16), ("auto", None)):
        module = make_module(compute_dtype="bfloat16", adapter_matmuls=setting)
        lora = [m for n, m in module.model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
        assert lora and all(type(m) is (ComputeDtypeLinear if expected else torch.nn.Linear) for m in lora)
        if expected:
            assert module.plan.adapter_matmul_dtype == expected
            batch = module.step.inputs(packed_emoji(module.tokenizer, 4))
            label_loss(module.model, batch)[0].backward()
            grads = [m.weight.grad for n, m in module.model.named_modules() if n.endswith("lora_B.default")]
            assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)  # B is 0 at init, so A's are 0
    dora = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(r=8, alpha=16, use_dora=True),
                       **module_args(compute_dtype="bfloat16", adapter_matmuls="compute"))
    dora.configure_model()
    assert any("lora_magnitude_vector" in n for n, _ in dora.model.named_parameters())
    assert not any(isinstance(m, ComputeDtypeLinear) for m in dora.model.modules())  # DoRA's norms read the weights
