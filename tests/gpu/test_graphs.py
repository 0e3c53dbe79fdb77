"""CUDA-graph replay of the training step gives the eager losses and gradients (GPU only; the CPU pieces are in
``tests/speed/test_graphs.py``)."""

from __future__ import annotations

import pytest
import torch

from lit_llama_lab.data.packing import pad_packed_batch
from lit_llama_lab.speed.loss import fast_label_loss
from tests.helpers import make_module, packed_emoji

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU host)")]


def test_graph_replay_gives_the_eager_losses_and_gradients():
    """Three AdamW steps over two batch shapes, graphed vs eager, from the same adapter init (tiny 4-bit model)."""

    def run(graphs: bool) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        module = make_module(quantize="nf4", compute_dtype="bfloat16", cuda_graphs=graphs)
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
