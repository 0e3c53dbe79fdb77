"""CUDA graphs for the training loss: forward and backward captured once per batch shape, then replayed.

A small model's QLoRA step is thousands of tiny kernels (4-bit dequantize, matmul, LoRA A and B, casts, norms) per
layer, and Python launches each of them: on an H100 a SmolLM2-135M step took ~500 ms of wall time for ~40 ms of GPU
work. Replaying a captured graph launches the same kernels with one call, so the GPU, not Python, sets the pace.

The math is unchanged: the graph runs the very kernels eager mode runs, on the same inputs. What it needs is shapes
that do not depend on the data (see :func:`lit_llama_lab.speed.loss.fast_label_loss`) and few distinct batch shapes
(:func:`lit_llama_lab.data.packing.pad_packed_batch` rounds widths up).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)
LOSS_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k",
             "max_length_q", "max_length_k", "distill_mask", "teacher_index")  # what the loss reads; other batch entries (counts, ids) stay out


class _LossOf(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module of positional tensors, the form ``make_graphed_callables`` takes.

    Holding ``model`` as a child makes its trainable parameters (the adapters) inputs of the captured backward.
    ``static`` holds the batch's non-tensor entries (e.g. varlen's ``max_length_q``), fixed for this graph.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, keys: tuple[str, ...], static: dict) -> None:
        super().__init__()
        self.model, self.loss_fn, self.keys, self.static = model, loss_fn, keys, static

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, {**self.static, **dict(zip(self.keys, tensors, strict=True))})


class GraphedLoss:
    """``loss_fn(model, batch)`` with its forward and backward replayed from CUDA graphs, one per batch shape.

    The first batch of a shape is captured (a few eager warm-up passes, then the capture); later batches of that
    shape copy into the graph's static inputs and replay. Past ``max_graphs`` shapes, new shapes run eagerly (each
    graph keeps its own activation memory). Gradients reach the adapters' ``.grad`` as in eager mode, so optimizers,
    gradient clipping and accumulation are unaffected. Only :data:`LOSS_KEYS` reach the loss; a batch with an
    entry there that is neither a tensor nor an int (flex's BlockMask) runs eagerly.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, max_graphs: int = 8) -> None:
        self.model, self.loss_fn, self.max_graphs = model, loss_fn, max_graphs
        self.graphs: dict[tuple, torch.nn.Module] = {}
        self.eager_calls = 0

    def __call__(self, batch: dict) -> torch.Tensor:
        used = {k: batch[k] for k in LOSS_KEYS if k in batch}
        keys = tuple(k for k, v in used.items() if isinstance(v, torch.Tensor))
        static = {k: v for k, v in used.items() if k not in keys}
        if not all(isinstance(v, int) for v in static.values()):
            return self.eager(batch)
        tensors = tuple(used[k] for k in keys)
        shape = tuple((k, tuple(t.shape), t.dtype) for k, t in zip(keys, tensors, strict=True))
        shape += tuple(sorted(static.items()))
        graphed = self.graphs.get(shape)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                return self.eager(batch)
            log.info("Capturing a CUDA graph of the training step for batch shape %s", tuple(tensors[0].shape))
            try:
                # one eager warm-up pass (lazy initialisation stays out of the capture); torch's default of 3 costs
                # two more full steps per shape for nothing on one process
                graphed = torch.cuda.make_graphed_callables(_LossOf(self.model, self.loss_fn, keys, static), tensors,
                                                            num_warmup_iters=1)
            except RuntimeError as error:  # an op that cannot be captured: keep training, eagerly
                log.warning("CUDA graph capture failed (%s); training continues without graphs.", error,
                            exc_info=log.isEnabledFor(logging.DEBUG))
                self.max_graphs = len(self.graphs)
                torch.cuda.synchronize()
                return self.eager(batch)
            self.graphs[shape] = graphed
        # the graph's output buffer is overwritten by the next replay: hand out a copy (autograd flows through it)
        return graphed(*tensors).clone()

    def eager(self, batch: dict) -> torch.Tensor:
        """The loss computed without graphs (counted in ``eager_calls``)."""
        self.eager_calls += 1
        return self.loss_fn(self.model, batch)
