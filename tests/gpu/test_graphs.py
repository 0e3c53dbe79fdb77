"""CUDA-graph replay of the training step gives the eager losses and gradients (GPU only; the CPU pieces are in
``tests/speed/test_graphs.py``)."""

from __future__ import annotations

import pytest
import torch

from lit_llama_lab.data.packing import pad_packed_batch
from lit_llama_lab.speed.loss import fast_label_loss
from tests.helpers import make_module, packed_emoji

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU host)")]


@pytest.mark.parametrize("adapter_matmuls", ["float32", "compute"])
def test_graph_replay_gives_the_eager_losses_and_gradients(adapter_matmuls):
    """Three AdamW steps over two batch shapes, graphed vs eager, from the same adapter init (tiny 4-bit model), with
    the adapters multiplying in fp32 (TF32) and in bf16 (the 1B default)."""
    from lit_llama_lab.model.precision import ComputeDtypeLinear

    def run(graphs: bool) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        module = make_module(quantize="nf4", compute_dtype="bfloat16", cuda_graphs=graphs,
                             adapter_matmuls=adapter_matmuls)
        swapped = [m for m in module.model.modules() if isinstance(m, ComputeDtypeLinear)]
        assert bool(swapped) == (adapter_matmuls == "compute")
        module.model.cuda()
        optimizer = module.configure_optimizers()
        tok = module.tokenizer
        batches = [packed_emoji(tok, n) for n in (8, 16, 8)]
        losses = []
        for batch in batches:
            batch = {k: v.cuda() for k, v in pad_packed_batch(batch, 128, tok.pad_token_id).items()}
            # eager: the graphed step's math (the fixed-shape loss) on the same attention inputs
            loss = module.training_loss(batch) if graphs else fast_label_loss(module.model, module.step.inputs(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        if graphs:
            assert len(module._graphed.graphs) == 2 and module._graphed.eager_calls == 0
        return losses, module.adapter_state_dict()

    eager_losses, eager_weights = run(False)
    graph_losses, graph_weights = run(True)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(graph_weights[name], weight, rtol=1e-5, atol=1e-6)


def test_graphed_step_reading_cached_kl_targets_matches_the_eager_step_running_the_base():
    """The default emoji step on a GPU: graphed, KL targets from the TeacherCache, against the eager step that runs the
    base inside the step (bf16, tiny 4-bit model, trained adapters)."""
    import dataclasses

    from lit_llama_lab.data.packing import collate_packed
    from lit_llama_lab.train.step import TrainStep

    torch.manual_seed(0)
    module = make_module(quantize="nf4", compute_dtype="bfloat16", cuda_graphs=True)
    module.model.cuda()
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    tok = module.tokenizer
    texts = ["a red apple", "the sea is blue today", "one two", "green tea, hot", "a quiet morning walk"]
    examples = [{"input_ids": tok(t)["input_ids"], "labels": tok(t)["input_ids"], "distill": int(i > 0),
                 "replay_id": i - 1} for i, t in enumerate(texts)]
    batch = collate_packed([examples[:2], examples[2:4], examples[4:]], tok.pad_token_id)
    batch = {k: v.cuda() for k, v in pad_packed_batch(batch, 128, tok.pad_token_id).items()}
    batch["max_documents"] = len(examples)
    graphed = TrainStep(module.model, module.plan, tok.pad_token_id, distill_weight=3.0)
    graphed.cache_teacher([e["input_ids"] for e in examples[1:]])
    eager = TrainStep(module.model, dataclasses.replace(module.plan, cuda_graphs=False), tok.pad_token_id, 3.0)
    losses = {}
    # graphed first: a capture after an eager backward on the same model fails ("operation would make the legacy
    # stream depend on a capturing blocking stream"); training's first step is the graphed one
    for name, step in (("graphed", graphed), ("graphed again", graphed), ("eager", eager)):
        module.model.zero_grad(set_to_none=True)
        loss = step(batch)
        loss.backward()
        losses[name] = (float(loss), [p.grad.float().clone() for p in module.model.parameters() if p.requires_grad])
    assert graphed.graphed is not None and len(graphed.graphed.graphs) == 1
    assert losses["graphed"][0] == pytest.approx(losses["eager"][0], rel=2e-3)
    assert losses["graphed again"][0] == losses["graphed"][0]
    for a, b in zip(losses["graphed"][1], losses["eager"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)
