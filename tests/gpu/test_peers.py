"""The bench's peers on the GPU (issue 20): each present peer runs the same batches as ``ours`` and learns the same
held-out loss. A peer whose package is missing on the host is skipped by name (docs/peers.md: how to bring it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU host runs it)")]


@pytest.mark.parametrize("peer, package", [("trl", "trl"), ("trl+liger", "liger_kernel"), ("unsloth", "unsloth")])
def test_peer_trains_the_benchs_batches_like_ours(peer, package):
    if importlib.util.find_spec(package) is None or importlib.util.find_spec("trl") is None:
        pytest.skip(f"{package} is not installed here (docs/peers.md)")
    from lit_llama_lab.tools.bench import bench

    results = bench(shape="smollm2-135m", seq_len=1024, micro_batch=2, steps=3, warmup=2, doc_len=256, loss_steps=10,
                    loss_batch=16, paths=f"ours+varlen,{peer}", isolate=True)
    ours, them = results["paths"]["ours+varlen"], results["paths"][peer]
    assert "error" not in them, them
    assert them["tokens_per_s"] > 0 and them["trainable_params"] == ours["trainable_params"]
    assert them["held_out_loss"] == pytest.approx(ours["held_out_loss"], rel=0.02)
