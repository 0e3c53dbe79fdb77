"""The MLP in row blocks and the checkpoints in host memory on a GPU: training's own build and step (compiled layers,
CUDA graphs) give the same losses with less memory (the CPU checks of the same pieces: ``tests/speed/test_memory.py``;
the 1B figures: ``make bench``)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU host runs it)")]
LAYERS, HIDDEN, MLP, ROWS, WIDTH = 4, 2048, 8192, 4, 2048


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A random 4-layer model with Llama-3.2-1B's layer shape and SmolLM2's tokenizer, as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_llama_lab.model.load import load_tokenizer

    folder = tmp_path_factory.mktemp("wide")
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=MLP, vocab_size=len(tokenizer), tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def train(folder: str, speed: dict) -> dict:
    """Three steps of training's step on one synthetic 4 x 2048 batch: the losses, the peak GiB (warm-up and capture
    included) and the plan's blocks and offload."""
    from lit_llama_lab.tools.bench_paths import synthetic_batch
    from lit_llama_lab.train.args import LoraArgs, PrecisionArgs, SpeedArgs
    from lit_llama_lab.train.build import build, plan_for
    from lit_llama_lab.train.step import TrainStep

    lora = LoraArgs(r=16, alpha=16)
    settings = replace(SpeedArgs(gradient_checkpointing=True, compile=True), **speed)
    plan = plan_for(folder, "nf4", PrecisionArgs(), settings, lora, "cuda")
    torch.manual_seed(0)
    model, tokenizer = build(folder, "nf4", lora, plan)
    step = TrainStep(model, plan, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = synthetic_batch(model.config.vocab_size, ROWS, WIDTH, 512, torch.device("cuda"))
    losses = []
    for _ in range(3):
        loss = step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"losses": losses, "peak": torch.cuda.max_memory_allocated() / 2**30, "graphed": len(step.graphed.graphs),
            "chunks": plan.mlp_chunks, "offload": plan.offload_checkpoints}


def run(folder: str, **speed) -> dict:
    """:func:`train` in a process of its own (compiled layers, CUDA graph pools and the allocator's peak start
    fresh, as in the bench)."""
    code = (f"import json; from tests.gpu.test_memory import train; "
            f"print(json.dumps(train({folder!r}, {speed!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_row_blocks_and_offloaded_checkpoints_train_the_same_in_less_memory(wide_model):
    runs = {name: run(wide_model, **speed) for name, speed in (
        ("whole MLP, checkpoints on the GPU", {"mlp_chunks": 1, "offload_checkpoints": False}),
        ("MLP in blocks", {"offload_checkpoints": False}),
        ("MLP in blocks, checkpoints in host memory (auto)", {}))}
    print(runs)
    plain, blocks, auto = runs.values()
    assert auto["chunks"] == blocks["chunks"] > 1 and auto["offload"] and all(r["graphed"] == 1 for r in runs.values())
    # FlashAttention's backward adds in a varying order, so no two runs are bitwise equal after the first step
    assert blocks["losses"] == pytest.approx(plain["losses"], rel=2e-3)
    assert auto["losses"] == pytest.approx(blocks["losses"], rel=1e-4)
    mlp_tensor = ROWS * WIDTH * MLP * 2 / 2**30  # one bf16 MLP activation of the whole batch: 0.125 GiB
    checkpoint = ROWS * WIDTH * HIDDEN * 2 / 2**30  # one layer's saved input: 0.031 GiB
    assert blocks["peak"] <= plain["peak"] - 4 * mlp_tensor
    # with 4 layers the peak holds few checkpoints (on the H200: 1.580 -> 1.554 GiB); at the 1B shape's 16 layers
    # offload took 0.37 GiB off (make bench)
    assert auto["peak"] <= blocks["peak"] - checkpoint / 2
